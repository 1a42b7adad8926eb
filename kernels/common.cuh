// Shared helpers for turbine's kernels: dtype conversion and warp reductions.
// Every kernel computes in f32 whatever its storage dtype (f32, f16, bf16).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// V consecutive elements moved as one access: a 16-byte vector load or store (one instruction,
// the pointer 16-byte aligned) when V elements are 16 bytes, element by element otherwise (V = 1
// for the scalar kernels). The memcpy between the vector and the elements is register moves.
template <typename T, int V>
struct Pack {
  T v[V];
};

template <typename T>
struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  Pack<T, V> out;
  if constexpr (V * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(&out, &raw, 16);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = p[k];
  }
  return out;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
  if constexpr (V * sizeof(T) == 16) {
    uint4 raw;
    memcpy(&raw, &x, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = x.v[k];
  }
}

// Instantiates `extern "C"` entry points NAME_f32, NAME_f16, NAME_bf16 from a macro that takes
// (suffix, type); PTX has no templates, so each dtype needs its own symbol.
#define TURBINE_FOR_EACH_DTYPE(M) \
  M(f32, float)                   \
  M(f16, __half)                  \
  M(bf16, __nv_bfloat16)
