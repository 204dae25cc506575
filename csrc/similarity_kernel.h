// Candidate pass of the cosine top-k search, written once and compiled once per SIMD
// level. Each similarity_<level>.cpp defines SLF_LEVEL (0 scalar, 1 AVX2, 2 AVX-512)
// and SLF_NS, includes its headers, switches the compiler target, then includes this.
//
// Work split: threads take chunks of 2048 database rows on demand and keep their own
// top-K list per query (no locks); the lists are merged at the end. Between row blocks
// each thread publishes its K-th scores and takes the highest one any thread holds as
// its threshold (a.sthr), which only skips rows that cannot reach the merged top-K.
// Three paths:
//  * 1..8 queries (float32, fused): every row is read once, straight from its storage,
//    and its dots and squared norm come from the same pass; bandwidth-bound.
//  * int16 queries (q16, from 9 queries on): a thread walks its range in blocks of RB
//    rows that stay in L2, quantised to int16 row by row (norm, then scale by the
//    inverse norm), and runs every group of 6 queries (L1-resident) over the block with
//    a 6 x 2 vpmaddwd micro-kernel (AVX2; the remainder and the other SIMD levels use
//    the generic 4 x 2 / 4 x 3 ones). Rows and queries are zero-padded to a multiple of 16.
//  * otherwise (more queries, int16 disabled) float32 blocks (converted first when stored
//    as fp16/bf16) and a 4 x 3 register-blocked FMA micro-kernel: 12 accumulators, 7
//    loads per 12 FMAs.
// A score below the query's current K-th score costs one compare (AVX2 int16: one vector
// compare for 12 scores); only candidates reach the insertion.

namespace SLF_NS {
using namespace slf;

#if SLF_LEVEL == 2
constexpr int W = 16;
using VF = __m512;
static inline VF vzero() { return _mm512_setzero_ps(); }
static inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
static inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
template <int DT> static inline VF vload_dt(const typename In<DT>::T* p) {
    if constexpr (DT == F32) return _mm512_loadu_ps(p);
    else if constexpr (DT == F16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
constexpr int W16 = 32;
using VI = __m512i;
static inline VI vi_zero() { return _mm512_setzero_si512(); }
static inline VI vi_load(const int16_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
static inline VI vi_madd_add(VI acc, VI a, VI b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
static inline int32_t vi_hsum(VI v) { return _mm512_reduce_add_epi32(v); }
// quantise 2*W floats (already scaled) to W16 int16, in order, clamped to +-32767
static inline void quant_store(int16_t* dst, VF a, VF b) {
    __m512i p = _mm512_packs_epi32(_mm512_cvtps_epi32(a), _mm512_cvtps_epi32(b));
    p = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), p);
    _mm512_storeu_si512(reinterpret_cast<void*>(dst), _mm512_max_epi16(p, _mm512_set1_epi16(-32767)));
}
static inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
static inline VF vset1(float v) { return _mm512_set1_ps(v); }
#elif SLF_LEVEL == 1
constexpr int W = 8;
using VF = __m256;
static inline VF vzero() { return _mm256_setzero_ps(); }
static inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
static inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(VF v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
template <int DT> static inline VF vload_dt(const typename In<DT>::T* p) {
    if constexpr (DT == F32) return _mm256_loadu_ps(p);
    else if constexpr (DT == F16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
constexpr int W16 = 16;
using VI = __m256i;
static inline VI vi_zero() { return _mm256_setzero_si256(); }
static inline VI vi_load(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline VI vi_madd_add(VI acc, VI a, VI b) { return _mm256_add_epi32(_mm256_madd_epi16(a, b), acc); }
static inline int32_t vi_hsum(VI v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
static inline void quant_store(int16_t* dst, VF a, VF b) {
    __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
    p = _mm256_permute4x64_epi64(p, 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_max_epi16(p, _mm256_set1_epi16(-32767)));
}
static inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
static inline VF vset1(float v) { return _mm256_set1_ps(v); }
#else
constexpr int W = 1;
using VF = float;
static inline VF vzero() { return 0.0f; }
static inline VF vload(const float* p) { return *p; }
static inline void vstore(float* p, VF v) { *p = v; }
static inline VF vfma(VF a, VF b, VF c) { return a * b + c; }
static inline float hsum(VF v) { return v; }
template <int DT> static inline VF vload_dt(const typename In<DT>::T* p) { return In<DT>::get(p); }
constexpr int W16 = 1;
using VI = int32_t;
static inline VI vi_zero() { return 0; }
static inline VI vi_load(const int16_t* p) { return *p; }
static inline VI vi_madd_add(VI acc, VI a, VI b) { return acc + a * b; }
static inline int32_t vi_hsum(VI v) { return v; }
static inline VF vmul(VF a, VF b) { return a * b; }
static inline VF vset1(float v) { return v; }
#endif

static inline int16_t quant1(float v) {
    float r = std::nearbyint(v);
    if (!(r <= 32767.0f)) r = (r != r) ? 0.0f : 32767.0f;
    if (r < -32767.0f) r = -32767.0f;
    return static_cast<int16_t>(r);
}

// int16 micro-kernel: exact int32 dot products (pairs via madd)
template <int MQ, int MR>
static inline void micro16(const int16_t* __restrict q, int64_t d, const int16_t* __restrict x0,
                           const int16_t* __restrict x1, const int16_t* __restrict x2, int32_t out[4][3]) {
    VI acc[MQ][MR];
#pragma GCC unroll 4
    for (int a = 0; a < MQ; ++a)
#pragma GCC unroll 3
        for (int b = 0; b < MR; ++b) acc[a][b] = vi_zero();
    const int16_t* xr[3] = {x0, x1, x2};
    const int64_t dv = d - d % W16;
    for (int64_t i = 0; i < dv; i += W16) {
        VI xv[MR];
#pragma GCC unroll 3
        for (int b = 0; b < MR; ++b) xv[b] = vi_load(xr[b] + i);
#pragma GCC unroll 4
        for (int a = 0; a < MQ; ++a) {
            VI qv = vi_load(q + a * d + i);
#pragma GCC unroll 3
            for (int b = 0; b < MR; ++b) acc[a][b] = vi_madd_add(acc[a][b], qv, xv[b]);
        }
    }
    for (int a = 0; a < MQ; ++a) {
        for (int b = 0; b < MR; ++b) {
            int32_t s = vi_hsum(acc[a][b]);
            for (int64_t i = dv; i < d; ++i) s += static_cast<int32_t>(q[a * d + i]) * static_cast<int32_t>(xr[b][i]);
            out[a][b] = s;
        }
    }
}

#if SLF_LEVEL == 1
// The hot 4 x 2 int16 kernel in inline assembly: GCC schedules the intrinsic version
// with 8 register-to-register moves per iteration (the madd temporaries), which costs
// ~30% of the front-end bandwidth this loop is bound by. 2 row loads, 8 load+madd,
// 8 adds per 16 components.
static inline void micro16_42(const int16_t* q, int64_t d, const int16_t* x0, const int16_t* x1,
                              int32_t out[4][3]) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m256i t0, t1, t2;
    const int64_t dv = d - d % 16;
    const int16_t *q0 = q, *q1 = q + d, *q2 = q + 2 * d, *q3 = q + 3 * d;
    int64_t i = 0;
    const int64_t nb = dv * 2;
    if (nb > 0) {
        __asm__ volatile(
            "1:\n\t"
            "vmovdqu (%[x0],%[i]), %[t0]\n\t"
            "vmovdqu (%[x1],%[i]), %[t1]\n\t"
            "vpmaddwd (%[q0],%[i]), %[t0], %[t2]\n\t"
            "vpaddd %[t2], %[a0], %[a0]\n\t"
            "vpmaddwd (%[q0],%[i]), %[t1], %[t2]\n\t"
            "vpaddd %[t2], %[a1], %[a1]\n\t"
            "vpmaddwd (%[q1],%[i]), %[t0], %[t2]\n\t"
            "vpaddd %[t2], %[a2], %[a2]\n\t"
            "vpmaddwd (%[q1],%[i]), %[t1], %[t2]\n\t"
            "vpaddd %[t2], %[a3], %[a3]\n\t"
            "vpmaddwd (%[q2],%[i]), %[t0], %[t2]\n\t"
            "vpaddd %[t2], %[a4], %[a4]\n\t"
            "vpmaddwd (%[q2],%[i]), %[t1], %[t2]\n\t"
            "vpaddd %[t2], %[a5], %[a5]\n\t"
            "vpmaddwd (%[q3],%[i]), %[t0], %[t2]\n\t"
            "vpaddd %[t2], %[a6], %[a6]\n\t"
            "vpmaddwd (%[q3],%[i]), %[t1], %[t2]\n\t"
            "vpaddd %[t2], %[a7], %[a7]\n\t"
            "add $32, %[i]\n\t"
            "cmp %[nb], %[i]\n\t"
            "jl 1b\n\t"
            : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [a4] "+x"(a4), [a5] "+x"(a5),
              [a6] "+x"(a6), [a7] "+x"(a7), [t0] "=&x"(t0), [t1] "=&x"(t1), [t2] "=&x"(t2), [i] "+r"(i)
            : [x0] "r"(x0), [x1] "r"(x1), [q0] "r"(q0), [q1] "r"(q1), [q2] "r"(q2), [q3] "r"(q3), [nb] "r"(nb)
            : "cc", "memory");
    }
    const __m256i acc[4][2] = {{a0, a1}, {a2, a3}, {a4, a5}, {a6, a7}};
    const int16_t* xr[2] = {x0, x1};
    for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 2; ++b) {
            int32_t s = vi_hsum(acc[a][b]);
            for (int64_t j = dv; j < d; ++j) s += static_cast<int32_t>(q[a * d + j]) * static_cast<int32_t>(xr[b][j]);
            out[a][b] = s;
        }
    }
}

// The main int16 tile, 6 queries x 2 rows: per 16 components 2 row loads feed 12
// vpmaddwd (each query read from L1 as the memory operand, twice) + 12 vpaddd; the 4 x 2
// kernel above does 8. All 16 ymm registers are used (12 accumulators, 2 rows, 2 madd
// temporaries; a register-held query with one temporary measured a few % slower, the
// fewer instructions of the load-op form win). Zen 3 issues vpmaddwd on two pipes and
// vpaddd on all four, so the loop is bound by those 24 vector ops. Pointers are passed at
// their row ends and the byte index counts up from -2*dp to 0 (one add + jnz per
// iteration). dp must be a positive multiple of 16 (rows and queries are zero-padded).
// The 12 sums come back reduced: s8 = (q0r0, q0r1, q1r0, q1r1, q2r0, q2r1, q3r0, q3r1),
// s4 = (q4r0, q4r1, q5r0, q5r1).
static inline void micro16_62(const int16_t* q, int64_t dp, const int16_t* x0, const int16_t* x1,
                              __m256i* s8, __m128i* s4) {
    __m256i a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;  // zeroed in the asm (operand limit)
    __m256i t0, t1, r0, r1;
    int64_t i = -2 * dp;
    const int16_t *e0 = x0 + dp, *e1 = x1 + dp, *f0 = q + dp, *f1 = q + 2 * dp, *f2 = q + 3 * dp,
                  *f3 = q + 4 * dp, *f4 = q + 5 * dp, *f5 = q + 6 * dp;
    __asm__ volatile(
        "vpxor %[a0], %[a0], %[a0]\n\t"
        "vpxor %[a1], %[a1], %[a1]\n\t"
        "vpxor %[a2], %[a2], %[a2]\n\t"
        "vpxor %[a3], %[a3], %[a3]\n\t"
        "vpxor %[a4], %[a4], %[a4]\n\t"
        "vpxor %[a5], %[a5], %[a5]\n\t"
        "vpxor %[a6], %[a6], %[a6]\n\t"
        "vpxor %[a7], %[a7], %[a7]\n\t"
        "vpxor %[a8], %[a8], %[a8]\n\t"
        "vpxor %[a9], %[a9], %[a9]\n\t"
        "vpxor %[a10], %[a10], %[a10]\n\t"
        "vpxor %[a11], %[a11], %[a11]\n\t"
        "1:\n\t"
        "vmovdqu (%[e0],%[i]), %[r0]\n\t"
        "vmovdqu (%[e1],%[i]), %[r1]\n\t"
        "vpmaddwd (%[f0],%[i]), %[r0], %[t0]\n\t"
        "vpmaddwd (%[f0],%[i]), %[r1], %[t1]\n\t"
        "vpaddd %[t0], %[a0], %[a0]\n\t"
        "vpaddd %[t1], %[a1], %[a1]\n\t"
        "vpmaddwd (%[f1],%[i]), %[r0], %[t0]\n\t"
        "vpmaddwd (%[f1],%[i]), %[r1], %[t1]\n\t"
        "vpaddd %[t0], %[a2], %[a2]\n\t"
        "vpaddd %[t1], %[a3], %[a3]\n\t"
        "vpmaddwd (%[f2],%[i]), %[r0], %[t0]\n\t"
        "vpmaddwd (%[f2],%[i]), %[r1], %[t1]\n\t"
        "vpaddd %[t0], %[a4], %[a4]\n\t"
        "vpaddd %[t1], %[a5], %[a5]\n\t"
        "vpmaddwd (%[f3],%[i]), %[r0], %[t0]\n\t"
        "vpmaddwd (%[f3],%[i]), %[r1], %[t1]\n\t"
        "vpaddd %[t0], %[a6], %[a6]\n\t"
        "vpaddd %[t1], %[a7], %[a7]\n\t"
        "vpmaddwd (%[f4],%[i]), %[r0], %[t0]\n\t"
        "vpmaddwd (%[f4],%[i]), %[r1], %[t1]\n\t"
        "vpaddd %[t0], %[a8], %[a8]\n\t"
        "vpaddd %[t1], %[a9], %[a9]\n\t"
        "vpmaddwd (%[f5],%[i]), %[r0], %[t0]\n\t"
        "vpmaddwd (%[f5],%[i]), %[r1], %[t1]\n\t"
        "vpaddd %[t0], %[a10], %[a10]\n\t"
        "vpaddd %[t1], %[a11], %[a11]\n\t"
        "add $32, %[i]\n\t"
        "jnz 1b\n\t"
        : [a0] "=&x"(a0), [a1] "=&x"(a1), [a2] "=&x"(a2), [a3] "=&x"(a3), [a4] "=&x"(a4), [a5] "=&x"(a5),
          [a6] "=&x"(a6), [a7] "=&x"(a7), [a8] "=&x"(a8), [a9] "=&x"(a9), [a10] "=&x"(a10), [a11] "=&x"(a11),
          [t0] "=&x"(t0), [t1] "=&x"(t1), [r0] "=&x"(r0), [r1] "=&x"(r1), [i] "+r"(i)
        : [e0] "r"(e0), [e1] "r"(e1), [f0] "r"(f0), [f1] "r"(f1), [f2] "r"(f2), [f3] "r"(f3), [f4] "r"(f4),
          [f5] "r"(f5)
        : "cc", "memory");
    // horizontal sums, 8 at a time: hadd pairs lanes within 128-bit halves; after two
    // levels each half holds the partial sums of 4 accumulators, added across halves
    const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7));
    *s8 = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
    const __m256i g2 = _mm256_hadd_epi32(_mm256_hadd_epi32(a8, a9), _mm256_hadd_epi32(a10, a11));
    *s4 = _mm_add_epi32(_mm256_castsi256_si128(g2), _mm256_extracti128_si256(g2, 1));
}

// ---- int8 pre-filter of the int16 pass (AVX2) ------------------------------------------
// For every (query, row) pair the int16 pass computes D16 = q16 . x16 exactly and keeps
// the score fl(D16) * 2^-30 only if it reaches the query's current K-th score. The
// pre-filter approximates q16 ~ Sq q8 (q8 in [-64, 64], per-query scale Sq) and
// x16 ~ Sx x8 (x8 in [-63, 63], per-row scale Sx), so that by Cauchy-Schwarz
//   D16 = Sq Sx (q8 . x8) + (q16 - Sq q8) . x16 + Sq q8 . (x16 - Sx x8)
//       <= Sq Sx (q8 . x8) + |q16 - Sq q8| |x16| + |Sq q8| |x16 - Sx x8|  =: UB,
// with every norm measured on the actual rounded integers (not a worst case). A pair
// whose UB * 2^-30 (plus a slack covering the float32 arithmetic of the test) is below
// the K-th score cannot enter the list (rounding is monotone), so it is skipped; the
// others get their exact int16 dot and go through the usual offer. The candidate lists
// are therefore identical, bit for bit, to those of the plain int16 pass.
// The int8 dots use vpmaddubsw (unsigned x signed bytes, pairs added into int16): the
// rows are stored unsigned as x8 + 64 in [1, 127], the queries signed; two steps of
// |2 * 127 * 64| = 16256 add to at most 32512 in int16 without saturation before vpmaddwd
// by ones widens them to int32: 5 vector ops per 64 multiply-adds and pair (int16: 4 per 32).
// The offset adds 64 * sum(q8) to each dot, subtracted afterwards (q8c).

// int8 4 x 2 tile: raw dots (with the row offset) s8 = (q0r0, q0r1, q1r0, q1r1, ..., q3r1).
// dp8 is a positive multiple of 64; pointers are passed at their starts.
static inline void micro8_42(const int8_t* q, int64_t dp8, const uint8_t* x0, const uint8_t* x1, __m256i* s8) {
    __m256i a0, a1, a2, a3, a4, a5, a6, a7;
    __m256i t0, t1, r0, r1, r2, r3;
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t i = -dp8;
    const uint8_t *e0 = x0 + dp8, *e1 = x1 + dp8;
    const int8_t *f0 = q + dp8, *f1 = q + 2 * dp8, *f2 = q + 3 * dp8, *f3 = q + 4 * dp8;
#define SLF_P8(F, RA, RB, A)                              \
    "vpmaddubsw (%[" F "],%[i]), %[" RA "], %[t0]\n\t"    \
    "vpmaddubsw 32(%[" F "],%[i]), %[" RB "], %[t1]\n\t"  \
    "vpaddw %[t1], %[t0], %[t0]\n\t"                      \
    "vpmaddwd %[ones], %[t0], %[t0]\n\t"                  \
    "vpaddd %[t0], %[" A "], %[" A "]\n\t"
    __asm__ volatile(
        "vpxor %[a0], %[a0], %[a0]\n\t"
        "vpxor %[a1], %[a1], %[a1]\n\t"
        "vpxor %[a2], %[a2], %[a2]\n\t"
        "vpxor %[a3], %[a3], %[a3]\n\t"
        "vpxor %[a4], %[a4], %[a4]\n\t"
        "vpxor %[a5], %[a5], %[a5]\n\t"
        "vpxor %[a6], %[a6], %[a6]\n\t"
        "vpxor %[a7], %[a7], %[a7]\n\t"
        "1:\n\t"
        "vmovdqu (%[e0],%[i]), %[r0]\n\t"
        "vmovdqu 32(%[e0],%[i]), %[r1]\n\t"
        "vmovdqu (%[e1],%[i]), %[r2]\n\t"
        "vmovdqu 32(%[e1],%[i]), %[r3]\n\t"
        SLF_P8("f0", "r0", "r1", "a0")
        SLF_P8("f0", "r2", "r3", "a1")
        SLF_P8("f1", "r0", "r1", "a2")
        SLF_P8("f1", "r2", "r3", "a3")
        SLF_P8("f2", "r0", "r1", "a4")
        SLF_P8("f2", "r2", "r3", "a5")
        SLF_P8("f3", "r0", "r1", "a6")
        SLF_P8("f3", "r2", "r3", "a7")
        "add $64, %[i]\n\t"
        "jnz 1b\n\t"
        : [a0] "=&x"(a0), [a1] "=&x"(a1), [a2] "=&x"(a2), [a3] "=&x"(a3), [a4] "=&x"(a4), [a5] "=&x"(a5),
          [a6] "=&x"(a6), [a7] "=&x"(a7), [t0] "=&x"(t0), [t1] "=&x"(t1), [r0] "=&x"(r0), [r1] "=&x"(r1),
          [r2] "=&x"(r2), [r3] "=&x"(r3), [i] "+r"(i)
        : [e0] "r"(e0), [e1] "r"(e1), [f0] "r"(f0), [f1] "r"(f1), [f2] "r"(f2), [f3] "r"(f3), [ones] "x"(ones)
        : "cc", "memory");
#undef SLF_P8
    const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7));
    *s8 = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
}

// relative round-off allowance for a float32 sum of n non-negative terms (and its sqrt)
static inline double sum_slack(int64_t n) { return 1.0 + static_cast<double>(n + 8) * 0x1p-23; }

// int8 rows from the int16 block: xq [nr, dp8] bytes (x8 + 64, padding 64), and per row
// xb = Sx 2^-15 (NaN for a non-finite row: its bound is NaN and never passes),
// xn >= |x16| 2^-15, xe >= |x16 - Sx x8| 2^-15.
static void quantise_rows8(const int16_t* qbuf, int64_t nr, int64_t dp, int64_t dp8, const float* fac, uint8_t* xq,
                           float* xb, float* xn, float* xe) {
    const float sl = static_cast<float>(sum_slack(dp));
    for (int64_t r = 0; r < nr; ++r) {
        const int16_t* src = qbuf + r * dp;
        uint8_t* dst = xq + r * dp8;
        __m256i mx = _mm256_setzero_si256();
        for (int64_t i = 0; i < dp; i += 16)
            mx = _mm256_max_epi16(mx, _mm256_abs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
        __m128i m = _mm_max_epi16(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
        m = _mm_max_epi16(m, _mm_shuffle_epi32(m, 0x4e));
        m = _mm_max_epi16(m, _mm_shuffle_epi32(m, 0xb1));
        m = _mm_max_epi16(m, _mm_shufflelo_epi16(m, 0xb1));
        const int amax = _mm_extract_epi16(m, 0) & 0xffff;  // <= 32767
        const float S = amax > 0 ? static_cast<float>(amax) / 63.0f : 0.0f;  // x16 ~ S x8
        const float invS = amax > 0 ? 1.0f / S : 0.0f;
        const __m256 vS = _mm256_set1_ps(S), vi = _mm256_set1_ps(invS);
        const __m256i lo = _mm256_set1_epi32(-63), hi = _mm256_set1_epi32(63);
        __m256 nn = _mm256_setzero_ps(), ee = _mm256_setzero_ps();
        for (int64_t i = 0; i < dp; i += 16) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
            const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
            const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
            const __m256i k0 = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(f0, vi))));
            const __m256i k1 = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(f1, vi))));
            // residuals x16 - S x8 (one rounding each; covered by the slack factor)
            const __m256 d0 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(k0), vS, f0);
            const __m256 d1 = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(k1), vS, f1);
            ee = _mm256_fmadd_ps(d0, d0, _mm256_fmadd_ps(d1, d1, ee));
            nn = _mm256_fmadd_ps(f0, f0, _mm256_fmadd_ps(f1, f1, nn));
            __m256i p = _mm256_packs_epi32(k0, k1);  // int16, lanes (k0 0-3, k1 0-3, k0 4-7, k1 4-7)
            p = _mm256_permute4x64_epi64(p, 0xD8);
            p = _mm256_add_epi16(p, _mm256_set1_epi16(64));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                             _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
        }
        std::memset(dst + dp, 64, static_cast<size_t>(dp8 - dp));
        const double ns = hsum(nn), es = hsum(ee);
        // residuals: one fused rounding each (relative 2^-24, inside the slack factor);
        // an absolute 2^-9 sqrt(dp) (x16 units) on top, as a margin
        xn[r] = static_cast<float>(std::sqrt(ns * sl) * sl * 0x1p-15);
        xe[r] = static_cast<float>((std::sqrt(es * sl) * sl + 0x1p-9 * std::sqrt(static_cast<double>(dp))) * 0x1p-15);
        xb[r] = fac[r] == fac[r] ? S * 0x1p-15f : std::numeric_limits<float>::quiet_NaN();
    }
}

// exact int16 dot of one query with one row (both zero-padded to dp, a multiple of 16)
static inline int32_t dot16(const int16_t* q, const int16_t* x, int64_t dp) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    int64_t i = 0;
    for (; i + 32 <= dp; i += 32) {
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(vi_load(q + i), vi_load(x + i)));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(vi_load(q + i + 16), vi_load(x + i + 16)));
    }
    if (i < dp) a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(vi_load(q + i), vi_load(x + i)));
    return vi_hsum(_mm256_add_epi32(a0, a1));
}

// slack (cosine units) of the filter test: float32 rounding of the bound's terms
// (products and sums of values <= ~2 in magnitude, relative 2^-24 each) and of the scale
// S = amax / 63 used on both sides (exact identity, no error); generous
constexpr float FILTER8_SLACK = 0x1p-14f;
#endif

typedef void (*Micro16Fn)(const int16_t*, int64_t, const int16_t*, const int16_t*, const int16_t*, int32_t[4][3]);

static Micro16Fn micro16_table(int mq, int mr) {
    static const Micro16Fn t[4][3] = {
        {micro16<1, 1>, micro16<1, 2>, micro16<1, 3>},
        {micro16<2, 1>, micro16<2, 2>, micro16<2, 3>},
        {micro16<3, 1>, micro16<3, 2>, micro16<3, 3>},
        {micro16<4, 1>, micro16<4, 2>, micro16<4, 3>},
    };
    return t[mq - 1][mr - 1];
}

// record a row whose squared norm is not finite (NaN/inf values, or overflow)
static void note_bad(const SimArgs& a, int64_t id) {
#pragma omp critical(slf_sim_bad)
    {
        if (*a.n_bad < a.max_bad) a.bad[*a.n_bad] = id;
        *a.n_bad += 1;
    }
}

// ---- rows outside the float32-safe range ------------------------------------------
// The float32 passes (fused, blocked, int16 quantisation) and their error bounds assume
// that no square underflows or overflows: the bounds are relative to |x|, while an
// underflowing product loses up to 2^-150 absolutely (a row of 1e-30s has squares below
// the smallest denormal: its float32 norm is 0) and an overflowing square makes the norm
// inf (values beyond ~1.8e19). A row whose float32 squared norm is not in
// [SAFE_SQ_MIN, FLT_MAX] is therefore rescored from a copy scaled by a power of two (exact
// for every component not far below the largest) so that its largest |x_i| lies in
// [1, 2): its squared norm is then in [1, 4 d) and the usual bounds hold; cosines are
// scale-invariant. At SAFE_SQ_MIN = 2^-96 (|x| >= 2^-48) the absolute underflow error of
// the sums, at most 2 d 2^-150, is below d 2^-102 relative to |x|, far inside the bounds'
// slack; and a finite float32 sum of squares had no overflowing partial sum. Costs one
// compare per row; only such rows (and all-zero rows) take the scalar rescaling pass.
constexpr float SAFE_SQ_MIN = 0x1p-96f;

static inline bool unsafe_sq(float ss) { return !(ss >= SAFE_SQ_MIN && ss <= std::numeric_limits<float>::max()); }

enum RowKind : int { ROW_SCALED = 0, ROW_ZERO = 1, ROW_NONFINITE = 2 };

// dst[0..d) = src * 2^e (as float32) with the largest |dst_i| in [1, 2)
template <int DT>
static int rescale_row(const typename In<DT>::T* src, int64_t d, float* dst) {
    float m = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < d; ++i) {
        const float v = In<DT>::get(src + i);
        finite &= std::isfinite(v);
        m = std::max(m, std::fabs(v));
    }
    if (!finite) return ROW_NONFINITE;
    if (m == 0.0f) return ROW_ZERO;
    const double sc = std::ldexp(1.0, -std::ilogb(m));  // exact power of two, up to 2^149
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(static_cast<double>(In<DT>::get(src + i)) * sc);
    return ROW_SCALED;
}

// float32 squared norm of one row; four independent accumulators so the FMA latency
// (4 cycles) does not bound the loop. Any summation order is covered by the error bound.
template <int DT>
static inline float sqnorm(const typename In<DT>::T* src, int64_t d) {
    int64_t i = 0;
    float ss = 0.0f;
#if SLF_LEVEL > 0
    VF n0 = vzero(), n1 = vzero(), n2 = vzero(), n3 = vzero();
    for (; i + 4 * W <= d; i += 4 * W) {
        const VF v0 = vload_dt<DT>(src + i), v1 = vload_dt<DT>(src + i + W);
        const VF v2 = vload_dt<DT>(src + i + 2 * W), v3 = vload_dt<DT>(src + i + 3 * W);
        n0 = vfma(v0, v0, n0); n1 = vfma(v1, v1, n1); n2 = vfma(v2, v2, n2); n3 = vfma(v3, v3, n3);
    }
    for (; i + W <= d; i += W) { const VF v = vload_dt<DT>(src + i); n0 = vfma(v, v, n0); }
    ss = hsum(n0) + hsum(n1) + (hsum(n2) + hsum(n3));
#endif
    for (; i < d; ++i) { const float v = In<DT>::get(src + i); ss += v * v; }
    return ss;
}

// int16 mode: quantise the rows [r0, r0 + nr) into qbuf [nr, dp] (zero-padded to dp),
// one row at a time: its norm (the row comes from memory) and then its quantisation
// (the row is still in L1). fac[r] = 2^-30, the scale of the int32 dot products, or
// NaN for a row whose norm is not finite (its scores become NaN and are never kept).
// one row scaled by sc and rounded to int16 (zero-padded to dp)
template <int DT>
static inline void quant_row(const typename In<DT>::T* src, int64_t d, int64_t dp, float sc, int16_t* dst) {
    int64_t i = 0;
#if SLF_LEVEL > 0
    const VF vs = vset1(sc);
    for (; i + 2 * W <= d; i += 2 * W)
        quant_store(dst + i, vmul(vload_dt<DT>(src + i), vs), vmul(vload_dt<DT>(src + i + W), vs));
#endif
    for (; i < d; ++i) dst[i] = quant1(In<DT>::get(src + i) * sc);
    for (; i < dp; ++i) dst[i] = 0;
}

// rbuf: d floats of scratch for rows outside the safe range (see rescale_row)
template <int DT>
static void quantise_rows(const SimArgs& a, int64_t r0, int64_t nr, int64_t dp, int16_t* qbuf, float* fac, float* rbuf) {
    using T = typename In<DT>::T;
    const T* x = static_cast<const T*>(a.x);
    const int64_t d = a.d;
    for (int64_t r = 0; r < nr; ++r) {
        const T* src = x + (r0 + r) * a.xs;
        int16_t* dst = qbuf + r * dp;
        const float ss = sqnorm<DT>(src, d);
        fac[r] = 9.313225746154785e-10f;  // 2^-30
        if (__builtin_expect(!unsafe_sq(ss), 1)) {
            quant_row<DT>(src, d, dp, (1.0f / std::sqrt(ss)) * 32768.0f, dst);
            continue;
        }
        const int kind = rescale_row<DT>(src, d, rbuf);
        if (kind == ROW_SCALED) {
            quant_row<F32>(rbuf, d, dp, (1.0f / std::sqrt(sqnorm<F32>(rbuf, d))) * 32768.0f, dst);
            continue;
        }
        if (kind == ROW_NONFINITE) {
            note_bad(a, r0 + r);
            fac[r] = std::numeric_limits<float>::quiet_NaN();
        }
        std::memset(dst, 0, sizeof(int16_t) * static_cast<size_t>(dp));  // zero row: scores 0
    }
}

// dot products of MQ queries (rows of q, stride d) with MR database rows (x0, x1, x2)
template <int MQ, int MR>
static inline void micro(const float* __restrict q, int64_t d, const float* __restrict x0,
                         const float* __restrict x1, const float* __restrict x2, float out[4][3]) {
    VF acc[MQ][MR];
#pragma GCC unroll 4
    for (int a = 0; a < MQ; ++a)
#pragma GCC unroll 3
        for (int b = 0; b < MR; ++b) acc[a][b] = vzero();
    const float* xr[3] = {x0, x1, x2};
    const int64_t dv = d - d % W;
    for (int64_t i = 0; i < dv; i += W) {
        VF xv[MR];
#pragma GCC unroll 3
        for (int b = 0; b < MR; ++b) xv[b] = vload(xr[b] + i);
#pragma GCC unroll 4
        for (int a = 0; a < MQ; ++a) {
            VF qv = vload(q + a * d + i);
#pragma GCC unroll 3
            for (int b = 0; b < MR; ++b) acc[a][b] = vfma(qv, xv[b], acc[a][b]);
        }
    }
    for (int a = 0; a < MQ; ++a) {
        for (int b = 0; b < MR; ++b) {
            float s = hsum(acc[a][b]);
            for (int64_t i = dv; i < d; ++i) s += q[a * d + i] * xr[b][i];
            out[a][b] = s;
        }
    }
}

typedef void (*MicroFn)(const float*, int64_t, const float*, const float*, const float*, float[4][3]);

static MicroFn micro_table(int mq, int mr) {
    static const MicroFn t[4][3] = {
        {micro<1, 1>, micro<1, 2>, micro<1, 3>},
        {micro<2, 1>, micro<2, 2>, micro<2, 3>},
        {micro<3, 1>, micro<3, 2>, micro<3, 3>},
        {micro<4, 1>, micro<4, 2>, micro<4, 3>},
    };
    return t[mq - 1][mr - 1];
}

// Small Q (1..8 queries): dots and squared norm of one row in one pass straight from the
// storage (no conversion buffer, no separate norm pass): the scan is bandwidth-bound.
// One row at a time keeps the reads a single sequential stream: two interleaved row
// streams (the previous 1 x 2 kernel) reached only ~10 GB/s per thread against ~18 for
// one stream (likely the hardware prefetcher retraining at each 4 KiB page; software
// prefetching did not help). With 1..3 queries two sets of accumulators (even / odd
// vectors) hide the FMA latency; from 4 queries on there are enough chains already.
template <int DT, int MQ>
static void micro_fused(const float* __restrict q, int64_t d, const typename In<DT>::T* __restrict x,
                        float out[8], float* ss) {
    constexpr int U = MQ <= 3 ? 2 : 1;
    VF acc[U][MQ], nrm[U];
    for (int u = 0; u < U; ++u) {
        nrm[u] = vzero();
        for (int a = 0; a < MQ; ++a) acc[u][a] = vzero();
    }
    int64_t i = 0;
    for (; i + U * W <= d; i += U * W) {
#pragma GCC unroll 2
        for (int u = 0; u < U; ++u) {
            const VF v = vload_dt<DT>(x + i + u * W);
            nrm[u] = vfma(v, v, nrm[u]);
#pragma GCC unroll 8
            for (int a = 0; a < MQ; ++a) acc[u][a] = vfma(vload(q + a * d + i + u * W), v, acc[u][a]);
        }
    }
    const int64_t iv = i;
    float n = 0.0f;
    for (int u = 0; u < U; ++u) n += hsum(nrm[u]);
    for (; i < d; ++i) { const float v = In<DT>::get(x + i); n += v * v; }
    *ss = n;
    for (int a = 0; a < MQ; ++a) {
        float s = 0.0f;
        for (int u = 0; u < U; ++u) s += hsum(acc[u][a]);
        for (i = iv; i < d; ++i) s += q[a * d + i] * In<DT>::get(x + i);
        out[a] = s;
    }
}

constexpr int FUSED_MAX_Q = 8;

template <int DT>
using FusedFn = void (*)(const float*, int64_t, const typename In<DT>::T*, float[8], float*);

template <int DT>
static FusedFn<DT> fused_table(int mq) {
    static const FusedFn<DT> t[FUSED_MAX_Q] = {micro_fused<DT, 1>, micro_fused<DT, 2>, micro_fused<DT, 3>,
                                               micro_fused<DT, 4>, micro_fused<DT, 5>, micro_fused<DT, 6>,
                                               micro_fused<DT, 7>, micro_fused<DT, 8>};
    return t[mq - 1];
}

// Block of rows as float32 (converted into buf unless already float32) + inverse norms.
// Returns the row pointer base and stride; inv[r] = 1/|x_r| (0 for a zero row, NaN for
// a row whose squared norm is not finite).
template <int DT>
static const float* prepare_block(const SimArgs& a, int64_t r0, int64_t nr, float* buf, float* inv,
                                  int64_t* stride) {
    using T = typename In<DT>::T;
    const T* x = static_cast<const T*>(a.x);
    const int64_t d = a.d;
    const int64_t dv = d - d % W;
    const bool direct = DT == F32;
    bool rescue = false;  // a row outside the safe range: the block goes through buf
    for (int64_t r = 0; r < nr; ++r) {
        const T* src = x + (r0 + r) * a.xs;
        float* dst = buf + r * d;
        VF acc = vzero();
        for (int64_t i = 0; i < dv; i += W) {
            VF v = vload_dt<DT>(src + i);
            if (!direct) vstore(dst + i, v);
            acc = vfma(v, v, acc);
        }
        float ss = hsum(acc);
        for (int64_t i = dv; i < d; ++i) {
            float v = In<DT>::get(src + i);
            if (!direct) dst[i] = v;
            ss += v * v;
        }
        if (__builtin_expect(unsafe_sq(ss), 0)) {
            rescue = true;
            inv[r] = -1.0f;  // marks the row for the pass below
        } else {
            inv[r] = 1.0f / std::sqrt(ss);
        }
    }
    if (direct && !rescue) {
        *stride = a.xs;
        return reinterpret_cast<const float*>(x) + r0 * a.xs;
    }
    for (int64_t r = 0; r < nr; ++r) {
        float* dst = buf + r * d;
        const T* src = x + (r0 + r) * a.xs;
        if (inv[r] >= 0.0f) {
            if (direct) std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(d));
            continue;
        }
        const int kind = rescale_row<DT>(src, d, dst);
        if (kind == ROW_SCALED) {
            inv[r] = 1.0f / std::sqrt(sqnorm<F32>(dst, d));
        } else {
            std::memset(dst, 0, sizeof(float) * static_cast<size_t>(d));
            inv[r] = 0.0f;  // zero row
            if (kind == ROW_NONFINITE) {
                inv[r] = std::numeric_limits<float>::quiet_NaN();
                note_bad(a, r0 + r);
            }
        }
    }
    *stride = d;
    return buf;
}

// the library's entry order and sorted insertion come from common.h (better, insert_entry);
// similarity lists carry no positions
static inline void insert(float* v, int64_t* ids, int64_t K, float s, int64_t id) {
    insert_entry(v, ids, nullptr, K, s, id, 0);
}

// Offer the approximate score s of row id to query qi: one compare unless it beats the
// query's current K-th score (thr[qi]); NaN (non-finite rows) never passes.
// Large K (a.pend): candidates of a query wait in its pending buffer and are merged
// into its list in one pass when the buffer is full (and at the end of every range).
static void flush_query(const SimArgs& a, int64_t qi, float* tv, int64_t* ti, float* thr) {
    const int64_t K = a.K;
    merge_candidates(tv + qi * K, ti + qi * K, nullptr, K, a.pend + qi * a.pend_cap, a.pend_n[qi], a.mtv, a.mti, nullptr);
    a.pend_n[qi] = 0;
    thr[qi] = std::max(thr[qi], tv[qi * K + K - 1]);
}

static void flush_all(const SimArgs& a, float* tv, int64_t* ti, float* thr) {
    if (a.pend == nullptr) return;
    for (int64_t qi = 0; qi < a.Q; ++qi)
        if (a.pend_n[qi] > 0) flush_query(a, qi, tv, ti, thr);
}

static inline void offer(const SimArgs& a, int64_t qi, int64_t id, float s, float* tv, int64_t* ti, float* thr) {
    if (!(s >= thr[qi])) return;
    if (a.excl != nullptr) {
        bool skip = false;
        for (int64_t j = 0; j < a.m; ++j) skip |= (a.excl[qi * a.m + j] == id);
        if (skip) return;
    }
    const int64_t K = a.K;
    if (a.pend != nullptr) {
        const int64_t K1 = qi * K + K - 1;
        if (!better(s, id, tv[K1], ti[K1])) return;
        a.pend[qi * a.pend_cap + a.pend_n[qi]++] = Cand{s, 0, id};
        if (a.pend_n[qi] == a.pend_cap) flush_query(a, qi, tv, ti, thr);
        return;
    }
    insert(tv + qi * K, ti + qi * K, K, s, id);
    // thr may already be above the own K-th score (taken from the shared thresholds)
    thr[qi] = std::max(thr[qi], tv[qi * K + K - 1]);
}

// Shared thresholds (a.sthr): raised with a relaxed compare-and-swap maximum, read
// once per row block. A thread skips a row only when its score is below the K-th score
// some thread already holds, so the merged lists are the same as without sharing. It
// saves little (5 % fewer int8-filter passes at N = 10^6, Q = 1024): the offers that pass
// come from the whole scan, not only from a thread's first rows.
static inline float shared_load(const float* p) {
    float v;
    __atomic_load(p, &v, __ATOMIC_RELAXED);
    return v;
}

static inline void shared_raise(float* p, float v) {
    float cur = shared_load(p);
    while (v > cur && !__atomic_compare_exchange(p, &cur, &v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void publish_thresholds(const SimArgs& a, const float* tv) {
    const int64_t K = a.K;
    for (int64_t qi = 0; qi < a.Q; ++qi) {
        const float own = tv[qi * K + K - 1];
        if (own > shared_load(a.sthr + qi)) shared_raise(a.sthr + qi, own);
    }
}

static inline int64_t pad16(int64_t d) { return (d + 15) / 16 * 16; }

// int16 tile of mq <= 4 queries (from qg) x mr <= 3 block rows (from r), generic kernels.
static void tile16(const SimArgs& a, int64_t dp, int64_t qg, int mq, const int16_t* qbuf, int64_t r, int mr,
                   const float* fac, int64_t rb, float* tv, int64_t* ti, float* thr) {
    int32_t o[4][3];
    const int16_t* qp = a.q16 + qg * dp;
    const int16_t* x0 = qbuf + r * dp;
    const int16_t* x1 = mr > 1 ? x0 + dp : x0;
    const int16_t* x2 = mr > 2 ? x0 + 2 * dp : x0;
#if SLF_LEVEL == 1
    if (mq == 4 && mr == 2) micro16_42(qp, dp, x0, x1, o);
    else
#endif
        micro16_table(mq, mr)(qp, dp, x0, x1, x2, o);
    for (int qq = 0; qq < mq; ++qq)
        for (int rr = 0; rr < mr; ++rr)
            offer(a, qg + qq, rb + r + rr, static_cast<float>(o[qq][rr]) * fac[r + rr], tv, ti, thr);
}

// int16 mode, one block of rows [rb, rb + nr): quantise it, then run every query group
// over it (queries L1-resident, the block L2-resident).
struct Buf8 {
    uint8_t* xq = nullptr;  // [RB, dp8] int8 rows (+64)
    float* xb = nullptr;    // [RB + 2] per-row filter terms
    float* xn = nullptr;
    float* xe = nullptr;
    int32_t* s8 = nullptr;  // [RB / 2, 8] raw int8 dots of one query group (32-byte aligned)
};

template <int DT>
static void block16(const SimArgs& a, int64_t rb, int64_t nr, int16_t* qbuf, float* fac, float* tv, int64_t* ti,
                    float* thr, const Buf8& b8, float* rbuf) {
    const int64_t Q = a.Q, dp = pad16(a.d);
    quantise_rows<DT>(a, rb, nr, dp, qbuf, fac, rbuf);
    int64_t qg = 0;
#if SLF_LEVEL == 1
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    if (a.q8 != nullptr && dp > 0) {
        // int8 pre-filter (see filter comment above micro8_42): same candidate lists
        const int64_t dp8 = a.dp8;
        quantise_rows8(qbuf, nr, dp, dp8, fac, b8.xq, b8.xb, b8.xn, b8.xe);
        const __m256 slack = _mm256_set1_ps(FILTER8_SLACK);
        for (; qg + 4 <= Q; qg += 4) {
            const __m256 adup = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(a.q8a + qg)), dup);
            const __m256 edup = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(a.q8e + qg)), dup);
            const __m256 bdup = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(a.q8b + qg)), dup);
            const __m256i cdup = _mm256_permutevar8x32_epi32(
                _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q8c + qg))), dup);
            const int8_t* qp = a.q8 + qg * dp8;
            // the int16 rows of these 4 queries serve the pairs that pass the filter: fetch
            // them into L2 while the strip's tiles run (1024 queries hold 1 MiB of them)
            for (int64_t o = 0; o < 4 * dp; o += 32)
                _mm_prefetch(reinterpret_cast<const char*>(a.q16 + qg * dp + o), _MM_HINT_T1);
            // every tile of the strip first, then the bound test of the whole strip: the
            // test's dependency chain and its rarely taken branch stay out of the dot loop
            const int64_t np = nr / 2;
            for (int64_t j = 0; j < np; ++j)
                micro8_42(qp, dp8, b8.xq + 2 * j * dp8, b8.xq + (2 * j + 1) * dp8,
                          reinterpret_cast<__m256i*>(b8.s8 + 8 * j));
            __m256 t8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(thr + qg)), dup);
            for (int64_t j = 0; j < np; ++j) {
                const int64_t r = 2 * j;
                const __m256i s8 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b8.s8 + 8 * j));
                double w;
                std::memcpy(&w, b8.xb + r, sizeof w);
                const __m256 xb2 = _mm256_castpd_ps(_mm256_set1_pd(w));
                std::memcpy(&w, b8.xn + r, sizeof w);
                const __m256 xn2 = _mm256_castpd_ps(_mm256_set1_pd(w));
                std::memcpy(&w, b8.xe + r, sizeof w);
                const __m256 xe2 = _mm256_castpd_ps(_mm256_set1_pd(w));
                const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s8, cdup)), adup);
                const __m256 ub = _mm256_fmadd_ps(p, xb2, _mm256_fmadd_ps(edup, xn2, _mm256_fmadd_ps(bdup, xe2, slack)));
                unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(ub, t8, _CMP_GE_OQ)));
                if (m == 0) continue;
                for (; m != 0; m &= m - 1) {  // lane b: query qg + b / 2, row r + b % 2
                    const int b = __builtin_ctz(m);
                    const int64_t qi = qg + b / 2, rr = r + (b & 1);
                    const int32_t dot = dot16(a.q16 + qi * dp, qbuf + rr * dp, dp);
                    offer(a, qi, rb + rr, static_cast<float>(dot) * fac[rr], tv, ti, thr);
                }
                t8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(thr + qg)), dup);
            }
            const int64_t r = 2 * np;
            if (r < nr) tile16(a, dp, qg, 4, qbuf, r, 1, fac, rb, tv, ti, thr);  // odd last row
        }
    }
    for (; dp > 0 && qg + 6 <= Q; qg += 6) {
        const int16_t* qp = a.q16 + qg * dp;
        int64_t r = 0;
        for (; r + 2 <= nr; r += 2) {
            __m256i s8;
            __m128i s4;
            micro16_62(qp, dp, qbuf + r * dp, qbuf + (r + 1) * dp, &s8, &s4);
            // scores (exact int32 dots x 2^-30, or NaN for a non-finite row), compared with
            // the 6 thresholds at once; only lanes that pass take the scalar path
            double f2;
            std::memcpy(&f2, fac + r, sizeof f2);  // (fac[r], fac[r + 1])
            const __m256 fr = _mm256_castpd_ps(_mm256_set1_pd(f2));
            const __m256 v8 = _mm256_mul_ps(_mm256_cvtepi32_ps(s8), fr);
            const __m128 v4 = _mm_mul_ps(_mm_cvtepi32_ps(s4), _mm256_castps256_ps128(fr));
            const __m256 t8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(thr + qg)), dup);
            const __m128 t4 = _mm_setr_ps(thr[qg + 4], thr[qg + 4], thr[qg + 5], thr[qg + 5]);
            unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v8, t8, _CMP_GE_OQ))) |
                         (static_cast<unsigned>(_mm_movemask_ps(_mm_cmp_ps(v4, t4, _CMP_GE_OQ))) << 8);
            if (m == 0) continue;
            alignas(32) float v[12];
            _mm256_store_ps(v, v8);
            _mm_store_ps(v + 8, v4);
            for (; m != 0; m &= m - 1) {  // lane b: query qg + b / 2, row r + b % 2
                const int b = __builtin_ctz(m);
                offer(a, qg + b / 2, rb + r + (b & 1), v[b], tv, ti, thr);
            }
        }
        if (r < nr) {  // odd last row
            tile16(a, dp, qg, 4, qbuf, r, 1, fac, rb, tv, ti, thr);
            tile16(a, dp, qg + 4, 2, qbuf, r, 1, fac, rb, tv, ti, thr);
        }
    }
#endif
    for (; qg < Q; qg += 4) {
        const int mq = static_cast<int>((Q - qg) < 4 ? (Q - qg) : 4);
        for (int64_t r = 0; r < nr; r += 2)
            tile16(a, dp, qg, mq, qbuf, r, static_cast<int>((nr - r) < 2 ? (nr - r) : 2), fac, rb, tv, ti, thr);
    }
}

template <int DT>
static void scan_range(const SimArgs& a, int64_t r0, int64_t r1, float* tv, int64_t* ti) {
    const int64_t d = a.d, Q = a.Q, K = a.K;
    const bool i16 = a.q16 != nullptr;
    const bool fused = !i16 && Q <= FUSED_MAX_Q;  // small Q: one bandwidth-bound pass, no buffers
    // bytes of one row block (tuning knob SEMLENS_SIM_BLOCK_BYTES; default 128 KiB, a
    // quarter of this CPU's 512 KiB L2)
    static const int64_t rb_bytes = std::getenv("SEMLENS_SIM_BLOCK_BYTES") != nullptr
                                        ? std::max<int64_t>(1024, std::atoll(std::getenv("SEMLENS_SIM_BLOCK_BYTES")))
                                        : 131072;
    const int64_t dp = pad16(d);
    int64_t RB = (rb_bytes / ((i16 ? 2 : 4) * (dp > 0 ? dp : 1))) / 6 * 6;
    if (RB < 6) RB = 6;
    if (RB > 1020) RB = 1020;
    // float32 block buffer (converted fp16/bf16 rows, or float32 rows of a block that
    // holds a row outside the safe range); rbuf: one rescaled row (fused and int16 paths)
    float* buf = (i16 || fused) ? nullptr : static_cast<float*>(std::malloc(sizeof(float) * RB * d + 64));
    float* rbuf = (i16 || fused) ? static_cast<float*>(std::malloc(sizeof(float) * d + 64)) : nullptr;
    int16_t* qbuf = i16 ? static_cast<int16_t*>(std::malloc(sizeof(int16_t) * RB * dp + 64)) : nullptr;
    Buf8 b8;
    if (i16 && a.q8 != nullptr) {
        b8.xq = static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>(RB * a.dp8 + 64)));
        b8.xb = static_cast<float*>(std::malloc(sizeof(float) * (3 * RB + 8)));
        b8.xn = b8.xb + RB + 2;
        b8.xe = b8.xn + RB + 2;
        b8.s8 = static_cast<int32_t*>(std::aligned_alloc(64, sizeof(int32_t) * 8 * (RB / 2 + 2)));
    }
    float* inv = static_cast<float*>(std::malloc(sizeof(float) * (RB + 2)));
    float* thr = static_cast<float*>(std::malloc(sizeof(float) * (Q + 8)));
    for (int64_t qi = 0; qi < Q; ++qi) thr[qi] = tv[qi * K + K - 1];
    float out[4][3];
    for (int64_t rb = r0; rb < r1; rb += RB) {
        const int64_t nr = (r1 - rb) < RB ? (r1 - rb) : RB;
        if (a.sthr != nullptr) {  // publish this thread's K-th scores, take the others'
            publish_thresholds(a, tv);
            for (int64_t qi = 0; qi < Q; ++qi) thr[qi] = std::max(thr[qi], shared_load(a.sthr + qi));
        }
        if (i16) {
            block16<DT>(a, rb, nr, qbuf, inv, tv, ti, thr, b8, rbuf);
            continue;
        }
        if (fused) {
            using T = typename In<DT>::T;
            const T* x = static_cast<const T*>(a.x);
            const int mq = static_cast<int>(Q);
            const FusedFn<DT> fn = fused_table<DT>(mq);
            float o[8], ss;
            for (int64_t r = 0; r < nr; ++r) {
                const int64_t id = rb + r;
                fn(a.q, d, x + id * a.xs, o, &ss);
                float iv;
                if (__builtin_expect(!unsafe_sq(ss), 1)) {
                    iv = 1.0f / std::sqrt(ss);
                } else {  // zero, non-finite, or outside the safe range: rescaled copy
                    const int kind = rescale_row<DT>(x + id * a.xs, d, rbuf);
                    if (kind == ROW_SCALED) {
                        fused_table<F32>(mq)(a.q, d, rbuf, o, &ss);
                        iv = 1.0f / std::sqrt(ss);
                    } else if (kind == ROW_ZERO) {
                        iv = 0.0f;
                        for (int qq = 0; qq < mq; ++qq) o[qq] = 0.0f;
                    } else {
                        iv = std::numeric_limits<float>::quiet_NaN();
                        note_bad(a, id);
                    }
                }
                for (int qq = 0; qq < mq; ++qq) offer(a, qq, id, o[qq] * iv, tv, ti, thr);
            }
            continue;
        }
        // float32 micro-kernel (4..7 queries, or int16 disabled)
        int64_t xs = 0;
        const float* X = prepare_block<DT>(a, rb, nr, buf, inv, &xs);
        for (int64_t qg = 0; qg < Q; qg += 4) {
            const int mq = static_cast<int>((Q - qg) < 4 ? (Q - qg) : 4);
            // 4 x 3 blocks (12 accumulators + 3 rows + 1 query = 16 registers)
            for (int64_t r = 0; r < nr; r += 3) {
                const int mr = static_cast<int>((nr - r) < 3 ? (nr - r) : 3);
                const float* qp = a.q + qg * d;
                const float* x0 = X + r * xs;
                const float* x1 = mr > 1 ? x0 + xs : x0;
                const float* x2 = mr > 2 ? x0 + 2 * xs : x0;
                if (mq == 4 && mr == 3) micro<4, 3>(qp, d, x0, x1, x2, out);
                else micro_table(mq, mr)(qp, d, x0, x1, x2, out);
                for (int qq = 0; qq < mq; ++qq)
                    for (int rr = 0; rr < mr; ++rr) offer(a, qg + qq, rb + r + rr, out[qq][rr] * inv[r + rr], tv, ti, thr);
            }
        }
    }
    flush_all(a, tv, ti, thr);
    if (a.sthr != nullptr) publish_thresholds(a, tv);
    std::free(rbuf);
    std::free(thr);
    std::free(inv);
    std::free(qbuf);
    std::free(b8.xq);
    std::free(b8.xb);
    std::free(b8.s8);
    std::free(buf);
}

// merge the sorted list (bv, bi)[K] into the sorted list (av, ai)[K] (tmp: 2K scratch)
static void merge_lists(float* av, int64_t* ai, const float* bv, const int64_t* bi, int64_t K,
                        float* tv, int64_t* ti) {
    int64_t x = 0, y = 0;
    for (int64_t o = 0; o < K; ++o) {
        if (y >= K || (x < K && better(av[x], ai[x], bv[y], bi[y]))) { tv[o] = av[x]; ti[o] = ai[x]; ++x; }
        else { tv[o] = bv[y]; ti[o] = bi[y]; ++y; }
    }
    std::memcpy(av, tv, sizeof(float) * K);
    std::memcpy(ai, ti, sizeof(int64_t) * K);
}

template <int DT>
static void run_impl(const SimArgs& a) {
    const int64_t Q = a.Q, K = a.K, N = a.N;
    for (int64_t j = 0; j < Q * K; ++j) { a.vals[j] = -std::numeric_limits<float>::infinity(); a.ids[j] = -1; }
    *a.n_bad = 0;
    if (Q == 0 || N == 0) return;
    int nt = a.nthreads < 1 ? 1 : a.nthreads;
    const double work = static_cast<double>(Q + 1) * static_cast<double>(N) * static_cast<double>(a.d);
    if (work < 4.0e6) nt = 1;
    if (N < 3 * nt) nt = 1;
    // large K: pending buffers of pend_cap candidates per query and thread
    const bool batched = a.merge_k > 0 && K >= a.merge_k;
    const int64_t cap = std::min<int64_t>(1024, std::max<int64_t>(64, K / 8));
    auto with_pending = [&](SimArgs& at, void** mem) {
        *mem = nullptr;
        if (!batched) return;
        const size_t bytes = sizeof(Cand) * static_cast<size_t>(Q * cap) + sizeof(int32_t) * static_cast<size_t>(Q) +
                             (sizeof(float) + sizeof(int64_t)) * static_cast<size_t>(K) + 64;
        char* p = static_cast<char*>(std::malloc(bytes));
        *mem = p;
        at.pend = reinterpret_cast<Cand*>(p); p += sizeof(Cand) * static_cast<size_t>(Q * cap);
        at.mti = reinterpret_cast<int64_t*>(p); p += sizeof(int64_t) * static_cast<size_t>(K);
        at.mtv = reinterpret_cast<float*>(p); p += sizeof(float) * static_cast<size_t>(K);
        at.pend_n = reinterpret_cast<int32_t*>(p);
        std::memset(at.pend_n, 0, sizeof(int32_t) * static_cast<size_t>(Q));
        at.pend_cap = cap;
    };
    if (nt == 1) {
        SimArgs at = a;
        void* mem;
        with_pending(at, &mem);
        scan_range<DT>(at, 0, N, a.vals, a.ids);
        std::free(mem);
        return;
    }
    // per-thread lists; thread 0 writes straight into the output
    SimArgs as = a;
    float* sthr = static_cast<float*>(std::malloc(sizeof(float) * Q));
    for (int64_t qi = 0; qi < Q; ++qi) sthr[qi] = -std::numeric_limits<float>::infinity();
    as.sthr = sthr;
    float* sv = static_cast<float*>(std::malloc(sizeof(float) * Q * K * (nt - 1) + 4));
    int64_t* si = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * Q * K * (nt - 1) + 8));
    for (int64_t j = 0; j < Q * K * (nt - 1); ++j) { sv[j] = -std::numeric_limits<float>::infinity(); si[j] = -1; }
    // rows are handed out in chunks on demand (dynamic schedule), so a thread that
    // is descheduled on a shared machine does not hold the others up at the end
    const int64_t chunk = 2048;
    const int64_t nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num();
        float* tv = t == 0 ? a.vals : sv + (t - 1) * Q * K;
        int64_t* ti = t == 0 ? a.ids : si + (t - 1) * Q * K;
        SimArgs at = as;
        void* mem;
        with_pending(at, &mem);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t r0 = c * chunk, r1 = (r0 + chunk) < N ? (r0 + chunk) : N;
            scan_range<DT>(at, r0, r1, tv, ti);
        }
        std::free(mem);
#pragma omp barrier
        float* mv = static_cast<float*>(std::malloc(sizeof(float) * K));
        int64_t* mi = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * K));
#pragma omp for schedule(static)
        for (int64_t qi = 0; qi < Q; ++qi) {
            for (int u = 1; u < nt; ++u)
                merge_lists(a.vals + qi * K, a.ids + qi * K, sv + (u - 1) * Q * K + qi * K,
                            si + (u - 1) * Q * K + qi * K, K, mv, mi);
        }
        std::free(mv);
        std::free(mi);
    }
    std::free(sv);
    std::free(si);
    std::free(sthr);
}

template <int DT>
static void run(const SimArgs& args) {
    SimArgs a = args;
    int16_t* q16p = nullptr;
    if (args.q16 != nullptr && args.Q > 0) {
        // int16 queries zero-padded to a multiple of 16 components, like the quantised
        // rows: the kernels then need no tail loops (zeros add nothing to the dots)
        const int64_t d = args.d, dp = pad16(d);
        q16p = static_cast<int16_t*>(std::malloc(sizeof(int16_t) * args.Q * dp + 64));
        for (int64_t qi = 0; qi < args.Q; ++qi) {
            std::memcpy(q16p + qi * dp, args.q16 + qi * d, sizeof(int16_t) * d);
            std::memset(q16p + qi * dp + d, 0, sizeof(int16_t) * (dp - d));
        }
        a.q16 = q16p;
    }
    int8_t* q8p = nullptr;
    float* q8f = nullptr;
    int32_t* q8c = nullptr;
#if SLF_LEVEL == 1
    // SEMLENS_SIM_INT8: "0" off, "1" on, unset: on from 128 queries and 400k rows (fewer
    // queries are bound by the row pass, not the dots: N = 10^6, 16 queries 0.25 s with
    // the filter vs 0.19 s without, 64 equal, 256 1.06 s vs 1.29 s). Each pair that passes
    // the filter costs an exact int16 dot (~5x a pair in a tile); the pass rate is high
    // while a scan's K-th scores are still low and on tightly clustered data, so small
    // databases gain nothing (N = 2e5 random: equal time; 8 tight clusters: 1.3x slower).
    const char* e8 = std::getenv("SEMLENS_SIM_INT8");
    const bool use8 = e8 != nullptr && e8[0] != '\0' ? e8[0] != '0' : args.N >= 400000 && args.Q >= 128;
    if (q16p != nullptr && args.Q >= 4 && args.d > 0 && use8) {
        // int8 queries for the pre-filter: q16 ~ Sq q8, q8 in [-64, 64], Sq = max|q16| / 64;
        // bound terms (x 2^-15): |q16 - Sq q8| and |Sq q8|, from the exact values in
        // double, rounded up
        const int64_t Q = args.Q, dp = pad16(args.d), dp8 = (dp + 63) / 64 * 64;
        q8p = static_cast<int8_t*>(std::aligned_alloc(64, static_cast<size_t>(Q * dp8 + 64)));
        q8f = static_cast<float*>(std::malloc(sizeof(float) * (3 * Q + 8)));
        q8c = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * (Q + 8)));
        float *qa = q8f, *qe = q8f + Q, *qb = q8f + 2 * Q;
        const double up = 1.0 + 0x1p-20;
        for (int64_t qi = 0; qi < Q; ++qi) {
            const int16_t* s = q16p + qi * dp;
            int8_t* o = q8p + qi * dp8;
            int amax = 0;
            for (int64_t i = 0; i < dp; ++i) amax = std::max(amax, std::abs(static_cast<int>(s[i])));
            const float S = amax > 0 ? static_cast<float>(amax) / 64.0f : 0.0f;
            double e2 = 0.0, b2 = 0.0;
            int32_t sum = 0;
            for (int64_t i = 0; i < dp; ++i) {
                int k = 0;
                if (amax > 0) {
                    k = static_cast<int>(std::nearbyint(static_cast<double>(s[i]) / S));
                    k = std::min(64, std::max(-64, k));
                }
                o[i] = static_cast<int8_t>(k);
                sum += k;
                const double t = static_cast<double>(S) * k;  // exact (24 x 7 bits)
                const double dq = static_cast<double>(s[i]) - t;  // exact
                e2 += dq * dq;
                b2 += t * t;
            }
            std::memset(o + dp, 0, static_cast<size_t>(dp8 - dp));
            qa[qi] = S * 0x1p-15f;
            qe[qi] = static_cast<float>(std::sqrt(e2) * up * 0x1p-15);
            qb[qi] = static_cast<float>(std::sqrt(b2) * up * 0x1p-15);
            q8c[qi] = 64 * sum;
        }
        a.q8 = q8p;
        a.dp8 = dp8;
        a.q8a = qa;
        a.q8e = qe;
        a.q8b = qb;
        a.q8c = q8c;
    }
#endif
    run_impl<DT>(a);
    std::free(q8p);
    std::free(q8f);
    std::free(q8c);
    std::free(q16p);
}

void sim_candidates(const SimArgs& a) {
    switch (a.dtype) {
        case F32: run<F32>(a); break;
        case F16: run<F16>(a); break;
        default: run<BF16>(a); break;
    }
}

}  // namespace SLF_NS
