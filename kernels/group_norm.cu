// Fused GroupNorm (+ optional SiLU) over a contiguous [N, C, HW] tensor, statistics in f32.
//
// candle composes GroupNorm from ~13 kernels with f32 temporaries of the whole activation; this
// reads the input twice and writes it once, in three launches:
//   1. gn_stats_T:  grid N*G*splits. Each block reduces one chunk of one group to a partial
//                   (count, mean, M2), so even batch 1 with 32 groups fills the GPU when groups
//                   are large (the VAE's 512x512 levels have 1M elements per group).
//   2. gn_finalize: one thread per group merges its partials in f64 -> (mean, 1/sqrt(var+eps)).
//   3. gn_apply_T:  grid (N*C, chunks). Each block works inside one channel plane, so the
//                   per-channel scale and shift are computed once per block, not per element.
// A group (n, g) is the contiguous span of cpg*HW elements starting at (n*G + g)*cpg*HW.
#include "common.cuh"

#define GN_THREADS 256

struct Partial {
  float n, mean, m2;
};

// Chan et al.'s pairwise merge of two (count, mean, M2) summaries.
__device__ __forceinline__ void merge(Partial& a, const Partial& b) {
  if (b.n == 0.f) return;
  if (a.n == 0.f) {
    a = b;
    return;
  }
  const float n = a.n + b.n;
  const float d = b.mean - a.mean;
  const float fb = b.n / n;
  a.mean += d * fb;
  a.m2 += b.m2 + d * d * a.n * fb;
  a.n = n;
}

template <typename T>
__device__ void gn_stats(const T* __restrict__ x, float* __restrict__ partial, int64_t group_len,
                         int64_t chunk_len, int splits) {
  // Flattened (group, split) so the group count is not bounded by grid y's 65535.
  const int64_t group = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const T* xg = x + group * group_len;
  const int64_t start = (int64_t)split * chunk_len;
  const int64_t end = min(start + chunk_len, group_len);
  // Sums of (v - shift) with shift = the group's first value: a cheap guard against the
  // cancellation of sum(v^2) - sum(v)^2/n when |mean| >> std, without a division per element.
  const float shift = to_f32(xg[0]);
  float s = 0.f, q = 0.f;
  int count = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += GN_THREADS) {
    const float d = to_f32(xg[i]) - shift;
    s += d;
    q += d * d;
    ++count;
  }
  Partial p;
  p.n = (float)count;
  p.mean = count ? shift + s / count : 0.f;
  p.m2 = count ? fmaxf(q - s * s / count, 0.f) : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Partial other;
    other.n = __shfl_down_sync(0xffffffffu, p.n, o);
    other.mean = __shfl_down_sync(0xffffffffu, p.mean, o);
    other.m2 = __shfl_down_sync(0xffffffffu, p.m2, o);
    merge(p, other);
  }
  __shared__ Partial warps[GN_THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warps[warp] = p;
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial total = warps[0];
    for (int w = 1; w < GN_THREADS / 32; ++w) merge(total, warps[w]);
    float* out = partial + (int64_t)blockIdx.x * 3;
    out[0] = total.n;
    out[1] = total.mean;
    out[2] = total.m2;
  }
}

extern "C" __global__ void gn_finalize(const float* __restrict__ partial, float* __restrict__ stats,
                                       int num_groups, int splits, float eps) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= num_groups) return;
  const float* p = partial + (int64_t)g * splits * 3;
  // f64: the merged count can exceed f32's exact integer range (2^24) for large images.
  double n = 0., mean = 0., m2 = 0.;
  for (int i = 0; i < splits; ++i) {
    const double nb = p[3 * i], mb = p[3 * i + 1], m2b = p[3 * i + 2];
    if (nb == 0.) continue;
    const double nn = n + nb;
    const double d = mb - mean;
    mean += d * nb / nn;
    m2 += m2b + d * d * n * nb / nn;
    n = nn;
  }
  const double var = n > 0. ? m2 / n : 0.;
  stats[2 * g] = (float)mean;
  stats[2 * g + 1] = (float)(1.0 / sqrt(var + (double)eps));
}

template <typename T>
__device__ void gn_apply(const T* __restrict__ x, const float* __restrict__ stats,
                         const T* __restrict__ weight, const T* __restrict__ bias,
                         T* __restrict__ y, int channels, int channels_per_group, int64_t hw,
                         int64_t chunk_len, int silu) {
  const int64_t plane = blockIdx.x;  // n * C + c
  const int c = (int)(plane % channels);
  const int64_t group = plane / channels_per_group;  // n * G + c / cpg
  const float mean = stats[2 * group], rstd = stats[2 * group + 1];
  const float scale = rstd * to_f32(weight[c]);
  const float shift = to_f32(bias[c]) - mean * scale;
  const T* xp = x + plane * hw;
  T* yp = y + plane * hw;
  const int64_t start = (int64_t)blockIdx.y * chunk_len;
  const int64_t end = min(start + chunk_len, hw);
  for (int64_t i = start + threadIdx.x; i < end; i += GN_THREADS) {
    float v = to_f32(xp[i]) * scale + shift;
    if (silu) v = v / (1.f + __expf(-v));
    yp[i] = from_f32<T>(v);
  }
}

#define GN_ENTRY(NAME, T)                                                                        \
  extern "C" __global__ void gn_stats_##NAME(const T* x, float* partial, int64_t group_len,    \
                                             int64_t chunk_len, int splits) {                   \
    gn_stats<T>(x, partial, group_len, chunk_len, splits);                                      \
  }                                                                                              \
  extern "C" __global__ void gn_apply_##NAME(const T* x, const float* stats, const T* weight,  \
                                             const T* bias, T* y, int channels,                \
                                             int channels_per_group, int64_t hw,               \
                                             int64_t chunk_len, int silu) {                     \
    gn_apply<T>(x, stats, weight, bias, y, channels, channels_per_group, hw, chunk_len, silu); \
  }
TURBINE_FOR_EACH_DTYPE(GN_ENTRY)
