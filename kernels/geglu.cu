// Fused GEGLU: y = a * gelu(gate) where [a, gate] are the two halves of the last dimension of the
// feed-forward projection (diffusers' GEGLU: `hidden_states, gate = proj(x).chunk(2, dim=-1)`),
// with the exact erf GELU diffusers uses (F.gelu, approximate="none"). One read of each input,
// one write, one rounding to the storage dtype; the unfused form writes gelu(gate) and the
// product as two separate tensors.
//
// Grid (rows, ceil(d / 256)): rows go on x because grid x allows 2^31-1 blocks (batch * tokens
// exceeds y's 65535), and per-block columns need no division to find their row.
#include "common.cuh"

#define GEGLU_THREADS 256

template <typename T>
__device__ void geglu(const T* __restrict__ x, T* __restrict__ y, int d) {
  const int col = blockIdx.y * GEGLU_THREADS + threadIdx.x;
  if (col >= d) return;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * 2 * (int64_t)d;
  const float a = to_f32(xr[col]);
  const float g = to_f32(xr[d + col]);
  const float gelu = 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
  y[row * d + col] = from_f32<T>(a * gelu);
}

#define GEGLU_ENTRY(NAME, T) \
  extern "C" __global__ void geglu_##NAME(const T* x, T* y, int d) { geglu<T>(x, y, d); }
TURBINE_FOR_EACH_DTYPE(GEGLU_ENTRY)
