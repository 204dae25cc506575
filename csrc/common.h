// Shared helpers of the semlens_fast C++ kernels (ISA independent).
//
// Everything here has internal linkage (static inline) so that each translation
// unit, whatever SIMD target it is compiled for, gets its own private copy: no
// inline function compiled for AVX-512 can leak into the scalar path.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>

namespace slf {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum Pool : int { POOL_MAX = 0, POOL_MEAN = 1, POOL_ABSMAX = 2, POOL_SUM = 3 };

static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact (subnormals, inf and NaN included).
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t out;
    if (exp == 0) {
        if (man == 0) {
            out = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            out = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        out = sign | 0x7f800000u | (man << 13);
    } else {
        out = sign | ((exp + (127 - 15)) << 23) | (man << 13);
    }
    return bits_to_f32(out);
}

template <int DT> struct In;
template <> struct In<F32>  { using T = float;    static inline float get(const T* p) { return *p; } };
template <> struct In<F16>  { using T = uint16_t; static inline float get(const T* p) { return f16_to_f32(*p); } };
template <> struct In<BF16> { using T = uint16_t; static inline float get(const T* p) { return bf16_to_f32(*p); } };

// The one total order of top-k entries: larger value first; among equal values the
// lower sample id first; empty slots (id -1) after every real entry. Comparing ids
// as unsigned puts -1 last for free.
static inline bool better(float v1, int64_t i1, float v2, int64_t i2) {
    return v1 > v2 || (v1 == v2 && static_cast<uint64_t>(i1) < static_cast<uint64_t>(i2));
}

// One channel's top-k list, sorted best first. Insert (v, id, pos) if it beats the
// last entry; returns true if it was inserted. ``pos`` may be nullptr (lists without
// positions, e.g. similarity search).
static inline bool insert_entry(float* vals, int64_t* ids, int32_t* pos, int64_t k,
                                float v, int64_t id, int32_t p) {
    if (!better(v, id, vals[k - 1], ids[k - 1])) return false;
    int64_t lo = 0, hi = k - 1;  // first j in [0, k-1] with (v,id) better than entry j
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (better(v, id, vals[mid], ids[mid])) hi = mid; else lo = mid + 1;
    }
    int64_t n = k - 1 - lo;
    if (n > 0) {
        std::memmove(vals + lo + 1, vals + lo, static_cast<size_t>(n) * sizeof(float));
        std::memmove(ids + lo + 1, ids + lo, static_cast<size_t>(n) * sizeof(int64_t));
        if (pos != nullptr) std::memmove(pos + lo + 1, pos + lo, static_cast<size_t>(n) * sizeof(int32_t));
    }
    vals[lo] = v; ids[lo] = id;
    if (pos != nullptr) pos[lo] = p;
    return true;
}

// Arguments of one fused pool + top-k update (also used with S == 1 for plain top-k).
struct PoolArgs {
    float* vals;        // [C, k]
    int64_t* ids;       // [C, k]
    int32_t* pos;       // [C, k]
    int64_t* nan_counts;  // [C]
    int64_t C, k;
    const void* x;      // element (b, c, s) at x[b*sb + c*sc + s*ss]
    int dtype;
    int64_t B, S, sb, sc, ss;
    const int64_t* sample_ids;  // [B]
    int pool;
    bool track_pos;     // record the position of the max (max/absmax)
    int nthreads;
    // from this k on (<= 0: never), candidates are collected per channel over a run of
    // samples and merged into the sorted list in one pass (see topk_kernel.h)
    int64_t merge_k = 0;
};

// A candidate entry waiting to be merged into a list (batched mode of the top-k kernel).
struct Cand {
    float v;
    int32_t p;
    int64_t id;
};

// The comparator lives in an anonymous namespace: every translation unit (each compiled
// for its own SIMD target) instantiates std::sort with its own type, so no instantiation
// compiled for AVX-512 can be shared with the scalar path by the linker.
namespace {
struct CandBetter {
    bool operator()(const Cand& x, const Cand& y) const { return better(x.v, x.id, y.v, y.id); }
};
}  // namespace

// Merge the m candidates S (any order; sorted in place) into one channel's sorted top-k
// list (vals, ids, pos; pos may be nullptr) in one pass, the same result as m calls of
// insert_entry in O(k + m log m): entries above the first position a candidate beats stay
// where they are; from there the list and the candidates are merged (branch-free) into
// the scratch arrays (tv, ti, tp: k entries each) until the last candidate is placed, the
// rest of the list moves down by the number of candidates placed, and the merged part is
// copied back.
static inline void merge_candidates(float* vals, int64_t* ids, int32_t* pos, int64_t k, Cand* S, int64_t m,
                                    float* tv, int64_t* ti, int32_t* tp) {
    if (m <= 0) return;
    std::sort(S, S + m, CandBetter());
    if (!better(S[0].v, S[0].id, vals[k - 1], ids[k - 1])) return;
    int64_t lo = 0, hi = k - 1;  // first j with S[0] better than entry j
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (better(S[0].v, S[0].id, vals[mid], ids[mid])) hi = mid; else lo = mid + 1;
    }
    // candidates that can enter: at most k - lo, the rest is cut
    if (m > k - lo) m = k - lo;
    const int64_t n = k - lo;
    int64_t x = lo, y = 0, o = 0;
    // x < k always: o = (x - lo) + y < n
    for (; o < n && y < m; ++o) {
        const float lv = vals[x], sv = S[y].v;
        const int64_t li = ids[x], si = S[y].id;
        const bool t = (sv > lv) | ((sv == lv) & (static_cast<uint64_t>(si) < static_cast<uint64_t>(li)));
        tv[o] = t ? sv : lv;
        ti[o] = t ? si : li;
        if (pos != nullptr) tp[o] = t ? S[y].p : pos[x];
        y += t;
        x += !t;
    }
    // o merged entries; the list entries [x, x + n - o) follow unchanged (y = m, or the
    // list is full with better entries); they move from x to lo + o >= x
    const int64_t rest = n - o;
    if (rest > 0 && lo + o != x) {
        std::memmove(vals + lo + o, vals + x, static_cast<size_t>(rest) * sizeof(float));
        std::memmove(ids + lo + o, ids + x, static_cast<size_t>(rest) * sizeof(int64_t));
        if (pos != nullptr) std::memmove(pos + lo + o, pos + x, static_cast<size_t>(rest) * sizeof(int32_t));
    }
    std::memcpy(vals + lo, tv, static_cast<size_t>(o) * sizeof(float));
    std::memcpy(ids + lo, ti, static_cast<size_t>(o) * sizeof(int64_t));
    if (pos != nullptr) std::memcpy(pos + lo, tp, static_cast<size_t>(o) * sizeof(int32_t));
}

}  // namespace slf
