// Python bindings of the top-k kernel family: fused pool + top-k update and merge.
// The Python side (semlens_fast/ops/cpu/topk.py) validates every argument and passes
// raw pointers; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <omp.h>

#include "common.h"
#include "isa.h"

namespace py = pybind11;

namespace slf_scalar { void pool_topk(const slf::PoolArgs& a); }
namespace slf_avx2 { void pool_topk(const slf::PoolArgs& a); }
namespace slf_avx512 { void pool_topk(const slf::PoolArgs& a); }

namespace slf {

static void pool_topk_dispatch(const PoolArgs& a) {
    switch (current_isa()) {
        case ISA_AVX512: slf_avx512::pool_topk(a); break;
        case ISA_AVX2: slf_avx2::pool_topk(a); break;
        default: slf_scalar::pool_topk(a); break;
    }
}

// Merge state b into state a (in place): every real entry of b is inserted into a.
static void merge_states(float* va, int64_t* ia, int32_t* pa, int64_t* na,
                         const float* vb, const int64_t* ib, const int32_t* pb, const int64_t* nb,
                         int64_t C, int64_t k, int nthreads) {
    int nt = (C * k < (1 << 14)) ? 1 : nthreads;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; ++c) {
        na[c] += nb[c];
        for (int64_t j = 0; j < k; ++j) {
            int64_t id = ib[c * k + j];
            if (id < 0) continue;  // empty slot
            insert_entry(va + c * k, ia + c * k, pa + c * k, k, vb[c * k + j], id, pb[c * k + j]);
        }
    }
}

}  // namespace slf

void register_topk(py::module_& m) {
    m.def(
        "pool_topk_update",
        [](uintptr_t vals, uintptr_t ids, uintptr_t pos, uintptr_t nan_counts, int64_t C, int64_t k,
           uintptr_t x, int dtype, int64_t B, int64_t S, int64_t sb, int64_t sc, int64_t ss,
           uintptr_t sample_ids, int pool, bool track_pos, int nthreads) {
            slf::PoolArgs a{reinterpret_cast<float*>(vals), reinterpret_cast<int64_t*>(ids),
                            reinterpret_cast<int32_t*>(pos), reinterpret_cast<int64_t*>(nan_counts),
                            C, k, reinterpret_cast<const void*>(x), dtype, B, S, sb, sc, ss,
                            reinterpret_cast<const int64_t*>(sample_ids), pool, track_pos, nthreads};
            for (int64_t b = 0; b < B; ++b)  // validate before touching the state
                if (a.sample_ids[b] < 0) return false;
            slf::pool_topk_dispatch(a);
            return true;
        },
        py::call_guard<py::gil_scoped_release>(),
        "Fused pooling + top-k merge on raw pointers (validated by the Python wrapper); False if an id is negative.");
    m.def(
        "merge_topk",
        [](uintptr_t va, uintptr_t ia, uintptr_t pa, uintptr_t na, uintptr_t vb, uintptr_t ib,
           uintptr_t pb, uintptr_t nb, int64_t C, int64_t k, int nthreads) {
            slf::merge_states(reinterpret_cast<float*>(va), reinterpret_cast<int64_t*>(ia),
                              reinterpret_cast<int32_t*>(pa), reinterpret_cast<int64_t*>(na),
                              reinterpret_cast<const float*>(vb), reinterpret_cast<const int64_t*>(ib),
                              reinterpret_cast<const int32_t*>(pb), reinterpret_cast<const int64_t*>(nb),
                              C, k, nthreads);
        },
        py::call_guard<py::gil_scoped_release>(),
        "Merge top-k state b into state a in place (raw pointers).");
}
