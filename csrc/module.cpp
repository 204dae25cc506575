// The extension module semlens_fast._C: one registration function per kernel family.
#include <pybind11/pybind11.h>

#include "isa.h"

namespace py = pybind11;

void register_topk(py::module_& m);
void register_similarity(py::module_& m);
void register_sae(py::module_& m);
void register_maxpool(py::module_& m);

PYBIND11_MODULE(_C, m) {
    m.doc() = "semlens_fast C++ CPU kernels (OpenMP, SIMD level chosen at run time)";
    m.def("isa", []() { return std::string(slf::isa_name(slf::current_isa())); },
          "SIMD level the kernels use now.");
    m.def("best_isa", []() { return std::string(slf::isa_name(slf::best_isa())); },
          "Best SIMD level this CPU supports.");
    m.def("set_isa", [](const std::string& name) {
        int level = name == "avx512" ? 2 : name == "avx2" ? 1 : name == "scalar" ? 0 : -1;
        if (level < 0) throw py::value_error("isa must be 'avx512', 'avx2' or 'scalar', got '" + name + "'");
        slf::set_isa(level);
        return std::string(slf::isa_name(slf::current_isa()));
    }, "Lower the SIMD level (for tests); returns the level in force.");
    register_topk(m);
    register_similarity(m);
    register_sae(m);
    register_maxpool(m);
}
