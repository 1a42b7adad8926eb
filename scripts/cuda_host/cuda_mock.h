// Host emulation of the CUDA features kernels/flash_attn.cu uses, force-included (-include) in
// front of it: one block runs at a time, its threads are std::threads, __syncthreads and
// __syncwarp are std::barriers, shuffles go through a per-warp buffer, and the kernel's shared
// memory is one poisoned host buffer (flash_attn_check.sh swaps the declaration in). The runtime
// half lives in flash_attn_check.cpp.
#pragma once
#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct mock_dim3 {
  unsigned x, y, z;
};
extern thread_local mock_dim3 threadIdx;
extern mock_dim3 blockIdx;

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline int min(int a, int b) { return a < b ? a : b; }

void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
float __shfl_sync(unsigned mask, float v, int src_lane);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
unsigned char* mock_shared_memory(size_t bytes);
