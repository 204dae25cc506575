// The max-pool relevance kernel compiled for the avx512 SIMD level (chosen at run time in maxpool.cpp).
#include <algorithm>
#include <vector>
#include <omp.h>
#include "common.h"

#define SLF_NS slf_avx512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "maxpool_kernel.h"
#pragma GCC pop_options
#undef SLF_NS
