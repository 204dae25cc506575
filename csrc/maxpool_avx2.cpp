// The max-pool relevance kernel compiled for the avx2 SIMD level (chosen at run time in maxpool.cpp).
#include <algorithm>
#include <vector>
#include <omp.h>
#include "common.h"

#define SLF_NS slf_avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "maxpool_kernel.h"
#pragma GCC pop_options
#undef SLF_NS
