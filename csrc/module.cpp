// The one extension module, megatron_normistral._helpers, built by setup.py at install time.
#include "helpers.h"

namespace normistral {

// The shared core (helpers.h), bound so that tests compare it with data/reference.py.
void register_core(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("splitmix64", &splitmix64, py::arg("x"));
    m.def("derive_key", &derive_key, py::arg("key"), py::arg("label"));
    // key_path is variadic in C++; the paths the helpers use have 1 to 4 labels.
    m.def("key_path", [](uint64_t seed) { return key_path(seed); }, py::arg("seed"));
    m.def("key_path", [](uint64_t seed, uint64_t a) { return key_path(seed, a); });
    m.def("key_path", [](uint64_t seed, uint64_t a, uint64_t b) { return key_path(seed, a, b); });
    m.def("key_path", [](uint64_t seed, uint64_t a, uint64_t b, uint64_t c) { return key_path(seed, a, b, c); });
    m.def("key_path",
          [](uint64_t seed, uint64_t a, uint64_t b, uint64_t c, uint64_t d) { return key_path(seed, a, b, c, d); },
          "Key of the path of labels under seed (0 to 4 labels).");
    m.def("draw", &draw, py::arg("key"), py::arg("i"));
    m.def("bounded32", &bounded32, py::arg("x"), py::arg("n"));
    m.def("bounded64", &bounded64, py::arg("x"), py::arg("n"));
}

}  // namespace normistral

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "C++ helpers of megatron-normistral (shared core, indexed writer, mixture index, objective)";
    normistral::register_core(m);
    normistral::register_indexed_writer(m);
    normistral::register_mixture_index(m);
    normistral::register_objective(m);
}
