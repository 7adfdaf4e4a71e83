// The one extension module, megatron_normistral._helpers, built by setup.py at install time.
#include "helpers.h"

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "C++ helpers of megatron-normistral (indexed writer, mixture index, objective)";
    normistral::register_indexed_writer(m);
    normistral::register_mixture_index(m);
    normistral::register_objective(m);
}
