// The max-pool relevance kernel compiled for the scalar SIMD level (chosen at run time in maxpool.cpp).
#include <algorithm>
#include <vector>
#include <omp.h>
#include "common.h"

#define SLF_NS slf_scalar
#include "maxpool_kernel.h"
#undef SLF_NS
