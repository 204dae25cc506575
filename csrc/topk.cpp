// Python bindings of the top-k kernel family: fused pool + top-k update and merge.
// The Python side (semlens_fast/ops/cpu/topk.py) validates every argument and passes
// raw pointers; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

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

// Merge state b into state a (in place): both lists are sorted in the library's order
// (validated by the Python side, with no sample id in both), so one linear merge per
// channel gives the k best of the union: O(k) per channel.
static void merge_states(float* va, int64_t* ia, int32_t* pa, int64_t* na,
                         const float* vb, const int64_t* ib, const int32_t* pb, const int64_t* nb,
                         int64_t C, int64_t k, int nthreads) {
    int nt = (C * k < (1 << 14)) ? 1 : nthreads;
#pragma omp parallel num_threads(nt)
    {
        float* tv = static_cast<float*>(std::malloc(sizeof(float) * k));
        int64_t* ti = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * k));
        int32_t* tp = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * k));
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; ++c) {
            na[c] += nb[c];
            float* av = va + c * k;
            int64_t* ai = ia + c * k;
            int32_t* ap = pa + c * k;
            const float* bv = vb + c * k;
            const int64_t* bi = ib + c * k;
            const int32_t* bp = pb + c * k;
            int64_t x = 0, y = 0;
            for (int64_t o = 0; o < k; ++o) {
                if (better(av[x], ai[x], bv[y], bi[y])) { tv[o] = av[x]; ti[o] = ai[x]; tp[o] = ap[x]; ++x; }
                else { tv[o] = bv[y]; ti[o] = bi[y]; tp[o] = bp[y]; ++y; }
            }
            std::memcpy(av, tv, sizeof(float) * k);
            std::memcpy(ai, ti, sizeof(int64_t) * k);
            std::memcpy(ap, tp, sizeof(int32_t) * k);
        }
        std::free(tv);
        std::free(ti);
        std::free(tp);
    }
}

// Sample ids of one batch: 0 if all are >= 0 and distinct, 1 if one is negative, 2 if
// one occurs twice. Increasing ids (the usual arange of a stream) cost one pass; other
// orders a sorted copy (B log B, small next to the B x C activations).
static int check_sample_ids(const int64_t* sid, int64_t B) {
    bool increasing = true;
    for (int64_t b = 0; b < B; ++b) {
        if (sid[b] < 0) return 1;
        if (b > 0 && sid[b] <= sid[b - 1]) increasing = false;
    }
    if (increasing) return 0;
    std::vector<int64_t> s(sid, sid + B);
    std::sort(s.begin(), s.end());
    for (int64_t b = 1; b < B; ++b)
        if (s[b] == s[b - 1]) return 2;
    return 0;
}

}  // namespace slf

void register_topk(py::module_& m) {
    m.def(
        "pool_topk_update",
        [](uintptr_t vals, uintptr_t ids, uintptr_t pos, uintptr_t nan_counts, int64_t C, int64_t k,
           uintptr_t x, int dtype, int64_t B, int64_t S, int64_t sb, int64_t sc, int64_t ss,
           uintptr_t sample_ids, int pool, bool track_pos, int nthreads, int64_t merge_k) {
            slf::PoolArgs a{reinterpret_cast<float*>(vals), reinterpret_cast<int64_t*>(ids),
                            reinterpret_cast<int32_t*>(pos), reinterpret_cast<int64_t*>(nan_counts),
                            C, k, reinterpret_cast<const void*>(x), dtype, B, S, sb, sc, ss,
                            reinterpret_cast<const int64_t*>(sample_ids), pool, track_pos, nthreads, merge_k};
            const int rc = slf::check_sample_ids(a.sample_ids, B);  // before touching the state
            if (rc != 0) return rc;
            slf::pool_topk_dispatch(a);
            return 0;
        },
        py::arg("vals"), py::arg("ids"), py::arg("pos"), py::arg("nan_counts"), py::arg("C"), py::arg("k"),
        py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("S"), py::arg("sb"), py::arg("sc"), py::arg("ss"),
        py::arg("sample_ids"), py::arg("pool"), py::arg("track_pos"), py::arg("nthreads"), py::arg("merge_k") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Fused pooling + top-k merge on raw pointers (validated by the Python wrapper). Returns 0, or "
        "(state untouched) 1 if a sample id is negative, 2 if one occurs twice in the batch. "
        "merge_k: from this k on candidates are merged in batches (<= 0: never).");
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
