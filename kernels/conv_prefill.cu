// The `Prefill` epilogue of turbine's cuDNN convolution (src/ops/conv/cudnn.rs): y is filled with
// bias[channel] (+ residual) here, then cuDNN accumulates the convolution into it (beta = 1).
// The sum is taken in f32 and rounded once to the storage dtype.
//
// It runs before every convolution that takes the prefill (all of the graph-API plans), over
// the whole output, so it must stream at memory speed: no division per element. (A grid-stride
// loop that found each element's channel as (i / inner) % channels in 64 bits spent some 50-100
// instructions an element, which held it to between a quarter and half of HBM's rate: the SM
// issues 128 thread-instructions a cycle, and HBM delivers ~9 bf16 elements a cycle per SM.)
// Each layout has its kernel, in a
// scalar form (V = 1) and a 16-byte-vector form (V = 16 / sizeof(T)) that src/ops takes when
// the channels or planes are whole vectors and the pointers 16-byte aligned:
//   conv_prefill_rows[_vec]_T    channels last: y is [rows, channels]. Grid (ceil(rows /
//                                rows_per_block)); lane l of a block owns channels [l*V, l*V +
//                                V) of every phases-th row of the block, its bias in registers.
//   conv_prefill_planes[_vec]_T  NCHW: y is [planes = N*C, plane_len = H'W']. Grid (planes,
//                                chunks): one bias value per block; chunk_len is a multiple of
//                                V, as plane_len is for the vector form.
#include "common.cuh"

#define PF_THREADS 256

template <typename T, int V>
__device__ void prefill_rows(const T* __restrict__ bias, const T* __restrict__ residual,
                             T* __restrict__ y, int64_t rows, int channels, int rows_per_block,
                             int has_residual) {
  const int lanes = channels / V;
  const int width = min(lanes, PF_THREADS);
  const int phases = PF_THREADS / width;
  const int phase = threadIdx.x / width, lane = threadIdx.x % width;
  if (phase >= phases) return;
  const int64_t r0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t r1 = min(r0 + (int64_t)rows_per_block, rows);
  for (int l = lane; l < lanes; l += width) {
    const int c = l * V;
    float b[V];
    Pack<T, V> only_bias;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      b[k] = to_f32(bias[c + k]);
      only_bias.v[k] = from_f32<T>(b[k]);
    }
    for (int64_t r = r0 + phase; r < r1; r += phases) {
      const int64_t i = r * channels + c;
      if (has_residual) {
        const Pack<T, V> res = load_pack<T, V>(residual + i);
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(b[k] + to_f32(res.v[k]));
        store_pack<T, V>(y + i, out);
      } else {
        store_pack<T, V>(y + i, only_bias);
      }
    }
  }
}

template <typename T, int V>
__device__ void prefill_planes(const T* __restrict__ bias, const T* __restrict__ residual,
                               T* __restrict__ y, int64_t plane_len, int channels,
                               int64_t chunk_len, int has_residual) {
  const int64_t plane = blockIdx.x;
  const float b = to_f32(bias[plane % channels]);
  Pack<T, V> only_bias;
#pragma unroll
  for (int k = 0; k < V; ++k) only_bias.v[k] = from_f32<T>(b);
  const int64_t base = plane * plane_len;
  const int64_t start = (int64_t)blockIdx.y * chunk_len;
  const int64_t end = min(start + chunk_len, plane_len);
  for (int64_t j = start + (int64_t)threadIdx.x * V; j < end; j += (int64_t)PF_THREADS * V) {
    const int64_t i = base + j;
    if (has_residual) {
      const Pack<T, V> res = load_pack<T, V>(residual + i);
      Pack<T, V> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = from_f32<T>(b + to_f32(res.v[k]));
      store_pack<T, V>(y + i, out);
    } else {
      store_pack<T, V>(y + i, only_bias);
    }
  }
}

#define CONV_PREFILL_ENTRY(NAME, T)                                                               \
  extern "C" __global__ void conv_prefill_rows_##NAME(const T* bias, const T* residual, T* y,     \
                                                      int64_t rows, int channels,                 \
                                                      int rows_per_block, int has_residual) {     \
    prefill_rows<T, 1>(bias, residual, y, rows, channels, rows_per_block, has_residual);          \
  }                                                                                               \
  extern "C" __global__ void conv_prefill_rows_vec_##NAME(const T* bias, const T* residual, T* y, \
                                                          int64_t rows, int channels,             \
                                                          int rows_per_block, int has_residual) { \
    prefill_rows<T, Vec16<T>::N>(bias, residual, y, rows, channels, rows_per_block,               \
                                 has_residual);                                                   \
  }                                                                                               \
  extern "C" __global__ void conv_prefill_planes_##NAME(const T* bias, const T* residual, T* y,   \
                                                        int64_t plane_len, int channels,          \
                                                        int64_t chunk_len, int has_residual) {    \
    prefill_planes<T, 1>(bias, residual, y, plane_len, channels, chunk_len, has_residual);        \
  }                                                                                               \
  extern "C" __global__ void conv_prefill_planes_vec_##NAME(                                      \
      const T* bias, const T* residual, T* y, int64_t plane_len, int channels, int64_t chunk_len, \
      int has_residual) {                                                                         \
    prefill_planes<T, Vec16<T>::N>(bias, residual, y, plane_len, channels, chunk_len,             \
                                   has_residual);                                                 \
  }
TURBINE_FOR_EACH_DTYPE(CONV_PREFILL_ENTRY)
