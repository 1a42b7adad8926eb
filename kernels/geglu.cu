// Fused GEGLU: y = a * gelu(gate) where [a, gate] are the two halves of the last dimension of the
// feed-forward projection (diffusers' GEGLU: `hidden_states, gate = proj(x).chunk(2, dim=-1)`),
// with the exact erf GELU diffusers uses (F.gelu, approximate="none"). One read of each input,
// one write, one rounding to the storage dtype; the unfused form writes gelu(gate) and the
// product as two separate tensors. geglu_bias_* also adds the projection's bias (2d values, in
// f32, to both halves) so the GEMM before it runs without its bias: no separate pass over the
// projection's output, the largest activation of the UNet.
//
// Grid (rows, ceil(d / 256)): rows go on x because grid x allows 2^31-1 blocks (batch * tokens
// exceeds y's 65535), and per-block columns need no division to find their row.
#include "common.cuh"

#define GEGLU_THREADS 256

template <typename T>
__device__ void geglu(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                      int d) {
  const int col = blockIdx.y * GEGLU_THREADS + threadIdx.x;
  if (col >= d) return;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * 2 * (int64_t)d;
  float a = to_f32(xr[col]);
  float g = to_f32(xr[d + col]);
  if (bias != nullptr) {
    a += to_f32(bias[col]);
    g += to_f32(bias[d + col]);
  }
  const float gelu = 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
  y[row * d + col] = from_f32<T>(a * gelu);
}

#define GEGLU_ENTRY(NAME, T)                                                                  \
  extern "C" __global__ void geglu_##NAME(const T* x, T* y, int d) {                         \
    geglu<T>(x, nullptr, y, d);                                                               \
  }                                                                                           \
  extern "C" __global__ void geglu_bias_##NAME(const T* x, const T* bias, T* y, int d) {     \
    geglu<T>(x, bias, y, d);                                                                  \
  }
TURBINE_FOR_EACH_DTYPE(GEGLU_ENTRY)
