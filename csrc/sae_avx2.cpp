// The SAE top-k kernel compiled for the avx2 SIMD level (chosen at run time in sae.cpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <immintrin.h>
#include <omp.h>
#include "sae.h"

#define SLF_LEVEL 1
#define SLF_NS slf_sae_avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "sae_kernel.h"
#pragma GCC pop_options
#undef SLF_LEVEL
#undef SLF_NS
