// Max-pool relevance (winner takes all, ties split), written once and compiled once per SIMD
// level: each maxpool_<level>.cpp defines SLF_NS, switches the compiler target and includes
// this. The specification is semlens_fast/ops/reference/maxpool.py; every result here equals it
// bit for bit:
//   y = max of the window (NaN if it holds a NaN), cnt = #{x == y} (0 counts as 1),
//   r = R / cnt, out = (x == y ? 1 : 0) * r   (so 0 * r for the others: -0.0, NaN as IEEE says),
//   +0.0 past the last full window.
// Work split: OpenMP over rows of windows (b, c, ho); each writes its own kh output rows.
// Counts are kept in T: exact (a window has far fewer than 2^24 inputs).

namespace SLF_NS {
using namespace slf;

// max that propagates NaN (a NaN in the window makes y NaN, which no input equals)
template <typename T> static inline T max_nan(T m, T v) { return (v > m || v != v) ? v : m; }

// One row of windows: kh input rows of width W (stride W), Wo windows of kw columns. Written as
// passes over the Wc = Wo * kw covered columns that the compiler vectorises; the per-window
// steps (maximum over the kw columns, count, share) work on the small buffers yw, rw of Wc.
template <typename T, int KH, int KW>
static inline void window_row(const T* x, const T* R, T* out, int64_t W, int64_t Wo, int kh_rt, int kw_rt,
                              T* yw, T* rw) {
    const int kh = KH ? KH : kh_rt, kw = KW ? KW : kw_rt;
    const int64_t Wc = Wo * kw;
    for (int64_t w = 0; w < Wc; ++w) yw[w] = x[w];  // column maxima over the kh rows
    for (int i = 1; i < kh; ++i)
        for (int64_t w = 0; w < Wc; ++w) yw[w] = max_nan(yw[w], x[i * W + w]);
    for (int64_t wo = 0; wo < Wo; ++wo) {  // window maxima, repeated over the window's columns
        T y = yw[wo * kw];
        for (int j = 1; j < kw; ++j) y = max_nan(y, yw[wo * kw + j]);
        for (int j = 0; j < kw; ++j) yw[wo * kw + j] = y;
    }
    for (int64_t w = 0; w < Wc; ++w) rw[w] = T(x[w] == yw[w]);  // ties per column
    for (int i = 1; i < kh; ++i)
        for (int64_t w = 0; w < Wc; ++w) rw[w] += T(x[i * W + w] == yw[w]);
    for (int64_t wo = 0; wo < Wo; ++wo) {  // shares, repeated over the window's columns
        T cnt = rw[wo * kw];
        for (int j = 1; j < kw; ++j) cnt += rw[wo * kw + j];
        const T r = R[wo] / (cnt == T(0) ? T(1) : cnt);
        for (int j = 0; j < kw; ++j) rw[wo * kw + j] = r;
    }
    for (int i = 0; i < kh; ++i) {
        const T* xi = x + i * W;
        T* oi = out + i * W;
        for (int64_t w = 0; w < Wc; ++w) oi[w] = T(xi[w] == yw[w]) * rw[w];
        for (int64_t w = Wc; w < W; ++w) oi[w] = T(0);
    }
}

template <typename T, int KH, int KW>
static void run(const T* x, const T* R, T* out, int64_t BC, int64_t H, int64_t W, int kh, int kw, int nthreads) {
    const int64_t Ho = H / kh, Wo = W / kw, rows = BC * Ho;
    const int nt = (BC * H * W < (1 << 15)) ? 1 : nthreads;
#pragma omp parallel num_threads(nt)
    {
        std::vector<T> buf(static_cast<size_t>(2 * Wo * kw));
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t bc = r / Ho, ho = r - bc * Ho;
            const int64_t off = (bc * H + ho * kh) * W;
            window_row<T, KH, KW>(x + off, R + r * Wo, out + off, W, Wo, kh, kw, buf.data(), buf.data() + Wo * kw);
        }
        if (H > Ho * kh) {  // rows past the last full window
#pragma omp for schedule(static)
            for (int64_t bc = 0; bc < BC; ++bc)
                std::fill(out + (bc * H + Ho * kh) * W, out + (bc + 1) * H * W, T(0));
        }
    }
}

template <typename T>
static void maxpool_relevance_t(const T* x, const T* R, T* out, int64_t BC, int64_t H, int64_t W, int kh, int kw,
                                int nthreads) {
    if (kh == 2 && kw == 2) run<T, 2, 2>(x, R, out, BC, H, W, kh, kw, nthreads);
    else if (kh == 3 && kw == 3) run<T, 3, 3>(x, R, out, BC, H, W, kh, kw, nthreads);
    else run<T, 0, 0>(x, R, out, BC, H, W, kh, kw, nthreads);
}

void maxpool_relevance(const void* x, const void* R, void* out, int dtype, int64_t BC, int64_t H, int64_t W,
                       int kh, int kw, int nthreads) {
    if (dtype == 0)
        maxpool_relevance_t(static_cast<const float*>(x), static_cast<const float*>(R), static_cast<float*>(out),
                            BC, H, W, kh, kw, nthreads);
    else
        maxpool_relevance_t(static_cast<const double*>(x), static_cast<const double*>(R), static_cast<double*>(out),
                            BC, H, W, kh, kw, nthreads);
}

}  // namespace SLF_NS
