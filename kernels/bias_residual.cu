// Bias + residual after a GEMM that ran without its bias: out = y + bias + residual in one pass,
// f32 arithmetic, one rounding to the storage dtype. The unfused form is the GEMM's bias pass
// (read y, write y) and then the residual add (read y and the residual, write): this reads y, the
// residual and a few bias values, and writes once.
//
// The bias is one vector of `channels` values over a contiguous tensor seen as
// [outer, channels, inner]: inner == 1 is a bias on the last dim (a Linear's output, [..., C]),
// inner > 1 a per-channel bias on an NCHW tensor ([B, C, HW]).
//
// Grid (planes, chunks). A plane is `plane_len` contiguous elements: one row of `channels` values
// when inner == 1 (the bias is indexed by column), one channel plane of `inner` values otherwise
// (one bias value per block). Planes go on grid x (up to 2^31 - 1, enough for batch * tokens);
// long planes are split into chunks on grid y (<= 65535) by the host.
#include "common.cuh"

#define BR_THREADS 256

template <typename T>
__device__ void bias_residual(const T* __restrict__ y, const T* __restrict__ bias,
                              const T* __restrict__ residual, T* __restrict__ out, int channels,
                              int64_t inner, int64_t plane_len, int64_t chunk_len) {
  const int64_t plane = blockIdx.x;
  const int64_t base = plane * plane_len;
  const int64_t start = (int64_t)blockIdx.y * chunk_len;
  const int64_t end = min(start + chunk_len, plane_len);
  const bool per_column = inner == 1;
  const float plane_bias = per_column ? 0.f : to_f32(bias[plane % channels]);
  for (int64_t i = start + threadIdx.x; i < end; i += BR_THREADS) {
    const float b = per_column ? to_f32(bias[i]) : plane_bias;
    const float v = to_f32(y[base + i]) + b + to_f32(residual[base + i]);
    out[base + i] = from_f32<T>(v);
  }
}

#define BR_ENTRY(NAME, T)                                                                      \
  extern "C" __global__ void bias_residual_##NAME(const T* y, const T* bias, const T* residual, \
                                                  T* out, int channels, int64_t inner,         \
                                                  int64_t plane_len, int64_t chunk_len) {      \
    bias_residual<T>(y, bias, residual, out, channels, inner, plane_len, chunk_len);           \
  }
TURBINE_FOR_EACH_DTYPE(BR_ENTRY)
