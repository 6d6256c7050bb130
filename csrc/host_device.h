// CADK_HD: inline functions that C++ and CUDA sources share (philox.h, running_stats.h).
#pragma once

#ifdef __CUDACC__
#define CADK_HD __host__ __device__ __forceinline__
#else
#define CADK_HD inline
#endif
