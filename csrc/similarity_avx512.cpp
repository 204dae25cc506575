// The similarity candidate pass compiled for the avx512 SIMD level (chosen at run time in similarity.cpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <immintrin.h>
#include <omp.h>
#include "common.h"
#include "similarity.h"

#define SLF_LEVEL 2
#define SLF_NS slf_sim_avx512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "similarity_kernel.h"
#pragma GCC pop_options
