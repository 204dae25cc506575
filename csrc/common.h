// Shared helpers of the semlens_fast C++ kernels (ISA independent).
//
// Everything here has internal linkage (static inline) so that each translation
// unit, whatever SIMD target it is compiled for, gets its own private copy: no
// inline function compiled for AVX-512 can leak into the scalar path.
#pragma once

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
};

}  // namespace slf
