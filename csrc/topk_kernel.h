// Fused pooling + streaming top-k kernel, written once and compiled once per SIMD
// level. Each topk_<level>.cpp defines SLF_LEVEL (0 scalar, 1 AVX2, 2 AVX-512) and
// SLF_NS, includes its headers, switches the compiler target, then includes this.
//
// Work split: every thread owns a contiguous range of channels, so the per-channel
// top-k lists are written by one thread only (no locks). The common case, a pooled
// value below the channel's current k-th value, costs one SIMD compare; only
// candidates go to the scalar insertion (binary search + memmove).
//
// Large k (k >= a.merge_k): one insertion moves up to k entries, so while a list fills
// (every sample is a candidate) a batch would cost B * k moves per channel. Candidates
// are then collected per channel over runs of P samples, against the k-th value at the
// start of the run, and merged into the list in one pass (common.h, merge_candidates):
// O(k + m log m) per channel and run instead of O(m k).

namespace SLF_NS {
using namespace slf;

#if SLF_LEVEL == 2
constexpr int W = 16;
using VF = __m512;
template <int DT> static inline VF vload(const typename In<DT>::T* p) {
    if constexpr (DT == F32) return _mm512_loadu_ps(p);
    else if constexpr (DT == F16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
static inline VF vset1(float v) { return _mm512_set1_ps(v); }
static inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
static inline VF vabs(VF x) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff))); }
// max that propagates NaN from either side
static inline VF vmax_nan(VF acc, VF x) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_max_ps(x, acc), x);  // NaN x enters, NaN acc sticks
}
// lanes that may enter the top-k (p >= threshold) or are NaN (to be counted)
static inline uint32_t cand_mask(VF p, VF t) {
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(p, t, _CMP_GE_OQ) | _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q));
}
using VI = __m512i;
static inline VI iload(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline void istore(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
static inline VI iset1(int32_t v) { return _mm512_set1_epi32(v); }
// lanes of pos set to s where x > acc (ordered: never for NaN)
static inline VI pos_update(VI pos, VF x, VF acc, VI s) {
    return _mm512_mask_mov_epi32(pos, _mm512_cmp_ps_mask(x, acc, _CMP_GT_OQ), s);
}
static inline void acc_pd(double* a, VF x) {
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    _mm512_storeu_pd(a, _mm512_add_pd(_mm512_loadu_pd(a), lo));
    _mm512_storeu_pd(a + 8, _mm512_add_pd(_mm512_loadu_pd(a + 8), hi));
}
#elif SLF_LEVEL == 1
constexpr int W = 8;
using VF = __m256;
template <int DT> static inline VF vload(const typename In<DT>::T* p) {
    if constexpr (DT == F32) return _mm256_loadu_ps(p);
    else if constexpr (DT == F16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
static inline VF vset1(float v) { return _mm256_set1_ps(v); }
static inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
static inline VF vabs(VF x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
// max_ps(x, acc) returns acc when either is NaN (a NaN acc sticks); OR-ing the all-ones
// lanes of a NaN x (all-ones is a NaN pattern) brings a new NaN in.
static inline VF vmax_nan(VF acc, VF x) {
    return _mm256_or_ps(_mm256_max_ps(x, acc), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
static inline uint32_t cand_mask(VF p, VF t) {
    return static_cast<uint32_t>(_mm256_movemask_ps(
        _mm256_or_ps(_mm256_cmp_ps(p, t, _CMP_GE_OQ), _mm256_cmp_ps(p, p, _CMP_UNORD_Q))));
}
using VI = __m256i;
static inline VI iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline void istore(int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
static inline VI iset1(int32_t v) { return _mm256_set1_epi32(v); }
static inline VI pos_update(VI pos, VF x, VF acc, VI s) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(pos), _mm256_castsi256_ps(s), _mm256_cmp_ps(x, acc, _CMP_GT_OQ)));
}
static inline void acc_pd(double* a, VF x) {
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), lo));
    _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), hi));
}
#else
constexpr int W = 1;
using VF = float;
template <int DT> static inline VF vload(const typename In<DT>::T* p) { return In<DT>::get(p); }
static inline VF vset1(float v) { return v; }
static inline void vstore(float* p, VF v) { *p = v; }
static inline VF vabs(VF x) { return std::fabs(x); }
static inline VF vmax_nan(VF acc, VF x) { return (x != x || acc != acc) ? (x != x ? x : acc) : (x > acc ? x : acc); }
static inline uint32_t cand_mask(VF p, VF t) { return (p >= t || p != p) ? 1u : 0u; }
using VI = int32_t;
static inline VI iload(const int32_t* p) { return *p; }
static inline void istore(int32_t* p, VI v) { *p = v; }
static inline VI iset1(int32_t v) { return v; }
static inline VI pos_update(VI pos, VF x, VF acc, VI s) { return x > acc ? s : pos; }
static inline void acc_pd(double* a, VF x) { *a += static_cast<double>(x); }
#endif

static inline float smax_nan(float acc, float x) {
    return (x != x || acc != acc) ? (x != x ? x : acc) : (x > acc ? x : acc);
}

template <int DT, int POOL>
struct Kernel {
    using T = typename In<DT>::T;
    static constexpr bool kMaxLike = (POOL == POOL_MAX || POOL == POOL_ABSMAX);

    const PoolArgs& a;
    const T* x;
    int64_t c0, c1;
    float* thr;     // [c1-c0] current k-th value of each owned channel
    float* facc;    // [c1-c0] pooled values of one sample (channel-minor, S > 1)
    const float* pooled;  // [B, C] pooled by pool_rows (channel-minor, unless plain top-k), else nullptr
    const int32_t* ppos;  // [B, C] first position of each max (max/absmax with pooled), else nullptr
    // batched mode (large k), else nullptr: per owned channel up to P pending candidates
    Cand* cb = nullptr;   // [c1-c0, P]
    int32_t* cn = nullptr;  // [c1-c0] pending count
    int64_t P = 0;
    float* tv = nullptr;  // [k] merge scratch
    int64_t* ti = nullptr;
    int32_t* tp = nullptr;

    inline float elem(int64_t b, int64_t c, int64_t s) const {
        float v = In<DT>::get(x + b * a.sb + c * a.sc + s * a.ss);
        return POOL == POOL_ABSMAX ? std::fabs(v) : v;
    }

    // A pooled value that passed the SIMD pre-check: count NaN, else try to insert.
    inline void handle(int64_t b, int64_t c, float v) {
        if (v != v) { a.nan_counts[c] += 1; return; }
        float* vals = a.vals + c * a.k;
        int64_t* ids = a.ids + c * a.k;
        const int64_t sid = a.sample_ids[b];
        if (!better(v, sid, vals[a.k - 1], ids[a.k - 1])) return;
        int32_t p = -1;
        if (kMaxLike && ppos != nullptr) {  // found by the pooling pass; v is that element
            if (a.track_pos) p = ppos[b * a.C + c];
        } else if (kMaxLike) {  // first position of the maximum; the stored value is that element
            int64_t s = 0;
            for (; s < a.S; ++s) if (elem(b, c, s) == v) break;
            if (s == a.S) s = 0;  // unreachable: v is one of the elements
            v = elem(b, c, s);
            if (a.track_pos) p = static_cast<int32_t>(s);
        }
        if (cb != nullptr) {  // batched: merged at the end of the run (flush)
            const int64_t j = c - c0;
            cb[j * P + cn[j]++] = Cand{v, p, sid};
            return;
        }
        insert_entry(vals, ids, a.pos + c * a.k, a.k, v, sid, p);
        thr[c - c0] = vals[a.k - 1];
    }

    // batched mode: merge every channel's pending candidates into its list
    void flush() {
        for (int64_t j = 0; j < c1 - c0; ++j) {
            if (cn[j] == 0) continue;
            const int64_t c = c0 + j;
            merge_candidates(a.vals + c * a.k, a.ids + c * a.k, a.pos + c * a.k, a.k, cb + j * P, cn[j], tv, ti, tp);
            cn[j] = 0;
            thr[j] = a.vals[c * a.k + a.k - 1];
        }
    }

    // after sample b: in batched mode, merge at the end of every run of P samples
    inline void after_sample(int64_t b) {
        if (cb != nullptr && ((b + 1) % P == 0 || b + 1 == a.B)) flush();
    }

    static inline float finish_sum(double s, int64_t S) {
        double r = POOL == POOL_MEAN ? s / static_cast<double>(S) : s;
        return static_cast<float>(r) + 0.0f;  // + 0.0 turns -0.0 into +0.0 (as the reference)
    }

    // channel-minor layout: stride over channels is 1 (acts [B, C], channels_last, tokens [B, T, C])
    void run_minor() {
        const int64_t nc = c1 - c0;
        for (int64_t b = 0; b < a.B; ++b) {
            const T* xb = x + b * a.sb + c0;
            if (a.S == 1 && POOL != POOL_ABSMAX && !(POOL == POOL_SUM || POOL == POOL_MEAN)) {
                int64_t i = 0;
                for (; i + 4 * W <= nc; i += 4 * W) {  // 4 vectors per test: candidates are rare
                    uint32_t m0 = cand_mask(vload<DT>(xb + i), vload<F32>(thr + i));
                    uint32_t m1 = cand_mask(vload<DT>(xb + i + W), vload<F32>(thr + i + W));
                    uint32_t m2 = cand_mask(vload<DT>(xb + i + 2 * W), vload<F32>(thr + i + 2 * W));
                    uint32_t m3 = cand_mask(vload<DT>(xb + i + 3 * W), vload<F32>(thr + i + 3 * W));
                    if (__builtin_expect((m0 | m1 | m2 | m3) == 0, 1)) continue;
                    uint32_t ms[4] = {m0, m1, m2, m3};
                    for (int q = 0; q < 4; ++q) {
                        uint32_t m = ms[q];
                        while (m) {
                            int l = __builtin_ctz(m); m &= m - 1;
                            int64_t j = i + q * W + l;
                            handle(b, c0 + j, In<DT>::get(xb + j));
                        }
                    }
                }
                for (; i + W <= nc; i += W) {
                    uint32_t m = cand_mask(vload<DT>(xb + i), vload<F32>(thr + i));
                    while (m) {
                        int l = __builtin_ctz(m); m &= m - 1;
                        handle(b, c0 + i + l, In<DT>::get(xb + i + l));
                    }
                }
                for (; i < nc; ++i) {
                    float v = In<DT>::get(xb + i);
                    if (v >= thr[i] || v != v) handle(b, c0 + i, v);
                }
                after_sample(b);
                continue;
            }
            const float* prow = pooled + b * a.C + c0;
            for (int64_t i = 0; i < nc; ++i) facc[i] = prow[i];
            int64_t i = 0;
            for (; i + W <= nc; i += W) {
                uint32_t m = cand_mask(vload<F32>(facc + i), vload<F32>(thr + i));
                while (m) {
                    int l = __builtin_ctz(m); m &= m - 1;
                    handle(b, c0 + i + l, facc[i + l]);
                }
            }
            for (; i < nc; ++i) {
                float v = facc[i];
                if (v >= thr[i] || v != v) handle(b, c0 + i, v);
            }
            after_sample(b);
        }
    }

    // pooled value of S contiguous elements
    inline float reduce_contig(const T* p) const {
        const int64_t S = a.S;
        int64_t s = 0;
        if (kMaxLike) {
            float r;
            if (S >= W && W > 1) {
                VF acc = vload<DT>(p);
                if (POOL == POOL_ABSMAX) acc = vabs(acc);
                s = W;
                if (S >= 5 * W) {  // four independent chains hide the max/blend latency
                    VF b0 = acc, b1 = acc, b2 = acc, b3 = acc;
                    for (; s + 4 * W <= S; s += 4 * W) {
                        VF v0 = vload<DT>(p + s), v1 = vload<DT>(p + s + W), v2 = vload<DT>(p + s + 2 * W), v3 = vload<DT>(p + s + 3 * W);
                        if (POOL == POOL_ABSMAX) { v0 = vabs(v0); v1 = vabs(v1); v2 = vabs(v2); v3 = vabs(v3); }
                        b0 = vmax_nan(b0, v0); b1 = vmax_nan(b1, v1); b2 = vmax_nan(b2, v2); b3 = vmax_nan(b3, v3);
                    }
                    acc = vmax_nan(vmax_nan(b0, b1), vmax_nan(b2, b3));
                }
                for (; s + W <= S; s += W) {
                    VF v = vload<DT>(p + s);
                    if (POOL == POOL_ABSMAX) v = vabs(v);
                    acc = vmax_nan(acc, v);
                }
                alignas(64) float tmp[W];
                vstore(tmp, acc);
                r = tmp[0];
                for (int l = 1; l < W; ++l) r = smax_nan(r, tmp[l]);
            } else {
                r = In<DT>::get(p);
                if (POOL == POOL_ABSMAX) r = std::fabs(r);
                s = 1;
            }
            for (; s < S; ++s) {
                float v = In<DT>::get(p + s);
                r = smax_nan(r, POOL == POOL_ABSMAX ? std::fabs(v) : v);
            }
            return r;
        } else {
            alignas(64) double acc[W];
            for (int l = 0; l < W; ++l) acc[l] = 0.0;
            for (; s + W <= S; s += W) acc_pd(acc, vload<DT>(p + s));
            double r = 0.0;
            for (int l = 0; l < W; ++l) r += acc[l];
            for (; s < S; ++s) r += static_cast<double>(In<DT>::get(p + s));
            return finish_sum(r, S);
        }
    }

    // channel-major layout: the S elements of one (sample, channel) are contiguous (NCHW)
    void run_major() {
        for (int64_t b = 0; b < a.B; ++b) {
            for (int64_t c = c0; c < c1; ++c) {
                float v = reduce_contig(x + b * a.sb + c * a.sc);
                if (v >= thr[c - c0] || v != v) handle(b, c, v);
            }
            after_sample(b);
        }
    }
};

// Pool sample b of a channel-minor map (channels contiguous, rows strided by ss) into
// out[0..C): streams the whole sample row by row, accumulators in a small buffer.
template <int DT, int POOL>
static void pool_row(const PoolArgs& a, int64_t b, float* out, int32_t* opos, double* dacc) {
    using T = typename In<DT>::T;
    constexpr bool kMaxLike = (POOL == POOL_MAX || POOL == POOL_ABSMAX);
    const T* xb = static_cast<const T*>(a.x) + b * a.sb;
    const int64_t C = a.C;
    if (kMaxLike) {
        for (int64_t s = 0; s < a.S; ++s) {
            const T* row = xb + s * a.ss;
            int64_t i = 0;
            if (s == 0) {
                for (; i + W <= C; i += W) {
                    VF v = vload<DT>(row + i);
                    if (POOL == POOL_ABSMAX) v = vabs(v);
                    vstore(out + i, v);
                    istore(opos + i, iset1(0));
                }
                for (; i < C; ++i) {
                    float v = In<DT>::get(row + i);
                    out[i] = POOL == POOL_ABSMAX ? std::fabs(v) : v;
                    opos[i] = 0;
                }
            } else {
                // max_ps keeps the earlier value on ties (signed zeros included) and the
                // position moves only on a strictly larger value: the first maximum wins.
                const VI sv = iset1(static_cast<int32_t>(s));
                for (; i + W <= C; i += W) {
                    VF v = vload<DT>(row + i);
                    if (POOL == POOL_ABSMAX) v = vabs(v);
                    VF acc = vload<F32>(out + i);
                    istore(opos + i, pos_update(iload(opos + i), v, acc, sv));
                    vstore(out + i, vmax_nan(acc, v));
                }
                for (; i < C; ++i) {
                    float v = In<DT>::get(row + i);
                    if (POOL == POOL_ABSMAX) v = std::fabs(v);
                    if (v > out[i]) opos[i] = static_cast<int32_t>(s);
                    out[i] = smax_nan(out[i], v);
                }
            }
        }
    } else {
        for (int64_t i = 0; i < C; ++i) dacc[i] = 0.0;
        for (int64_t s = 0; s < a.S; ++s) {
            const T* row = xb + s * a.ss;
            int64_t i = 0;
            for (; i + W <= C; i += W) acc_pd(dacc + i, vload<DT>(row + i));
            for (; i < C; ++i) dacc[i] += static_cast<double>(In<DT>::get(row + i));
        }
        for (int64_t i = 0; i < C; ++i) {
            double r = POOL == POOL_MEAN ? dacc[i] / static_cast<double>(a.S) : dacc[i];
            out[i] = static_cast<float>(r) + 0.0f;
        }
    }
}

template <int DT, int POOL>
static void pool_rows(const PoolArgs& a, float* pooled, int32_t* ppos, int64_t b0, int64_t b1) {
    double* dacc = (POOL == POOL_SUM || POOL == POOL_MEAN) ? static_cast<double*>(std::malloc(sizeof(double) * a.C)) : nullptr;
    for (int64_t b = b0; b < b1; ++b)
        pool_row<DT, POOL>(a, b, pooled + b * a.C, ppos ? ppos + b * a.C : nullptr, dacc);
    std::free(dacc);
}

template <int DT, int POOL>
static void run_range(const PoolArgs& a, int64_t c0, int64_t c1, bool minor, const float* pooled, const int32_t* ppos) {
    const int64_t nc = c1 - c0;
    if (nc <= 0) return;
    float* thr = static_cast<float*>(std::malloc(sizeof(float) * nc * 2));
    float* facc = thr + nc;
    for (int64_t c = c0; c < c1; ++c) thr[c - c0] = a.vals[c * a.k + a.k - 1];
    Kernel<DT, POOL> kern{a, static_cast<const typename In<DT>::T*>(a.x), c0, c1, thr, facc, pooled, ppos};
    void* scratch = nullptr;
    if (a.merge_k > 0 && a.k >= a.merge_k && a.B > 1) {
        // runs of P samples: at most P candidates per channel; the pending buffers take
        // about 8 MiB per thread at most (P >= 16), the merge scratch one list
        int64_t P = (int64_t{1} << 19) / nc;
        P = P < 16 ? 16 : (P > 1024 ? 1024 : P);
        if (P > a.B) P = a.B;
        const size_t cb_bytes = sizeof(Cand) * static_cast<size_t>(nc * P);
        const size_t k = static_cast<size_t>(a.k);
        scratch = std::malloc(cb_bytes + sizeof(int32_t) * static_cast<size_t>(nc) + k * (sizeof(float) + sizeof(int64_t) + sizeof(int32_t)) + 64);
        char* q = static_cast<char*>(scratch);
        kern.cb = reinterpret_cast<Cand*>(q); q += cb_bytes;
        kern.ti = reinterpret_cast<int64_t*>(q); q += k * sizeof(int64_t);
        kern.tv = reinterpret_cast<float*>(q); q += k * sizeof(float);
        kern.tp = reinterpret_cast<int32_t*>(q); q += k * sizeof(int32_t);
        kern.cn = reinterpret_cast<int32_t*>(q);
        std::memset(kern.cn, 0, sizeof(int32_t) * static_cast<size_t>(nc));
        kern.P = P;
    }
    if (minor) kern.run_minor(); else kern.run_major();
    std::free(scratch);
    std::free(thr);
}

template <int DT, int POOL>
static void run_pool(const PoolArgs& a, int nt) {
    const bool minor = a.sc == 1 && (a.S == 1 || a.ss != 1);
    float* pooled = nullptr;
    int32_t* ppos = nullptr;
    if (minor && !(a.S == 1 && POOL == POOL_MAX)) {  // run_minor reads plain top-k straight from x
        // phase 1, parallel over samples: every thread streams whole samples into [B, C]
        pooled = static_cast<float*>(std::malloc(sizeof(float) * a.B * a.C));
        if (POOL == POOL_MAX || POOL == POOL_ABSMAX) ppos = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * a.B * a.C));
        if (nt > 1 && a.B > 1) {
#pragma omp parallel num_threads(nt)
            {
                int t = omp_get_thread_num(), n = omp_get_num_threads();
                int64_t per = (a.B + n - 1) / n, b0 = t * per, b1 = b0 + per < a.B ? b0 + per : a.B;
                if (b0 < b1) pool_rows<DT, POOL>(a, pooled, ppos, b0, b1);
            }
        } else {
            pool_rows<DT, POOL>(a, pooled, ppos, 0, a.B);
        }
    }
    // phase 2 (or the whole work), parallel over channels: each thread owns its channels' lists
    const int64_t align = 16;
    int64_t per = (a.C + nt - 1) / nt;
    per = ((per + align - 1) / align) * align;
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num();
            int64_t c0 = t * per, c1 = c0 + per < a.C ? c0 + per : a.C;
            if (c0 < a.C) run_range<DT, POOL>(a, c0, c1, minor, pooled, ppos);
        }
    } else {
        run_range<DT, POOL>(a, 0, a.C, minor, pooled, ppos);
    }
    std::free(ppos);
    std::free(pooled);
}

template <int DT>
static void run_dt(const PoolArgs& a, int nt) {
    switch (a.pool) {
        case POOL_MAX: run_pool<DT, POOL_MAX>(a, nt); break;
        case POOL_MEAN: run_pool<DT, POOL_MEAN>(a, nt); break;
        case POOL_ABSMAX: run_pool<DT, POOL_ABSMAX>(a, nt); break;
        default: run_pool<DT, POOL_SUM>(a, nt); break;
    }
}

void pool_topk(const PoolArgs& a) {
    int nt = a.nthreads;
    if (a.B * a.C * a.S < (1 << 15)) nt = 1;
    switch (a.dtype) {
        case F32: run_dt<F32>(a, nt); break;
        case F16: run_dt<F16>(a, nt); break;
        default: run_dt<BF16>(a, nt); break;
    }
}

}  // namespace SLF_NS
