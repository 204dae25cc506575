// The top-k kernels compiled for the scalar SIMD level (chosen at run time in topk.cpp).
#include <cstdlib>
#include <immintrin.h>
#include <omp.h>
#include "common.h"

#define SLF_LEVEL 0
#define SLF_NS slf_scalar
#include "topk_kernel.h"
