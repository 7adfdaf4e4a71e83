// Registration entry points of the C++ helpers; each lives in its own .cpp file.
#pragma once
#include <pybind11/pybind11.h>

namespace normistral {
void register_indexed_writer(pybind11::module_& m);  // indexed_writer.cpp
void register_mixture_index(pybind11::module_& m);   // mixture_index.cpp
void register_objective(pybind11::module_& m);       // objective.cpp
}  // namespace normistral
