// The SAE top-k kernel compiled for the avx512 SIMD level (chosen at run time in sae.cpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <immintrin.h>
#include <omp.h>
#include "sae.h"

#define SLF_LEVEL 2
#define SLF_NS slf_sae_avx512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "sae_kernel.h"
#pragma GCC pop_options
#undef SLF_LEVEL
#undef SLF_NS
