// The epilogues (epilogues.h) built with AVX-512 enabled; common.cpp calls them where the CPU has
// AVX-512F/BW/VL/DQ. Every header comes before the target pragma, so only the functions defined
// in epilogues.h (and lambdas in them) get AVX-512 code: header inline functions and templates keep
// the baseline target and cannot leak AVX-512 copies into the baseline path.
#include <ATen/Dispatch.h>

#include <cstring>
#include <tuple>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define CADK_ISA avx512
#include "epilogues.h"
#undef CADK_ISA
#pragma GCC pop_options
#else
#define CADK_ISA avx512  // no AVX-512 build: the same baseline code under the name common.cpp calls
#include "epilogues.h"
#undef CADK_ISA
#endif
