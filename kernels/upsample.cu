// Nearest-neighbour 2x upsampling of a contiguous channels-last [N, H, W, C] tensor to
// [N, 2H, 2W, C]: output pixel (n, oh, ow) is input pixel (n, oh/2, ow/2), all C channels.
//
// A pixel's channels are contiguous in both tensors, so the kernel moves them as opaque units of
// 16, 8, 4 or 2 bytes (the widest that divides a pixel's bytes and both pointers' alignment):
// one kernel per unit width serves every dtype, and a bf16 pixel of 512 channels is 64 16-byte
// moves. The index arithmetic is per unit, in 32 bits within a row (candle's strided copy of a
// broadcast view does 64-bit division per element and dimension).
//
// Grid (N*2H, ceil(2W*units / NU_THREADS)): blockIdx.x is an output row (n*2H + oh, whose source
// row is n*H + oh/2 = row/2), blockIdx.y a run of that row's 2W*units units.
#include <stdint.h>

#define NU_THREADS 256

template <typename U>
__device__ void nearest2x_nhwc(const U* __restrict__ x, U* __restrict__ y, int width,
                               int units_per_pixel) {
  const int64_t row = blockIdx.x;
  const int row_units = 2 * width * units_per_pixel;
  const int j = blockIdx.y * NU_THREADS + threadIdx.x;
  if (j >= row_units) return;
  const int ow = j / units_per_pixel;
  const int u = j - ow * units_per_pixel;
  const int64_t src = ((row >> 1) * width + (ow >> 1)) * units_per_pixel + u;
  y[row * row_units + j] = x[src];
}

#define NU_ENTRY(BYTES, U)                                                                     \
  extern "C" __global__ void nearest2x_nhwc_u##BYTES(const U* x, U* y, int width,             \
                                                     int units_per_pixel) {                     \
    nearest2x_nhwc<U>(x, y, width, units_per_pixel);                                           \
  }
NU_ENTRY(16, uint4)
NU_ENTRY(8, uint2)
NU_ENTRY(4, uint32_t)
NU_ENTRY(2, uint16_t)

// ---- Nearest 2x upsampling followed by a 3x3 convolution, as four 2x2 convolutions ----
//
// src/ops/upsample_conv.rs rewrites `conv3x3(upsample2x(x))` (padding 1) as one 2x2 convolution
// of the low-resolution x with padding 1 and four times the output channels, y of
// (H+1) x (W+1) pixels, one channel block per output phase p = 2a + b. Output pixel
// (2i+a, 2j+b) is phase p of y's pixel (i+a, j+b). These kernels gather those pixels into the
// [N, 2H, 2W, O] (NHWC) or [N, O, 2H, 2W] (NCHW) result; `height` and `width` are the
// low-resolution H and W.
//
// NHWC: grid and units as nearest2x_nhwc above (blockIdx.x an output row n*2H + oh, blockIdx.y a
// run of its 2W*units units); a source pixel holds 4*units units, phase p's at p*units.
template <typename U>
__device__ void phases_nhwc(const U* __restrict__ x, U* __restrict__ y, int height, int width,
                            int units_per_pixel) {
  const int64_t row = blockIdx.x;
  const int row_units = 2 * width * units_per_pixel;
  const int j = blockIdx.y * NU_THREADS + threadIdx.x;
  if (j >= row_units) return;
  const int64_t n = row / (2 * height);
  const int oh = (int)(row - n * 2 * height);
  const int a = oh & 1;
  const int ow = j / units_per_pixel;
  const int u = j - ow * units_per_pixel;
  const int b = ow & 1;
  const int64_t pixel = (n * (height + 1) + (oh >> 1) + a) * (width + 1) + (ow >> 1) + b;
  y[row * row_units + j] = x[(pixel * 4 + 2 * a + b) * units_per_pixel + u];
}

// NCHW: one element per thread; blockIdx.x is an output row (n*O + o)*2H + oh, blockIdx.y a run
// of NU_THREADS of its 2W elements. y's channel p*O + o holds phase p of output channel o.
template <typename E>
__device__ void phases_nchw(const E* __restrict__ x, E* __restrict__ y, int height, int width,
                            int channels) {
  const int64_t row = blockIdx.x;
  const int ow = blockIdx.y * NU_THREADS + threadIdx.x;
  if (ow >= 2 * width) return;
  const int64_t plane = row / (2 * height);
  const int oh = (int)(row - plane * 2 * height);
  const int64_t n = plane / channels;
  const int o = (int)(plane - n * channels);
  const int a = oh & 1, b = ow & 1;
  const int64_t src_plane = n * 4 * channels + (2 * a + b) * channels + o;
  const int64_t src = (src_plane * (height + 1) + (oh >> 1) + a) * (width + 1) + (ow >> 1) + b;
  y[row * 2 * width + ow] = x[src];
}

#define PH_NHWC_ENTRY(BYTES, U)                                                                \
  extern "C" __global__ void phases_nhwc_u##BYTES(const U* x, U* y, int height, int width,     \
                                                  int units_per_pixel) {                       \
    phases_nhwc<U>(x, y, height, width, units_per_pixel);                                      \
  }
PH_NHWC_ENTRY(16, uint4)
PH_NHWC_ENTRY(8, uint2)
PH_NHWC_ENTRY(4, uint32_t)
PH_NHWC_ENTRY(2, uint16_t)

#define PH_NCHW_ENTRY(BYTES, E)                                                                \
  extern "C" __global__ void phases_nchw_u##BYTES(const E* x, E* y, int height, int width,     \
                                                  int channels) {                              \
    phases_nchw<E>(x, y, height, width, channels);                                             \
  }
PH_NCHW_ENTRY(4, uint32_t)
PH_NCHW_ENTRY(2, uint16_t)
