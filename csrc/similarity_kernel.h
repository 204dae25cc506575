// Candidate pass of the cosine top-k search, written once and compiled once per SIMD
// level. Each similarity_<level>.cpp defines SLF_LEVEL (0 scalar, 1 AVX2, 2 AVX-512)
// and SLF_NS, includes its headers, switches the compiler target, then includes this.
//
// Work split: threads take chunks of 2048 database rows on demand and keep their own
// top-K list per query (no locks); the lists are merged at the end. A thread walks its
// range in blocks of RB rows that stay in L2 (converted to float32 first when stored as
// fp16/bf16; their inverse norms are computed in the same pass), and for each group of
// 4 queries (L1-resident) runs a 4 x 3 register-blocked dot-product micro-kernel over
// triples of rows: 12 accumulators, 7 loads per 12 FMAs. With int16 queries (q16) the
// rows are quantised per block instead and a 4 x 2 int16 kernel (vpmaddwd) runs. A score below the query's
// current K-th score costs one compare; only candidates reach the insertion.

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

// Quantise the block's rows (already normed: inv[r]) to int16 into qbuf [nr, d].
template <int DT>
static void quantise_block(const SimArgs& a, int64_t r0, int64_t nr, const float* inv, int16_t* qbuf) {
    using T = typename In<DT>::T;
    const T* x = static_cast<const T*>(a.x);
    const int64_t d = a.d;
    for (int64_t r = 0; r < nr; ++r) {
        const T* src = x + (r0 + r) * a.xs;
        int16_t* dst = qbuf + r * d;
        const float sc = (inv[r] == inv[r]) ? inv[r] * 32768.0f : 0.0f;
        int64_t i = 0;
#if SLF_LEVEL > 0
        const VF vs = vset1(sc);
        for (; i + 2 * W <= d; i += 2 * W)
            quant_store(dst + i, vmul(vload_dt<DT>(src + i), vs), vmul(vload_dt<DT>(src + i + W), vs));
#endif
        for (; i < d; ++i) dst[i] = quant1(In<DT>::get(src + i) * sc);
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

// Small Q (1..3 queries): dots and squared norms of 2 rows in one pass straight from the
// storage (no conversion buffer, no separate norm pass): the scan is bandwidth-bound.
template <int DT, int MQ, int MR>
static void micro_fused(const float* __restrict q, int64_t d, const typename In<DT>::T* __restrict x0,
                        const typename In<DT>::T* __restrict x1, float out[4][3], float ss[3]) {
    VF acc[MQ][MR];
    VF nrm[MR];
    for (int b = 0; b < MR; ++b) {
        nrm[b] = vzero();
        for (int a = 0; a < MQ; ++a) acc[a][b] = vzero();
    }
    const typename In<DT>::T* xr[2] = {x0, x1};
    const int64_t dv = d - d % W;
    for (int64_t i = 0; i < dv; i += W) {
        VF xv[MR];
#pragma GCC unroll 2
        for (int b = 0; b < MR; ++b) {
            xv[b] = vload_dt<DT>(xr[b] + i);
            nrm[b] = vfma(xv[b], xv[b], nrm[b]);
        }
#pragma GCC unroll 3
        for (int a = 0; a < MQ; ++a) {
            VF qv = vload(q + a * d + i);
#pragma GCC unroll 2
            for (int b = 0; b < MR; ++b) acc[a][b] = vfma(qv, xv[b], acc[a][b]);
        }
    }
    for (int b = 0; b < MR; ++b) {
        float n = hsum(nrm[b]);
        for (int64_t i = dv; i < d; ++i) { float v = In<DT>::get(xr[b] + i); n += v * v; }
        ss[b] = n;
        for (int a = 0; a < MQ; ++a) {
            float s = hsum(acc[a][b]);
            for (int64_t i = dv; i < d; ++i) s += q[a * d + i] * In<DT>::get(xr[b] + i);
            out[a][b] = s;
        }
    }
}

template <int DT>
using FusedFn = void (*)(const float*, int64_t, const typename In<DT>::T*, const typename In<DT>::T*, float[4][3], float[3]);

template <int DT>
static FusedFn<DT> fused_table(int mq, int mr) {
    static const FusedFn<DT> t[3][2] = {
        {micro_fused<DT, 1, 1>, micro_fused<DT, 1, 2>},
        {micro_fused<DT, 2, 1>, micro_fused<DT, 2, 2>},
        {micro_fused<DT, 3, 1>, micro_fused<DT, 3, 2>},
    };
    return t[mq - 1][mr - 1];
}

// Block of rows as float32 (converted into buf unless already float32) + inverse norms.
// Returns the row pointer base and stride; inv[r] = 1/|x_r| (0 for a zero row, NaN for
// a row whose squared norm is not finite).
template <int DT>
static const float* prepare_block(const SimArgs& a, int64_t r0, int64_t nr, float* buf, float* inv,
                                  int64_t* stride, bool norms_only) {
    using T = typename In<DT>::T;
    const T* x = static_cast<const T*>(a.x);
    const int64_t d = a.d;
    const int64_t dv = d - d % W;
    const bool direct = (DT == F32) || norms_only;
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
        if (!std::isfinite(ss)) {
            inv[r] = std::numeric_limits<float>::quiet_NaN();
#pragma omp critical(slf_sim_bad)
            {
                if (*a.n_bad < a.max_bad) a.bad[*a.n_bad] = r0 + r;
                *a.n_bad += 1;
            }
        } else {
            inv[r] = ss > 0.0f ? 1.0f / std::sqrt(ss) : 0.0f;
        }
    }
    if (norms_only) return nullptr;
    if (direct) {
        *stride = a.xs;
        return reinterpret_cast<const float*>(x) + r0 * a.xs;
    }
    *stride = d;
    return buf;
}

// the library's entry order and sorted insertion come from common.h (better, insert_entry);
// similarity lists carry no positions
static inline void insert(float* v, int64_t* ids, int64_t K, float s, int64_t id) {
    insert_entry(v, ids, nullptr, K, s, id, 0);
}

template <int DT>
static void scan_range(const SimArgs& a, int64_t r0, int64_t r1, float* tv, int64_t* ti) {
    const int64_t d = a.d, Q = a.Q, K = a.K;
    const bool i16 = a.q16 != nullptr;
    const bool fused = !i16 && Q <= 3;  // small Q: one bandwidth-bound pass, no buffers
    // bytes of one row block (tuning knob SEMLENS_SIM_BLOCK_BYTES; default 128 KiB: two
    // blocks still fit one L2 when the two threads are SMT siblings)
    static const int64_t rb_bytes = std::getenv("SEMLENS_SIM_BLOCK_BYTES") != nullptr
                                        ? std::max<int64_t>(1024, std::atoll(std::getenv("SEMLENS_SIM_BLOCK_BYTES")))
                                        : 131072;
    int64_t RB = (rb_bytes / ((i16 ? 2 : 4) * (d > 0 ? d : 1))) / 6 * 6;
    if (RB < 6) RB = 6;
    if (RB > 1020) RB = 1020;
    float* buf = (DT == F32 || i16) ? nullptr : static_cast<float*>(std::malloc(sizeof(float) * RB * d + 64));
    int16_t* qbuf = i16 ? static_cast<int16_t*>(std::malloc(sizeof(int16_t) * RB * d + 64)) : nullptr;
    float* inv = static_cast<float*>(std::malloc(sizeof(float) * RB));
    float* thr = static_cast<float*>(std::malloc(sizeof(float) * (Q > 0 ? Q : 1)));
    for (int64_t qi = 0; qi < Q; ++qi) thr[qi] = tv[qi * K + K - 1];
    float out[4][3];
    int32_t out16[4][3];
    const float scale16 = 9.313225746154785e-10f;  // 2^-30
    for (int64_t rb = r0; rb < r1; rb += RB) {
        const int64_t nr = (r1 - rb) < RB ? (r1 - rb) : RB;
        int64_t xs = 0;
        if (fused) {
            using T = typename In<DT>::T;
            const T* x = static_cast<const T*>(a.x);
            const int mq = static_cast<int>(Q);
            float ss[3];
            for (int64_t r = 0; r < nr; r += 2) {
                const int mr = static_cast<int>((nr - r) < 2 ? (nr - r) : 2);
                const T* x0 = x + (rb + r) * a.xs;
                const T* x1 = mr > 1 ? x0 + a.xs : x0;
                fused_table<DT>(mq, mr)(a.q, d, x0, x1, out, ss);
                for (int rr = 0; rr < mr; ++rr) {
                    const int64_t id = rb + r + rr;
                    float iv;
                    if (!std::isfinite(ss[rr])) {
                        iv = std::numeric_limits<float>::quiet_NaN();
#pragma omp critical(slf_sim_bad)
                        {
                            if (*a.n_bad < a.max_bad) a.bad[*a.n_bad] = id;
                            *a.n_bad += 1;
                        }
                    } else {
                        iv = ss[rr] > 0.0f ? 1.0f / std::sqrt(ss[rr]) : 0.0f;
                    }
                    for (int qq = 0; qq < mq; ++qq) {
                        const float sc = out[qq][rr] * iv;
                        if (!(sc >= thr[qq])) continue;
                        if (a.excl != nullptr) {
                            bool skip = false;
                            for (int64_t j = 0; j < a.m; ++j) skip |= (a.excl[qq * a.m + j] == id);
                            if (skip) continue;
                        }
                        insert(tv + qq * K, ti + qq * K, K, sc, id);
                        thr[qq] = tv[qq * K + K - 1];
                    }
                }
            }
            continue;
        }
        const float* X = prepare_block<DT>(a, rb, nr, buf, inv, &xs, i16);
        if (i16) quantise_block<DT>(a, rb, nr, inv, qbuf);
        for (int64_t qg = 0; qg < Q; qg += 4) {
            const int mq = static_cast<int>((Q - qg) < 4 ? (Q - qg) : 4);
            // float32: 4 x 3 blocks (12 accumulators + 3 rows + 1 query = 16 registers);
            // int16: 4 x 2 (madd needs a temporary: 8 + 2 + 1 + 1)
            const int64_t RS = i16 ? 2 : 3;
            for (int64_t r = 0; r < nr; r += RS) {
                const int mr = static_cast<int>((nr - r) < RS ? (nr - r) : RS);
                if (i16) {
                    const int16_t* qp = a.q16 + qg * d;
                    const int16_t* x0 = qbuf + r * d;
                    const int16_t* x1 = mr > 1 ? x0 + d : x0;
                    const int16_t* x2 = mr > 2 ? x0 + 2 * d : x0;
#if SLF_LEVEL == 1
                    if (mq == 4 && mr == 2) micro16_42(qp, d, x0, x1, out16);
#else
                    if (mq == 4 && mr == 2) micro16<4, 2>(qp, d, x0, x1, x2, out16);
#endif
                    else micro16_table(mq, mr)(qp, d, x0, x1, x2, out16);
                    for (int qq = 0; qq < mq; ++qq)
                        for (int rr = 0; rr < mr; ++rr)
                            out[qq][rr] = (inv[r + rr] == inv[r + rr]) ? static_cast<float>(out16[qq][rr]) * scale16
                                                                      : std::numeric_limits<float>::quiet_NaN();
                } else {
                    const float* qp = a.q + qg * d;
                    const float* x0 = X + r * xs;
                    const float* x1 = mr > 1 ? x0 + xs : x0;
                    const float* x2 = mr > 2 ? x0 + 2 * xs : x0;
                    if (mq == 4 && mr == 3) micro<4, 3>(qp, d, x0, x1, x2, out);
                    else micro_table(mq, mr)(qp, d, x0, x1, x2, out);
                    for (int qq = 0; qq < mq; ++qq)
                        for (int rr = 0; rr < mr; ++rr) out[qq][rr] *= inv[r + rr];
                }
                for (int qq = 0; qq < mq; ++qq) {
                    const int64_t qi = qg + qq;
                    for (int rr = 0; rr < mr; ++rr) {
                        const float s = out[qq][rr];
                        if (!(s >= thr[qi])) continue;  // also drops NaN (non-finite rows)
                        const int64_t id = rb + r + rr;
                        if (a.excl != nullptr) {
                            bool skip = false;
                            for (int64_t j = 0; j < a.m; ++j) skip |= (a.excl[qi * a.m + j] == id);
                            if (skip) continue;
                        }
                        insert(tv + qi * K, ti + qi * K, K, s, id);
                        thr[qi] = tv[qi * K + K - 1];
                    }
                }
            }
        }
    }
    std::free(thr);
    std::free(inv);
    std::free(qbuf);
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
static void run(const SimArgs& a) {
    const int64_t Q = a.Q, K = a.K, N = a.N;
    for (int64_t j = 0; j < Q * K; ++j) { a.vals[j] = -std::numeric_limits<float>::infinity(); a.ids[j] = -1; }
    *a.n_bad = 0;
    if (Q == 0 || N == 0) return;
    int nt = a.nthreads < 1 ? 1 : a.nthreads;
    const double work = static_cast<double>(Q + 1) * static_cast<double>(N) * static_cast<double>(a.d);
    if (work < 4.0e6) nt = 1;
    if (N < 3 * nt) nt = 1;
    if (nt == 1) {
        scan_range<DT>(a, 0, N, a.vals, a.ids);
        return;
    }
    // per-thread lists; thread 0 writes straight into the output
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
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t r0 = c * chunk, r1 = (r0 + chunk) < N ? (r0 + chunk) : N;
            scan_range<DT>(a, r0, r1, tv, ti);
        }
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
}

void sim_candidates(const SimArgs& a) {
    switch (a.dtype) {
        case F32: run<F32>(a); break;
        case F16: run<F16>(a); break;
        default: run<BF16>(a); break;
    }
}

}  // namespace SLF_NS
