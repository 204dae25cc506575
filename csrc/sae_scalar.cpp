// The SAE top-k kernel compiled for the scalar SIMD level (chosen at run time in sae.cpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <immintrin.h>
#include <omp.h>
#include "sae.h"

#define SLF_LEVEL 0
#define SLF_NS slf_sae_scalar
#include "sae_kernel.h"
#undef SLF_LEVEL
#undef SLF_NS
