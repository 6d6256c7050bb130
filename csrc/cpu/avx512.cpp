// The AVX-512 builds of the CPU kernels that cadk writes as plain loops (epilogues.h,
// bn_gate_act_kernels.h, gated_residual_kernels.h); common.cpp, bn_gate_act.cpp and gated_residual.cpp
// call them where the CPU has AVX-512F/BW/VL/DQ (cpu_has_avx512_bw). Every other header comes before
// the target pragma, so only the functions those three headers define (and the lambdas in them) get
// AVX-512 code: inline functions and templates from other headers keep the baseline target, and no
// AVX-512 copy of them can reach the baseline path.
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstring>
#include <tuple>

#include "ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define CADK_AVX512_TARGET 1
#endif

#define CADK_ISA avx512  // without x86-64 GCC/Clang: the baseline code under this name (never called)
#include "bn_gate_act_kernels.h"
#include "epilogues.h"
#include "gated_residual_kernels.h"
#undef CADK_ISA

#ifdef CADK_AVX512_TARGET
#pragma GCC pop_options
#endif
