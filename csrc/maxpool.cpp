// Python binding of the max-pool relevance kernel (semlens_fast/ops/cpu/maxpool.py validates the
// arguments and passes raw pointers of contiguous tensors; the GIL is released while it runs).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "isa.h"

namespace py = pybind11;

#define SLF_DECLARE(ns)                                                                                  \
    namespace ns {                                                                                       \
    void maxpool_relevance(const void* x, const void* R, void* out, int dtype, int64_t BC, int64_t H,    \
                           int64_t W, int kh, int kw, int nthreads);                                     \
    }
SLF_DECLARE(slf_scalar)
SLF_DECLARE(slf_avx2)
SLF_DECLARE(slf_avx512)
#undef SLF_DECLARE

void register_maxpool(py::module_& m) {
    m.def(
        "maxpool_relevance",
        [](uintptr_t x, uintptr_t R, uintptr_t out, int dtype, int64_t BC, int64_t H, int64_t W, int kh, int kw,
           int nthreads) {
            const void* px = reinterpret_cast<const void*>(x);
            const void* pr = reinterpret_cast<const void*>(R);
            void* po = reinterpret_cast<void*>(out);
            switch (slf::current_isa()) {
                case slf::ISA_AVX512: slf_avx512::maxpool_relevance(px, pr, po, dtype, BC, H, W, kh, kw, nthreads); break;
                case slf::ISA_AVX2: slf_avx2::maxpool_relevance(px, pr, po, dtype, BC, H, W, kh, kw, nthreads); break;
                default: slf_scalar::maxpool_relevance(px, pr, po, dtype, BC, H, W, kh, kw, nthreads); break;
            }
        },
        py::arg("x"), py::arg("R"), py::arg("out"), py::arg("dtype"), py::arg("BC"), py::arg("H"), py::arg("W"),
        py::arg("kh"), py::arg("kw"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
        "Max-pool relevance (winner takes all, ties split) on raw pointers of contiguous [B*C, H, W] x and out and "
        "[B*C, H/kh, W/kw] R; dtype 0 float32, 1 float64.");
}
