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
