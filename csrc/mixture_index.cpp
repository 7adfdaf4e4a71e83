#include "helpers.h"
namespace normistral {
void register_mixture_index(pybind11::module_& m) { (void)m; }  // filled in by its issue
}  // namespace normistral
