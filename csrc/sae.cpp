// Python binding of the fused SAE encode + pool + top-k kernel. The Python side
// (semlens_fast/ops/cpu/sae.py) validates every argument and passes raw pointers; the GIL is
// released while the kernel runs.
#include <pybind11/pybind11.h>

#include "isa.h"
#include "sae.h"

namespace py = pybind11;

#define SLF_DECL(ns) namespace ns { void sae_topk(const slf::SaeArgs& a); \
    void sae_pack(const void*, int, int64_t, int64_t, int64_t, int64_t, float*, float*, int); }
SLF_DECL(slf_sae_scalar)
SLF_DECL(slf_sae_avx2)
SLF_DECL(slf_sae_avx512)
#undef SLF_DECL

void register_sae(py::module_& m) {
    m.def(
        "sae_topk_update",
        [](uintptr_t vals, uintptr_t ids, uintptr_t pos, uintptr_t nan_counts, int64_t L, int64_t k,
           uintptr_t x, uintptr_t nx, int64_t R, int64_t d, uintptr_t row_off, uintptr_t row_tok, int64_t B,
           int64_t tmax, uintptr_t wpacked, uintptr_t wnorm, uintptr_t benc, uintptr_t thr,
           uintptr_t sample_ids, int pool, bool track, float c0, float c1, float c2, int nthreads) {
            slf::SaeArgs a{reinterpret_cast<float*>(vals), reinterpret_cast<int64_t*>(ids),
                           reinterpret_cast<int32_t*>(pos), reinterpret_cast<int64_t*>(nan_counts), L, k,
                           reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(nx), R, d,
                           reinterpret_cast<const int64_t*>(row_off), reinterpret_cast<const int32_t*>(row_tok),
                           B, tmax, reinterpret_cast<const float*>(wpacked), reinterpret_cast<const float*>(wnorm),
                           reinterpret_cast<const float*>(benc), reinterpret_cast<const float*>(thr),
                           reinterpret_cast<const int64_t*>(sample_ids), pool, track, c0, c1, c2, nthreads};
            switch (slf::current_isa()) {
                case slf::ISA_AVX512: slf_sae_avx512::sae_topk(a); break;
                case slf::ISA_AVX2: slf_sae_avx2::sae_topk(a); break;
                default: slf_sae_scalar::sae_topk(a); break;
            }
        },
        py::call_guard<py::gil_scoped_release>(),
        "Fused SAE encode + token pooling + top-k merge on raw pointers (validated by the Python wrapper).");
    m.def(
        "sae_pack",
        [](uintptr_t W, int wdtype, int64_t swi, int64_t swl, int64_t d, int64_t L, uintptr_t out, uintptr_t norms,
           int nthreads) {
            const void* w = reinterpret_cast<const void*>(W);
            float* o = reinterpret_cast<float*>(out);
            float* n = reinterpret_cast<float*>(norms);
            switch (slf::current_isa()) {  // the packing is the same at every level; only speed differs
                case slf::ISA_AVX512: slf_sae_avx512::sae_pack(w, wdtype, swi, swl, d, L, o, n, nthreads); break;
                case slf::ISA_AVX2: slf_sae_avx2::sae_pack(w, wdtype, swi, swl, d, L, o, n, nthreads); break;
                default: slf_sae_scalar::sae_pack(w, wdtype, swi, swl, d, L, o, n, nthreads); break;
            }
        },
        py::call_guard<py::gil_scoped_release>(),
        "Pack W_enc [d, L] (any dtype/strides) into float32 panels [ceil(L/16), d, 16] and column norms.");
}
