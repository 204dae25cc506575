// Fused SAE encode + token pooling + streaming top-k, written once and compiled once per SIMD
// level (sae_scalar.cpp, sae_avx2.cpp, sae_avx512.cpp define SLF_LEVEL and SLF_NS first).
//
// Work split: every thread owns a contiguous range of latent panels (NR latents each), so the
// top-k lists of a latent are written by one thread only. Per panel: the W columns are packed
// into a [d, NR] float32 buffer (any input dtype/strides), then every sample's rows go through an
// MR x NR FMA micro-kernel; the epilogue adds the bias, stores the approximate pre-activations of
// the sample, and pools the upper bounds act(p~ + eps). Only (sample, latent) pairs whose bound
// reaches the latent's current k-th value are recomputed exactly (float64, sequential over d;
// see semlens_fast/ops/sae.py for the definition and the bound).

namespace SLF_NS {
using namespace slf;

#if SLF_LEVEL == 2
constexpr int W = 16;
using VF = __m512;
static inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
static inline VF vset1(float v) { return _mm512_set1_ps(v); }
static inline VF vzero() { return _mm512_setzero_ps(); }
static inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
static inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
static inline VF vabs(VF x) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff))); }
static inline VF vmax(VF a, VF b) { return _mm512_max_ps(a, b); }
// lanes of x kept where x > t (ordered), else +0
static inline VF vkeep_gt(VF x, VF t) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, t, _CMP_GT_OQ), x); }
// all-ones lanes where x is not finite (x - x is NaN exactly for inf and NaN)
static inline VF vnonfinite(VF x) {
    return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_sub_ps(x, x), _CMP_UNORD_Q)));
}
static inline VF vor(VF a, VF b) { return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b))); }
#elif SLF_LEVEL == 1
constexpr int W = 8;
using VF = __m256;
static inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
static inline VF vset1(float v) { return _mm256_set1_ps(v); }
static inline VF vzero() { return _mm256_setzero_ps(); }
static inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
static inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
static inline VF vabs(VF x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
static inline VF vmax(VF a, VF b) { return _mm256_max_ps(a, b); }
static inline VF vkeep_gt(VF x, VF t) { return _mm256_and_ps(_mm256_cmp_ps(x, t, _CMP_GT_OQ), x); }
static inline VF vnonfinite(VF x) { VF z = _mm256_sub_ps(x, x); return _mm256_cmp_ps(z, z, _CMP_UNORD_Q); }
static inline VF vor(VF a, VF b) { return _mm256_or_ps(a, b); }
#else
constexpr int W = 1;
using VF = float;
static inline VF vload(const float* p) { return *p; }
static inline void vstore(float* p, VF v) { *p = v; }
static inline VF vset1(float v) { return v; }
static inline VF vzero() { return 0.0f; }
static inline VF vfma(VF a, VF b, VF c) { return a * b + c; }
static inline VF vadd(VF a, VF b) { return a + b; }
static inline VF vsub(VF a, VF b) { return a - b; }
static inline VF vabs(VF x) { return std::fabs(x); }
static inline VF vmax(VF a, VF b) { return a > b ? a : b; }
static inline VF vkeep_gt(VF x, VF t) { return x > t ? x : 0.0f; }
static inline VF vnonfinite(VF x) { float z = x - x; return z != z ? bits_to_f32(0xffffffffu) : 0.0f; }
static inline VF vor(VF a, VF b) { return bits_to_f32(f32_to_bits(a) | f32_to_bits(b)); }
#endif

constexpr int NR = SAE_NR;              // latents per panel (16 at every level: one packing)
constexpr int NV = NR / W;              // vectors per panel row
constexpr int MR = W == 16 ? 12 : (W == 8 ? 6 : 1);  // rows per micro-kernel block

// acc[r][v] = sum_i x[r][i] * panel[i][v] for M rows (any summation order is covered by the bound)
template <int M>
static inline void micro(const float* __restrict x, int64_t d, const float* __restrict panel, VF (&out)[MR][NV]) {
    static_assert(M <= MR, "rows per block");
    VF acc[M][NV];  // local accumulators (registers); written out once at the end
    for (int r = 0; r < M; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
    for (int64_t i = 0; i < d; ++i) {
        VF w[NV];
        for (int v = 0; v < NV; ++v) w[v] = vload(panel + i * NR + v * W);
        for (int r = 0; r < M; ++r) {
            VF xb = vset1(x[r * d + i]);
            for (int v = 0; v < NV; ++v) acc[r][v] = vfma(xb, w[v], acc[r][v]);
        }
    }
    for (int r = 0; r < M; ++r)
        for (int v = 0; v < NV; ++v) out[r][v] = acc[r][v];
}

static inline void micro_rows(int m, const float* x, int64_t d, const float* panel, VF (&acc)[MR][NV]) {
    switch (m) {
#if SLF_LEVEL == 2
        case 12: micro<12>(x, d, panel, acc); break;
        case 11: micro<11>(x, d, panel, acc); break;
        case 10: micro<10>(x, d, panel, acc); break;
        case 9: micro<9>(x, d, panel, acc); break;
        case 8: micro<8>(x, d, panel, acc); break;
        case 7: micro<7>(x, d, panel, acc); break;
#endif
#if SLF_LEVEL >= 1
        case 6: micro<6>(x, d, panel, acc); break;
        case 5: micro<5>(x, d, panel, acc); break;
        case 4: micro<4>(x, d, panel, acc); break;
        case 3: micro<3>(x, d, panel, acc); break;
        case 2: micro<2>(x, d, panel, acc); break;
#endif
        default: micro<1>(x, d, panel, acc); break;
    }
}

struct Panel {
    const SaeArgs& a;
    const float* wp;  // [d, NR] packed columns of the current panel
    float* sbuf;    // [tmax, NR] act(upper bound) of every row of the current sample
    float* ebuf;    // [tmax, NR] exact activations of the rows computed so far (ehave)
    uint8_t* ehave; // [tmax]
    float bias[NR], epsA[NR], epsB[NR], gate[NR], thr[NR];
    int64_t l0, nl;  // first latent, latents in this panel (<= NR)

    // Exact activations of row r for all NR lanes (the definition: float64, sequential over d per
    // lane, then the bias, one rounding); computed once per row and sample, vectorised across lanes.
    inline const float* exact_row(int64_t r, int64_t r0) {
        float* out = ebuf + (r - r0) * NR;
        if (ehave[r - r0]) return out;
        ehave[r - r0] = 1;
        const float* xr = a.x + r * a.d;
        alignas(64) double acc[NR];
#if SLF_LEVEL == 2
        __m512d q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
        for (int64_t i = 0; i < a.d; ++i) {  // each lane in order over i; products exact in float64
            const __m512d xi = _mm512_set1_pd(static_cast<double>(xr[i]));
            const float* w = wp + i * NR;
            q0 = _mm512_fmadd_pd(xi, _mm512_cvtps_pd(_mm256_loadu_ps(w)), q0);
            q1 = _mm512_fmadd_pd(xi, _mm512_cvtps_pd(_mm256_loadu_ps(w + 8)), q1);
        }
        _mm512_store_pd(acc, q0); _mm512_store_pd(acc + 8, q1);
#elif SLF_LEVEL == 1
        __m256d q0 = _mm256_setzero_pd(), q1 = _mm256_setzero_pd(), q2 = _mm256_setzero_pd(), q3 = _mm256_setzero_pd();
        for (int64_t i = 0; i < a.d; ++i) {  // each lane in order over i; products exact in float64
            const __m256d xi = _mm256_set1_pd(static_cast<double>(xr[i]));
            const float* w = wp + i * NR;
            q0 = _mm256_fmadd_pd(xi, _mm256_cvtps_pd(_mm_loadu_ps(w)), q0);
            q1 = _mm256_fmadd_pd(xi, _mm256_cvtps_pd(_mm_loadu_ps(w + 4)), q1);
            q2 = _mm256_fmadd_pd(xi, _mm256_cvtps_pd(_mm_loadu_ps(w + 8)), q2);
            q3 = _mm256_fmadd_pd(xi, _mm256_cvtps_pd(_mm_loadu_ps(w + 12)), q3);
        }
        _mm256_store_pd(acc, q0); _mm256_store_pd(acc + 4, q1); _mm256_store_pd(acc + 8, q2); _mm256_store_pd(acc + 12, q3);
#else
        for (int j = 0; j < NR; ++j) acc[j] = 0.0;
        for (int64_t i = 0; i < a.d; ++i) {
            const double xi = static_cast<double>(xr[i]);
            const float* w = wp + i * NR;
            for (int j = 0; j < NR; ++j) acc[j] += xi * static_cast<double>(w[j]);
        }
#endif
        for (int j = 0; j < NR; ++j) {
            const float pre = static_cast<float>(acc[j] + static_cast<double>(bias[j]));
            out[j] = pre != pre ? pre : (pre > gate[j] ? pre : 0.0f);  // gate = max(threshold, 0), 0 for ReLU
        }
        return out;
    }

    void prepare(int64_t panel) {
        l0 = panel * NR;
        nl = a.L - l0 < NR ? a.L - l0 : NR;
        wp = a.wpacked + panel * a.d * NR;
        for (int j = 0; j < NR; ++j) {
            if (j < nl) {
                bias[j] = a.benc[l0 + j];
                float g = a.thr != nullptr ? a.thr[l0 + j] : 0.0f;
                gate[j] = g > 0.0f ? g : 0.0f;
                thr[j] = a.vals[(l0 + j) * a.k + a.k - 1];
                epsA[j] = a.c1 * a.wnorm[l0 + j];
            } else {
                bias[j] = 0.0f; gate[j] = 0.0f; thr[j] = INFINITY; epsA[j] = 0.0f;
            }
            epsB[j] = a.c1 * std::fabs(bias[j]) + a.c0;
        }
    }

    // exact pooled value and position of (sample rows [r0, r1), lane j); all_exact: recompute every row.
    // sbuf holds act(p~ + eps) per row; lbmax = max over rows of act(p~ - eps) (max pooling).
    void exact_pool(int64_t r0, int64_t r1, int j, bool all_exact, float lbmax, float& val, int32_t& pos) {
        const int64_t n = r1 - r0;
        if (a.pool == POOL_MAX) {
            float best = -INFINITY;
            int64_t best_r = r0;
            bool nan = false;
            for (int64_t r = r0; r < r1; ++r) {
                float v;
                if (all_exact) {
                    v = exact_row(r, r0)[j];
                } else {
                    const float ub = sbuf[(r - r0) * NR + j];
                    if (ub == 0.0f) v = 0.0f;            // act(pre) <= act(ub) = 0
                    else if (ub < lbmax) continue;       // cannot reach the maximum
                    else v = exact_row(r, r0)[j];
                }
                if (v != v) { nan = true; break; }
                if (v > best) { best = v; best_r = r; }
            }
            val = nan ? NAN : best;
            pos = a.track ? a.row_tok[best_r] : -1;
        } else {
            double s = 0.0;
            for (int64_t r = r0; r < r1; ++r) {
                const float v = (all_exact || sbuf[(r - r0) * NR + j] != 0.0f) ? exact_row(r, r0)[j] : 0.0f;
                s += static_cast<double>(v);
            }
            if (a.pool == POOL_MEAN) s /= static_cast<double>(n);
            val = static_cast<float>(s);
            pos = -1;
        }
    }

    void insert(int j, int64_t b, float v, int32_t p) {
        const int64_t l = l0 + j;
        if (v != v) { a.nan_counts[l] += 1; return; }
        float* vals = a.vals + l * a.k;
        int64_t* ids = a.ids + l * a.k;
        insert_entry(vals, ids, a.pos + l * a.k, a.k, v, a.sample_ids[b], p);
        thr[j] = vals[a.k - 1];
    }

    void run_sample(int64_t b) {
        const int64_t r0 = a.row_off[b], r1 = a.row_off[b + 1];
        if (r1 <= r0) return;  // no valid token: counted by the caller
        VF bv[NV], av[NV], bb[NV], gv[NV], pooled[NV], nf[NV], lbm[NV];
        for (int v = 0; v < NV; ++v) {
            bv[v] = vload(bias + v * W); av[v] = vload(epsA + v * W); bb[v] = vload(epsB + v * W);
            gv[v] = vload(gate + v * W); pooled[v] = vzero(); nf[v] = vzero(); lbm[v] = vzero();
        }
        const VF c2 = vset1(a.c2);
        VF acc[MR][NV];
        for (int64_t r = r0; r < r1; r += MR) {
            const int m = static_cast<int>(r1 - r < MR ? r1 - r : MR);
            micro_rows(m, a.x + r * a.d, a.d, wp, acc);
            for (int i = 0; i < m; ++i) {
                const VF nx = vset1(a.nx[r + i]);
                float* srow = sbuf + (r + i - r0) * NR;
                for (int v = 0; v < NV; ++v) {
                    VF ap = vadd(acc[i][v], bv[v]);
                    VF e = vfma(vabs(ap), c2, vfma(nx, av[v], bb[v]));
                    VF ub = vadd(ap, e);
                    nf[v] = vor(nf[v], vnonfinite(ub));
                    VF au = vkeep_gt(ub, gv[v]);
                    vstore(srow + v * W, au);
                    lbm[v] = vmax(lbm[v], vkeep_gt(vsub(ap, e), gv[v]));
                    pooled[v] = a.pool == POOL_MAX ? vmax(pooled[v], au) : vadd(pooled[v], au);
                }
            }
        }
        alignas(64) float pu[NR];
        alignas(64) float fl[NR];
        alignas(64) float lb[NR];
        for (int v = 0; v < NV; ++v) { vstore(pu + v * W, pooled[v]); vstore(fl + v * W, nf[v]); vstore(lb + v * W, lbm[v]); }
        const int64_t n = r1 - r0;
        std::memset(ehave, 0, static_cast<size_t>(n));
        for (int j = 0; j < nl; ++j) {
            const bool nonfinite = f32_to_bits(fl[j]) != 0u;
            bool cand;
            if (nonfinite) {
                cand = true;
            } else if (a.pool == POOL_MAX) {
                cand = pu[j] >= thr[j];
            } else {
                double ub = static_cast<double>(pu[j]) * (1.0 + (2.0 * static_cast<double>(n) + 8.0) * 0x1p-24);
                if (a.pool == POOL_MEAN) ub = ub / static_cast<double>(n) * (1.0 + 0x1p-22);
                cand = ub >= static_cast<double>(thr[j]);
            }
            if (!cand) continue;
            float val; int32_t p;
            exact_pool(r0, r1, j, nonfinite, lb[j], val, p);
            if (val != val) { a.nan_counts[l0 + j] += 1; continue; }
            float* vals = a.vals + (l0 + j) * a.k;
            int64_t* ids = a.ids + (l0 + j) * a.k;
            if (better(val, a.sample_ids[b], vals[a.k - 1], ids[a.k - 1])) insert(j, b, val, p);
        }
    }
};

// Pack W_enc into panels [L / NR][d][NR] float32 (zero columns past L) and the column norms.
void sae_pack(const void* Wv, int wdtype, int64_t swi, int64_t swl, int64_t d, int64_t L, float* out, float* norms,
              int nthreads) {
    const int64_t npanels = (L + NR - 1) / NR;
    int nt = static_cast<double>(d) * static_cast<double>(L) < 1e6 ? 1 : nthreads;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < npanels; ++p) {
        float* o = out + p * d * NR;
        float s2[NR];
        for (int j = 0; j < NR; ++j) s2[j] = 0.0f;
        for (int64_t i = 0; i < d; ++i) {
            for (int j = 0; j < NR; ++j) {
                const int64_t l = p * NR + j;
                float w = 0.0f;
                if (l < L) {
                    const int64_t off = i * swi + l * swl;
                    w = wdtype == F16 ? f16_to_f32(static_cast<const uint16_t*>(Wv)[off])
                        : wdtype == BF16 ? bf16_to_f32(static_cast<const uint16_t*>(Wv)[off])
                        : static_cast<const float*>(Wv)[off];
                }
                o[i * NR + j] = w;
                s2[j] += w * w;
            }
        }
        for (int j = 0; j < NR && p * NR + j < L; ++j) norms[p * NR + j] = std::sqrt(s2[j]);
    }
}

void sae_topk(const SaeArgs& a) {
    const int64_t npanels = (a.L + NR - 1) / NR;
    int nt = a.nthreads;
    if (npanels < nt) nt = static_cast<int>(npanels);
    if (static_cast<double>(a.R) * static_cast<double>(a.L) * static_cast<double>(a.d) < 2e6) nt = 1;
    if (nt < 1) nt = 1;
    // blocks of whole samples whose rows fit in about 192 KB (L2), reused by every panel
    const int64_t block_rows = std::max<int64_t>(MR, (192 * 1024) / (4 * std::max<int64_t>(1, a.d)));
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t per = (npanels + n - 1) / n;
        const int64_t p0 = t * per, p1 = p0 + per < npanels ? p0 + per : npanels;
        if (p0 < p1) {
            float* sb = static_cast<float*>(std::malloc(sizeof(float) * (2 * a.tmax * NR + 64) + a.tmax + 64));
            Panel pn{a, nullptr, sb, sb + a.tmax * NR, reinterpret_cast<uint8_t*>(sb + 2 * a.tmax * NR + 64),
                     {}, {}, {}, {}, {}, 0, 0};
            int64_t b0 = 0;
            while (b0 < a.B) {
                int64_t b1 = b0 + 1;
                while (b1 < a.B && a.row_off[b1 + 1] - a.row_off[b0] <= block_rows) ++b1;
                for (int64_t p = p0; p < p1; ++p) {
                    pn.prepare(p);
                    for (int64_t b = b0; b < b1; ++b) pn.run_sample(b);
                }
                b0 = b1;
            }
            std::free(sb);
        }
    }
}

}  // namespace SLF_NS
