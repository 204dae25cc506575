// The top-k kernels compiled for the avx2 SIMD level (chosen at run time in topk.cpp).
#include <cstdlib>
#include <immintrin.h>
#include <omp.h>
#include "common.h"

#define SLF_LEVEL 1
#define SLF_NS slf_avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "topk_kernel.h"
#pragma GCC pop_options
