// Host emulation of the CUDA device features turbine's kernels use, force-included (-include) in
// front of their source. This is the side the kernels see; host_runtime.h implements it: a grid
// runs block by block, each CUDA thread a fiber, one thread running at a time, so the
// coordinates below are plain globals the scheduler sets before it resumes a thread.
// host_source.sh turns each __shared__ array declaration into a call to mock_shared or
// mock_dynamic_shared (static C++ arrays would be shared by every block and never re-poisoned).
#pragma once
#include <assert.h>
#include <math.h>
#include <stddef.h>
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
extern mock_dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's vector types carry their natural alignment, which the ASan build's alignment checks
// then hold every vector load and store to.
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

// CUDA overloads min/max per integer type; with only the int ones, 64-bit arguments would be
// truncated without a word.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

// __expf is ex2.approx(x * log2(e)) on the GPU: keeping the f32 product keeps its main error
// (it grows with |x|), where expf would be more exact than the device.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
// The _rn intrinsics are the uncontracted operations; the host builds use -ffp-contract=off, so
// plain operators are exactly that.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);

namespace cuda_host {
// Every lane of the calling warp passes `bytes` of its value in; each gets lane `src_lane`'s
// back (its own when src_lane is out of range).
void warp_exchange(unsigned mask, const void* in, void* out, size_t bytes, int src_lane);
int lane_id();
}  // namespace cuda_host

template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  T out;
  cuda_host::warp_exchange(mask, &v, &out, sizeof v, src_lane & 31);
  return out;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  T out;
  cuda_host::warp_exchange(mask, &v, &out, sizeof v, (cuda_host::lane_id() ^ lane_mask) & 31);
  return out;
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  T out;
  cuda_host::warp_exchange(mask, &v, &out, sizeof v, cuda_host::lane_id() + (int)delta);
  return out;
}

// A block's static __shared__ array (one per declaration site: file and line) and its dynamic
// shared memory, both filled with 0xff bytes when the block starts.
void* mock_shared(size_t bytes, size_t align, const char* file, int line);
void* mock_dynamic_shared(size_t align);
