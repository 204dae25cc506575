// Run-time choice of the SIMD level shared by all kernel families.
#pragma once
namespace slf {
enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
int best_isa();          // what this CPU (and OS) supports
int current_isa();       // what the kernels use now (best_isa unless lowered)
void set_isa(int level); // lower it (tests run every path the CPU has); clamps to best_isa
const char* isa_name(int level);
}  // namespace slf
