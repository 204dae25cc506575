// The similarity candidate pass compiled for the scalar SIMD level (chosen at run time in similarity.cpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <immintrin.h>
#include <omp.h>
#include "common.h"
#include "similarity.h"

#define SLF_LEVEL 0
#define SLF_NS slf_sim_scalar
#include "similarity_kernel.h"
