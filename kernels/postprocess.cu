// VAE output -> 8-bit RGB, on the device: y[b, h, w, c] = u8(rint(clamp(x[b, c, h, w] * 0.5 + 0.5,
// 0, 1) * 255)), with the exact f32 steps of the CPU path (src/ops/postprocess.rs) and diffusers'
// `(image / 2 + 0.5).clamp(0, 1)` then numpy's `(x * 255).round()` (round half to even = rintf).
// Explicit _rn intrinsics keep nvcc from contracting the multiply-adds into FMAs, whose single
// rounding could differ from the CPU's two in the last bit and flip a byte.
//
// One thread per output byte, in output order, so the writes are coalesced; the NCHW reads are
// strided by 3 within a pixel, which is cheap next to the VAE decoder that produced them.
#include "common.cuh"

#define PP_THREADS 256

template <typename T>
__device__ void to_rgb8(const T* __restrict__ x, uint8_t* __restrict__ y, int64_t n_out, int channels,
                        int64_t plane) {
  const int64_t i = (int64_t)blockIdx.x * PP_THREADS + threadIdx.x;
  if (i >= n_out) return;
  const int c = (int)(i % channels);
  const int64_t pixel = i / channels;  // b * plane + p
  const int64_t b = pixel / plane, p = pixel % plane;
  float v = to_f32(x[(b * channels + c) * plane + p]);
  v = __fadd_rn(__fmul_rn(v, 0.5f), 0.5f);
  v = fminf(fmaxf(v, 0.f), 1.f);
  v = rintf(__fmul_rn(v, 255.f));
  v = fminf(fmaxf(v, 0.f), 255.f);
  y[i] = (uint8_t)v;
}

#define PP_ENTRY(NAME, T)                                                                      \
  extern "C" __global__ void to_rgb8_##NAME(const T* x, uint8_t* y, int64_t n_out, int channels, \
                                            int64_t plane) {                                   \
    to_rgb8<T>(x, y, n_out, channels, plane);                                                  \
  }
TURBINE_FOR_EACH_DTYPE(PP_ENTRY)
