// Similarity kernel family (cosine top-k search): shared argument structs.
//
// The candidate pass (similarity_kernel.h, compiled once per SIMD level) computes
// approximate cosine scores in float32 -- dot(q_hat, x) * (1 / |x|) with q_hat the
// pre-normalised query -- over row blocks of the database and keeps, per query, the
// best K candidates in the library's total order (score desc, id asc). The exact
// rescoring (similarity.cpp, ISA independent) recomputes the candidates' scores in
// float64 in a fixed sequential order, which is the documented definition of a score.
#pragma once

#include <cstdint>

#include "common.h"

namespace slf {

struct SimArgs {
    const float* q;        // [Q, d] float32, contiguous, rows unit-normalised (or zero)
    int64_t Q, d;
    const void* x;         // [N, d] database rows; element (r, i) at x[r * xs + i]
    int dtype;             // F32 / F16 / BF16 (common.h)
    int64_t N, xs;
    int64_t K;             // candidates kept per query
    float* vals;           // [Q, K] out: approximate scores, best first (-inf when empty)
    int64_t* ids;          // [Q, K] out: row ids (-1 when empty)
    const int64_t* excl;   // [Q, m] row ids to skip (-1 = padding), or nullptr
    int64_t m;
    int64_t* bad;          // out: rows whose squared norm is not finite (NaN/inf values)
    int64_t max_bad;
    int64_t* n_bad;        // out: how many such rows were found (may exceed max_bad)
    int nthreads;
    // int16 mode (q16 != nullptr): queries quantised as round(q_hat * 2^15) (clamped to
    // +-32767), rows quantised the same way after scaling by their inverse norm; the
    // approximate score is the exact int32 dot product times 2^-30.
    const int16_t* q16;
    // int8 pre-filter of the int16 pass (AVX2, filled by the kernel itself): queries as
    // int8 q8 (stride dp8, a multiple of 64) with scale q8a (x 2^-15), bound terms q8e,
    // q8b and offset correction q8c (see similarity_kernel.h, filter8)
    const int8_t* q8 = nullptr;
    int64_t dp8 = 0;
    const float* q8a = nullptr;
    const float* q8e = nullptr;
    const float* q8b = nullptr;
    const int32_t* q8c = nullptr;
    // thresholds shared by the threads of one call (filled by the kernel itself): per
    // query, the highest K-th score of any thread's list so far (or nullptr). No row
    // scoring below it can enter the merged top-K, so every thread may skip it.
    float* sthr = nullptr;
    // large K (K >= merge_k, <= 0: never; filled by the kernel itself): per query up to
    // pend_cap candidates wait in pend [Q, pend_cap] (counts pend_n [Q]) and are merged
    // into the query's sorted list in one pass (common.h, merge_candidates) when the
    // buffer is full and at the end of every scanned range; mtv/mti: K-entry scratch.
    int64_t merge_k = 0;
    Cand* pend = nullptr;
    int32_t* pend_n = nullptr;
    int64_t pend_cap = 0;
    float* mtv = nullptr;
    int64_t* mti = nullptr;
};

}  // namespace slf
