// The top-k kernels compiled for the avx512 SIMD level (chosen at run time in topk.cpp).
#include <cstdlib>
#include <immintrin.h>
#include <omp.h>
#include "common.h"

#define SLF_LEVEL 2
#define SLF_NS slf_avx512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "topk_kernel.h"
#pragma GCC pop_options
