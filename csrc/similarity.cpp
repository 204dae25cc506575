// Python bindings of the similarity kernel family: the cosine top-k candidate pass
// (per SIMD level, similarity_kernel.h) and the exact float64 rescoring (here, ISA
// independent). The Python side (semlens_fast/ops/cpu/similarity.py) validates every
// argument and passes raw pointers; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <omp.h>

#include "common.h"
#include "isa.h"
#include "similarity.h"

namespace py = pybind11;

namespace slf_sim_scalar { void sim_candidates(const slf::SimArgs& a); }
namespace slf_sim_avx2 { void sim_candidates(const slf::SimArgs& a); }
namespace slf_sim_avx512 { void sim_candidates(const slf::SimArgs& a); }

namespace slf {

static void sim_dispatch(const SimArgs& a) {
    switch (current_isa()) {
        case ISA_AVX512: slf_sim_avx512::sim_candidates(a); break;
        case ISA_AVX2: slf_sim_avx2::sim_candidates(a); break;
        default: slf_sim_scalar::sim_candidates(a); break;
    }
}

// The definition of a score (the torch reference computes the same, operation for
// operation): with every product formed exactly in float64 and the sums taken
// sequentially over i = 0 .. d-1,
//     dot = sum q_i x_i,  nq = sqrt(sum q_i^2),  nx = sqrt(sum x_i^2),
//     score = float32(dot / (nq * nx)) + 0.0f      (0 when nq or nx is 0).
// Products of two float32 are exact in float64, so fused multiply-adds give the same
// sums as separate multiplies and adds; only the order matters, and it is fixed.
template <int DT>
static void rescore_dt(const float* q, int64_t Q, int64_t d, const void* xv, int64_t xs,
                       const int64_t* cand, int64_t C, float* out, int nthreads) {
    using T = typename In<DT>::T;
    const T* x = static_cast<const T*>(xv);
    int nt = (Q * C * d < (1 << 16)) ? 1 : nthreads;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
    for (int64_t qi = 0; qi < Q; ++qi) {
        const float* qr = q + qi * d;
        double nq2 = 0.0;
        for (int64_t i = 0; i < d; ++i) nq2 += static_cast<double>(qr[i]) * static_cast<double>(qr[i]);
        const double nq = std::sqrt(nq2);
        int64_t c = 0;
        // two candidates at a time: four independent dependency chains
        for (; c < C; ++c) {
            const int64_t id = cand[qi * C + c];
            if (id < 0) { out[qi * C + c] = -std::numeric_limits<float>::infinity(); continue; }
            int64_t c2 = c + 1;
            while (c2 < C && cand[qi * C + c2] < 0) {
                out[qi * C + c2] = -std::numeric_limits<float>::infinity();
                ++c2;
            }
            const T* xa = x + id * xs;
            if (c2 < C) {
                const T* xb = x + cand[qi * C + c2] * xs;
                double da = 0.0, na = 0.0, db = 0.0, nb = 0.0;
                for (int64_t i = 0; i < d; ++i) {
                    const double qd = static_cast<double>(qr[i]);
                    const double a = static_cast<double>(In<DT>::get(xa + i));
                    const double b = static_cast<double>(In<DT>::get(xb + i));
                    da += qd * a; na += a * a;
                    db += qd * b; nb += b * b;
                }
                const double sa = std::sqrt(na), sb = std::sqrt(nb);
                out[qi * C + c] = (nq == 0.0 || sa == 0.0) ? 0.0f : static_cast<float>(da / (nq * sa)) + 0.0f;
                out[qi * C + c2] = (nq == 0.0 || sb == 0.0) ? 0.0f : static_cast<float>(db / (nq * sb)) + 0.0f;
                c = c2;
            } else {
                double da = 0.0, na = 0.0;
                for (int64_t i = 0; i < d; ++i) {
                    const double qd = static_cast<double>(qr[i]);
                    const double a = static_cast<double>(In<DT>::get(xa + i));
                    da += qd * a; na += a * a;
                }
                const double sa = std::sqrt(na);
                out[qi * C + c] = (nq == 0.0 || sa == 0.0) ? 0.0f : static_cast<float>(da / (nq * sa)) + 0.0f;
                c = C;
            }
        }
    }
}

}  // namespace slf

void register_similarity(py::module_& m) {
    m.def(
        "sim_candidates",
        [](uintptr_t q, int64_t Q, int64_t d, uintptr_t x, int dtype, int64_t N, int64_t xs, int64_t K,
           uintptr_t vals, uintptr_t ids, uintptr_t excl, int64_t mex, uintptr_t bad, int64_t max_bad,
           int nthreads, uintptr_t q16, int64_t merge_k) {
            int64_t n_bad = 0;
            slf::SimArgs a{reinterpret_cast<const float*>(q), Q, d, reinterpret_cast<const void*>(x), dtype, N, xs, K,
                           reinterpret_cast<float*>(vals), reinterpret_cast<int64_t*>(ids),
                           reinterpret_cast<const int64_t*>(excl), mex, reinterpret_cast<int64_t*>(bad), max_bad,
                           &n_bad, nthreads, reinterpret_cast<const int16_t*>(q16)};
            a.merge_k = merge_k;
            slf::sim_dispatch(a);
            return n_bad;
        },
        py::arg("q"), py::arg("Q"), py::arg("d"), py::arg("x"), py::arg("dtype"), py::arg("N"), py::arg("xs"),
        py::arg("K"), py::arg("vals"), py::arg("ids"), py::arg("excl"), py::arg("m"), py::arg("bad"),
        py::arg("max_bad"), py::arg("nthreads"), py::arg("q16") = 0, py::arg("merge_k") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Approximate cosine top-K candidates per query (raw pointers, validated by the Python wrapper); "
        "returns the number of rows holding NaN/inf. merge_k: from this K on candidates are merged in "
        "batches (<= 0: never).");
    m.def(
        "sim_rescore",
        [](uintptr_t q, int64_t Q, int64_t d, uintptr_t x, int dtype, int64_t xs, uintptr_t cand, int64_t C,
           uintptr_t out, int nthreads) {
            const float* qp = reinterpret_cast<const float*>(q);
            const void* xp = reinterpret_cast<const void*>(x);
            const int64_t* cp = reinterpret_cast<const int64_t*>(cand);
            float* op = reinterpret_cast<float*>(out);
            switch (dtype) {
                case slf::F32: slf::rescore_dt<slf::F32>(qp, Q, d, xp, xs, cp, C, op, nthreads); break;
                case slf::F16: slf::rescore_dt<slf::F16>(qp, Q, d, xp, xs, cp, C, op, nthreads); break;
                default: slf::rescore_dt<slf::BF16>(qp, Q, d, xp, xs, cp, C, op, nthreads); break;
            }
        },
        py::call_guard<py::gil_scoped_release>(),
        "Exact cosine scores (float64, sequential order, rounded once) of candidate rows (raw pointers).");
}
