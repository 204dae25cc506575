// Arguments of the fused SAE encode + pool + top-k kernel (see sae_kernel.h, semlens_fast/ops/sae.py).
#pragma once

#include "common.h"

namespace slf {

constexpr int SAE_NR = 16;  // latents per packed panel

struct SaeArgs {
    float* vals;          // [L, k] state
    int64_t* ids;         // [L, k]
    int32_t* pos;         // [L, k]
    int64_t* nan_counts;  // [L]
    int64_t L, k;
    const float* x;       // [R, d] float32 rows (valid tokens only, sample-major, token ascending; b_dec applied)
    const float* nx;      // [R] float32 L2 norms of the rows
    int64_t R, d;
    const int64_t* row_off;  // [B + 1] rows of sample b: [row_off[b], row_off[b + 1])
    const int32_t* row_tok;  // [R] token index of each row
    int64_t B, tmax;         // samples; most rows of one sample
    const float* wpacked;    // [ceil(L / 16), d, 16] packed W_enc (sae_pack)
    const float* wnorm;      // [L] float32 column norms of W_enc
    const float* benc;       // [L] float32
    const float* thr;        // [L] float32 JumpReLU thresholds, or nullptr (ReLU)
    const int64_t* sample_ids;  // [B]
    int pool;                // POOL_MAX, POOL_MEAN or POOL_SUM
    bool track;              // record token positions (max pooling)
    float c0, c1, c2;        // error bound constants
    int nthreads;
};

}  // namespace slf
