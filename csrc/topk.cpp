// Python bindings of the top-k kernel family: fused pool + top-k update and merge.
// The Python side (semlens_fast/ops/cpu/topk.py) validates every argument and passes
// raw pointers; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
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
// orders a bitmap over their range when it is small (shuffled loaders: a permutation of
// a block, or indices into a data set of up to 2^22 samples), else a sorted copy
// (B log B); all small next to the B x C activations.
static int check_sample_ids(const int64_t* sid, int64_t B) {
    bool increasing = true;
    int64_t lo = B > 0 ? sid[0] : 0, hi = lo;
    for (int64_t b = 0; b < B; ++b) {
        if (sid[b] < 0) return 1;
        if (b > 0 && sid[b] <= sid[b - 1]) increasing = false;
        lo = std::min(lo, sid[b]);
        hi = std::max(hi, sid[b]);
    }
    if (increasing) return 0;
    const uint64_t range = static_cast<uint64_t>(hi - lo) + 1;
    if (range <= (uint64_t{1} << 22) && range <= static_cast<uint64_t>(B) * 4096) {
        std::vector<uint64_t> seen(range / 64 + 1, 0);
        for (int64_t b = 0; b < B; ++b) {
            const uint64_t j = static_cast<uint64_t>(sid[b] - lo);
            const uint64_t bit = uint64_t{1} << (j & 63);
            if (seen[j >> 6] & bit) return 2;
            seen[j >> 6] |= bit;
        }
        return 0;
    }
    std::vector<int64_t> s(sid, sid + B);
    std::sort(s.begin(), s.end());
    for (int64_t b = 1; b < B; ++b)
        if (s[b] == s[b - 1]) return 2;
    return 0;
}

// Checks of two top-k states before merge_topk (see ops/_validate.py, which formats the
// errors and has the same checks in torch for other devices). For every check j of
// state s (s = 0: a, 1: b) first[s * NCHECK + j] receives the lowest channel failing it
// (C if none); the overlap check (a sample id in both states) goes to first[2 * NCHECK]
// with its smallest id in that channel in *overlap_id and the number of such channels in
// *overlap_channels. O(C k log k), parallel over channels.
enum StateCheck : int {
    CHK_NAN = 0, CHK_ID = 1, CHK_EMPTY = 2, CHK_POS = 3, CHK_NANCOUNT = 4, CHK_ORDER = 5, CHK_DUP = 6, NCHECK = 7
};

static void check_states(const float* const* v, const int64_t* const* ids, const int32_t* const* pos,
                         const int64_t* const* nan, int64_t C, int64_t k, int nthreads, int64_t* first,
                         int64_t* overlap_id, int64_t* overlap_channels) {
    constexpr int NF = 2 * NCHECK + 1;
    for (int j = 0; j < NF; ++j) first[j] = C;
    *overlap_id = -1;
    *overlap_channels = 0;
    if (C <= 0 || k <= 0) return;  // nothing to check (and no k-sized scratch for an empty state)
    int64_t n_overlap = 0;
    const int nt = (C * k < (1 << 14)) ? 1 : nthreads;
#pragma omp parallel num_threads(nt) reduction(+ : n_overlap)
    {
        int64_t mine[NF];
        for (int j = 0; j < NF; ++j) mine[j] = C;
        int64_t my_id = -1;  // smallest shared id in channel mine[2 * NCHECK]
        std::vector<int64_t> srt[2] = {std::vector<int64_t>(static_cast<size_t>(k)), std::vector<int64_t>(static_cast<size_t>(k))};
        int64_t nvalid[2];
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; ++c) {
            for (int s = 0; s < 2; ++s) {
                const float* vr = v[s] + c * k;
                const int64_t* ir = ids[s] + c * k;
                const int32_t* pr = pos[s] + c * k;
                int64_t* m = mine + s * NCHECK;
                bool f[NCHECK] = {false, false, false, false, nan[s][c] < 0, false, false};
                int64_t n = 0;
                for (int64_t j = 0; j < k; ++j) {
                    const float x = vr[j];
                    const int64_t id = ir[j];
                    f[CHK_NAN] |= x != x;
                    f[CHK_ID] |= id < -1;
                    f[CHK_EMPTY] |= id == -1 && (x != -std::numeric_limits<float>::infinity() || pr[j] != -1);
                    f[CHK_POS] |= pr[j] < -1;
                    if (j > 0 && !(ir[j - 1] == -1 && id == -1) && !better(vr[j - 1], ir[j - 1], x, id)) f[CHK_ORDER] = true;
                    if (id >= 0) srt[s][n++] = id;
                }
                std::sort(srt[s].begin(), srt[s].begin() + n);
                for (int64_t j = 1; j < n && !f[CHK_DUP]; ++j) f[CHK_DUP] = srt[s][j] == srt[s][j - 1];
                nvalid[s] = n;
                for (int j = 0; j < NCHECK; ++j)
                    if (f[j] && c < m[j]) m[j] = c;
            }
            // a sample id in both states: walk the two sorted id lists
            int64_t x = 0, y = 0, shared = -1;
            while (x < nvalid[0] && y < nvalid[1]) {
                const int64_t p = srt[0][x], q = srt[1][y];
                if (p == q) { shared = p; break; }
                if (p < q) ++x; else ++y;
            }
            if (shared >= 0) {
                ++n_overlap;
                if (c < mine[2 * NCHECK]) { mine[2 * NCHECK] = c; my_id = shared; }
            }
        }
#pragma omp critical(slf_check_states)
        {
            for (int j = 0; j < 2 * NCHECK; ++j) first[j] = std::min(first[j], mine[j]);
            if (mine[2 * NCHECK] < first[2 * NCHECK]) { first[2 * NCHECK] = mine[2 * NCHECK]; *overlap_id = my_id; }
        }
    }
    *overlap_channels = n_overlap;
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
        "check_merge_states",
        [](uintptr_t va, uintptr_t ia, uintptr_t pa, uintptr_t na, uintptr_t vb, uintptr_t ib, uintptr_t pb,
           uintptr_t nb, int64_t C, int64_t k, int nthreads) {
            const float* v[2] = {reinterpret_cast<const float*>(va), reinterpret_cast<const float*>(vb)};
            const int64_t* i[2] = {reinterpret_cast<const int64_t*>(ia), reinterpret_cast<const int64_t*>(ib)};
            const int32_t* p[2] = {reinterpret_cast<const int32_t*>(pa), reinterpret_cast<const int32_t*>(pb)};
            const int64_t* n[2] = {reinterpret_cast<const int64_t*>(na), reinterpret_cast<const int64_t*>(nb)};
            std::vector<int64_t> first(2 * slf::NCHECK + 1);
            int64_t oid = -1, och = 0;
            {
                py::gil_scoped_release release;
                slf::check_states(v, i, p, n, C, k, nthreads, first.data(), &oid, &och);
            }
            return py::make_tuple(first, oid, och);
        },
        "Checks of two top-k states before a merge (raw pointers): (lowest failing channel per check "
        "[a: nan, id, empty, pos, nan_count, order, dup; b: the same; overlap], smallest shared id, "
        "channels sharing ids); C means none.");
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
