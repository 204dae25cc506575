#include "isa.h"

#include <cstdlib>
#include <cstring>

namespace slf {

static int detect() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

static int initial() {
    int best = detect();
    const char* env = std::getenv("SEMLENS_CPU_ISA");  // e.g. SEMLENS_CPU_ISA=scalar
    if (env != nullptr) {
        if (!std::strcmp(env, "scalar")) return ISA_SCALAR;
        if (!std::strcmp(env, "avx2") && best >= ISA_AVX2) return ISA_AVX2;
    }
    return best;
}

static int g_isa = initial();

int best_isa() { static int b = detect(); return b; }
int current_isa() { return g_isa; }
void set_isa(int level) {
    int b = best_isa();
    g_isa = level < 0 ? 0 : (level > b ? b : level);
}
const char* isa_name(int level) {
    return level == ISA_AVX512 ? "avx512" : level == ISA_AVX2 ? "avx2" : "scalar";
}

}  // namespace slf
