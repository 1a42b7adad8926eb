// The `Prefill` epilogue of turbine's cuDNN convolution (src/ops/conv/cudnn.rs): y is filled with
// bias[channel] (+ residual) here, then cuDNN accumulates the convolution into it (beta = 1).
// The sum is taken in f32 and rounded once to the storage dtype.
//
// channel(i) = (i / inner) % channels: inner = H'W' for NCHW output, 1 for channels-last.
// Grid-stride loop over `total` elements (64-bit indices: a batch-8 VAE tensor at 1024x1024 has
// 8 * 128 * 1024 * 1024 = 2^30 elements, near i32's limit).
#include "common.cuh"

template <typename T>
__device__ void conv_prefill(const T* __restrict__ bias, const T* __restrict__ residual,
                             T* __restrict__ y, int64_t total, int64_t inner, int channels,
                             int has_residual) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    const int c = (int)((i / inner) % channels);
    float v = to_f32(bias[c]);
    if (has_residual) v += to_f32(residual[i]);
    y[i] = from_f32<T>(v);
  }
}

#define CONV_PREFILL_ENTRY(NAME, T)                                                          \
  extern "C" __global__ void conv_prefill_##NAME(const T* bias, const T* residual, T* y,      \
                                                 int64_t total, int64_t inner, int channels, \
                                                 int has_residual) {                         \
    conv_prefill<T>(bias, residual, y, total, inner, channels, has_residual);               \
  }
TURBINE_FOR_EACH_DTYPE(CONV_PREFILL_ENTRY)
