// Fused GroupNorm (+ optional SiLU), statistics in f32, in two layouts.
//
// candle composes GroupNorm from ~13 kernels with f32 temporaries of the whole activation; this
// reads the input twice and writes it once, in three launches:
//   1. statistics: each block reduces one chunk to a partial (count, mean, M2) per group, so even
//      batch 1 with 32 groups fills the GPU when groups are large (the VAE's 512x512 levels have
//      1M elements per group).
//        gn_stats_T     [N, C, HW]: grid N*G*splits, one chunk of one group (a contiguous span).
//        gn_cl_stats_T  [N, HW, C]: grid (splits, N), a run of positions of one sample, all
//                       channels, so each warp reads consecutive channels (coalesced); a partial
//                       per group of the chunk.
//   2. gn_finalize: one block per group merges its partials in f64 -> (mean, 1/sqrt(var+eps)).
//      Both layouts write partials as [N*G][splits][3], so this kernel serves both.
//   3. apply, y = (x - mean) * scale + bias with scale = weight * rstd per (n, channel). Not
//      x * scale + (bias - mean * scale), one subtraction fewer: its two large terms cancel,
//      an error of ~|mean * scale| * 2^-24 against outputs of ~|weight| + |bias|, beyond f32's
//      1e-5 from |mean| ~ 300 std; a group of equal values (variance 0, rstd 1/sqrt(eps)) got
//      its bias off by ~|x| * rstd * 2^-24 (0.1 for x = 1000 at eps 1e-6), where subtracting
//      the mean first gives it exactly:
//        gn_apply_T     grid (N*C, chunks): each block inside one channel plane.
//        gn_cl_apply_T  grid (chunks, N): each block a run of positions, all channels.
// Channels-first: a group (n, g) is the contiguous span of cpg*HW elements starting at
// (n*G + g)*cpg*HW. Channels-last: group (n, g) is channels [g*cpg, (g+1)*cpg) of every position
// of sample n; element (n, p, c) is at (n*HW + p)*C + c.
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

// Threads per gn_finalize block: the VAE's largest norms have ~4000 partials per group.
#define GN_FIN_THREADS 128

struct Partial64 {
  double n, mean, m2;
};

__device__ __forceinline__ void merge64(Partial64& a, double nb, double mb, double m2b) {
  if (nb == 0.) return;
  if (a.n == 0.) {
    a.n = nb;
    a.mean = mb;
    a.m2 = m2b;
    return;
  }
  const double n = a.n + nb;
  const double d = mb - a.mean;
  const double fb = nb / n;
  a.mean += d * fb;
  a.m2 += m2b + d * d * a.n * fb;
  a.n = n;
}

// One block per group (grid num_groups). Each thread merges a strided subset of the group's
// partials, then the block merges its threads' results. f64: the merged count can exceed f32's
// exact integer range (2^24) for large images.
extern "C" __global__ void gn_finalize(const float* __restrict__ partial, float* __restrict__ stats,
                                       int num_groups, int splits, float eps) {
  const int64_t g = blockIdx.x;
  if (g >= num_groups) return;
  const float* p = partial + g * splits * 3;
  Partial64 acc = {0., 0., 0.};
  for (int i = threadIdx.x; i < splits; i += GN_FIN_THREADS) {
    merge64(acc, p[3 * i], p[3 * i + 1], p[3 * i + 2]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double nb = __shfl_down_sync(0xffffffffu, acc.n, o);
    const double mb = __shfl_down_sync(0xffffffffu, acc.mean, o);
    const double m2b = __shfl_down_sync(0xffffffffu, acc.m2, o);
    merge64(acc, nb, mb, m2b);
  }
  __shared__ Partial64 warps[GN_FIN_THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warps[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial64 total = warps[0];
    for (int w = 1; w < GN_FIN_THREADS / 32; ++w) {
      merge64(total, warps[w].n, warps[w].mean, warps[w].m2);
    }
    const double var = total.n > 0. ? total.m2 / total.n : 0.;
    stats[2 * g] = (float)total.mean;
    stats[2 * g + 1] = (float)(1.0 / sqrt(var + (double)eps));
  }
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
  const float beta = to_f32(bias[c]);
  const T* xp = x + plane * hw;
  T* yp = y + plane * hw;
  const int64_t start = (int64_t)blockIdx.y * chunk_len;
  const int64_t end = min(start + chunk_len, hw);
  for (int64_t i = start + threadIdx.x; i < end; i += GN_THREADS) {
    float v = (to_f32(xp[i]) - mean) * scale + beta;
    if (silu) v = v / (1.f + __expf(-v));
    yp[i] = from_f32<T>(v);
  }
}


// ---- Channels last ----
//
// A block covers `rows` consecutive positions of one sample and every channel. Each thread moves
// V consecutive channels of a position at a time: V = 1 (the scalar kernels gn_cl_*_T) or
// V = 16 / sizeof(T), one 16-byte load or store (gn_cl_*_vec_T). Lane l of a strip of `width` =
// min(C / V, GN_THREADS) lanes owns channels [l*V, l*V + V) and every `phases`-th position
// (phases = GN_THREADS / width; threads t >= phases*width idle), so a warp touches 32*V
// consecutive channels of one position. The vector form keeps several times the bytes in flight
// per SM that HBM needs to stream (the scalar one about half, with nvcc's 4-way unroll) and
// spends fewer instructions per element: the VAE decoder's norms (channels-last, 128-512
// channels, groups of 4-16 channels) take it.
//
// src/ops launches the vector form when C % V == 0 and the pointers are 16-byte aligned; the
// statistics also need every vector inside one group or over at most GN_VEC_SLOTS whole groups
// (cpg % V == 0, or V % cpg == 0 with V / cpg <= GN_VEC_SLOTS). V = 1 always qualifies.

#define GN_VEC_SLOTS 2

template <typename T, int VEC>
__device__ void gn_cl_stats(const T* __restrict__ x, float* __restrict__ partial, int64_t hw,
                            int channels, int channels_per_group, int rows, int splits) {
  using V = Pack<T, VEC>;
  extern __shared__ Partial acc[];
  // Slot i of thread t: the i-th group its vector touches (its only one when cpg >= VEC).
  __shared__ Partial part[GN_THREADS * GN_VEC_SLOTS];
  const int cpg = channels_per_group;
  const int groups = channels / cpg;
  const int64_t n = blockIdx.y;
  const int split = blockIdx.x;
  const int64_t p0 = (int64_t)split * rows;
  const int64_t p1 = min(p0 + (int64_t)rows, hw);
  const int lanes = channels / VEC;
  const int width = min(lanes, GN_THREADS);
  const int phases = GN_THREADS / width;
  const int phase = threadIdx.x / width, lane = threadIdx.x % width;
  const T* xs = x + n * hw * channels;
  for (int g = threadIdx.x; g < groups; g += GN_THREADS) acc[g] = Partial{0.f, 0.f, 0.f};
  __syncthreads();
  for (int v0 = 0; v0 < lanes; v0 += width) {
    const int v = v0 + lane;
    Partial slot[GN_VEC_SLOTS];
#pragma unroll
    for (int i = 0; i < GN_VEC_SLOTS; ++i) slot[i] = Partial{0.f, 0.f, 0.f};
    if (phase < phases && v < lanes) {
      const int c = v * VEC;
      // Shifted sums per channel, as in gn_stats: the shift is the channel's value at the
      // chunk's first position.
      const V first = load_pack<T, VEC>(xs + p0 * channels + c);
      float shift[VEC], s[VEC], q[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        shift[k] = to_f32(first.v[k]);
        s[k] = 0.f;
        q[k] = 0.f;
      }
      int count = 0;
      for (int64_t r = p0 + phase; r < p1; r += phases) {
        const V in = load_pack<T, VEC>(xs + r * channels + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_f32(in.v[k]) - shift[k];
          s[k] += d;
          q[k] += d * d;
        }
        ++count;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        Partial p;
        p.n = (float)count;
        p.mean = count ? shift[k] + s[k] / count : 0.f;
        p.m2 = count ? fmaxf(q[k] - s[k] * s[k] / count, 0.f) : 0.f;
        // k / cpg: 0 when the vector is inside one group, else which of its groups.
        const int i = k / cpg;
#pragma unroll
        for (int j = 0; j < GN_VEC_SLOTS; ++j) {
          if (j == i) merge(slot[j], p);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < GN_VEC_SLOTS; ++i) part[threadIdx.x * GN_VEC_SLOTS + i] = slot[i];
    __syncthreads();
    // Group g overlapping the strip folds, over every phase, the slot of each lane holding some
    // of its channels: lanes [g*cpg / VEC, ceil((g+1)*cpg / VEC)) within the strip.
    const int c_end = min(v0 + width, lanes) * VEC;
    for (int g = v0 * VEC / cpg + threadIdx.x; g * cpg < c_end; g += GN_THREADS) {
      const int l_lo = max(v0, g * cpg / VEC);
      const int l_hi = min(v0 + width, ((g + 1) * cpg + VEC - 1) / VEC);
      Partial total = acc[g];
      for (int ph = 0; ph < phases; ++ph) {
        for (int l = l_lo; l < l_hi; ++l) {
          merge(total, part[(ph * width + (l - v0)) * GN_VEC_SLOTS + (g - l * VEC / cpg)]);
        }
      }
      acc[g] = total;
    }
    __syncthreads();
  }
  for (int g = threadIdx.x; g < groups; g += GN_THREADS) {
    float* out = partial + ((n * groups + g) * splits + split) * 3;
    out[0] = acc[g].n;
    out[1] = acc[g].mean;
    out[2] = acc[g].m2;
  }
}

template <typename T, int VEC>
__device__ void gn_cl_apply(const T* __restrict__ x, const float* __restrict__ stats,
                            const T* __restrict__ weight, const T* __restrict__ bias,
                            T* __restrict__ y, int64_t hw, int channels, int channels_per_group,
                            int rows, int silu) {
  using V = Pack<T, VEC>;
  const int lanes = channels / VEC;
  const int width = min(lanes, GN_THREADS);
  const int phases = GN_THREADS / width;
  const int phase = threadIdx.x / width, lane = threadIdx.x % width;
  if (phase >= phases) return;
  const int groups = channels / channels_per_group;
  const int64_t n = blockIdx.y;
  const int64_t p0 = (int64_t)blockIdx.x * rows;
  const int64_t p1 = min(p0 + (int64_t)rows, hw);
  const int64_t base = n * hw * channels;
  for (int v = lane; v < lanes; v += width) {
    const int c = v * VEC;
    float mean[VEC], scale[VEC], beta[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t group = n * groups + (c + k) / channels_per_group;
      mean[k] = stats[2 * group];
      scale[k] = stats[2 * group + 1] * to_f32(weight[c + k]);
      beta[k] = to_f32(bias[c + k]);
    }
    for (int64_t r = p0 + phase; r < p1; r += phases) {
      const int64_t i = base + r * channels + c;
      const V in = load_pack<T, VEC>(x + i);
      V out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v = (to_f32(in.v[k]) - mean[k]) * scale[k] + beta[k];
        if (silu) v = v / (1.f + __expf(-v));
        out.v[k] = from_f32<T>(v);
      }
      store_pack<T, VEC>(y + i, out);
    }
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

#define GN_CL_ENTRY(NAME, T)                                                                     \
  extern "C" __global__ void gn_cl_stats_##NAME(const T* x, float* partial, int64_t hw,         \
                                                int channels, int channels_per_group, int rows, \
                                                int splits) {                                   \
    gn_cl_stats<T, 1>(x, partial, hw, channels, channels_per_group, rows, splits);              \
  }                                                                                              \
  extern "C" __global__ void gn_cl_apply_##NAME(const T* x, const float* stats, const T* weight,\
                                                const T* bias, T* y, int64_t hw, int channels,  \
                                                int channels_per_group, int rows, int silu) {   \
    gn_cl_apply<T, 1>(x, stats, weight, bias, y, hw, channels, channels_per_group, rows, silu); \
  }                                                                                              \
  extern "C" __global__ void gn_cl_stats_vec_##NAME(const T* x, float* partial, int64_t hw,     \
                                                    int channels, int channels_per_group,       \
                                                    int rows, int splits) {                     \
    gn_cl_stats<T, Vec16<T>::N>(x, partial, hw, channels, channels_per_group, rows, splits);    \
  }                                                                                              \
  extern "C" __global__ void gn_cl_apply_vec_##NAME(const T* x, const float* stats,             \
                                                    const T* weight, const T* bias, T* y,       \
                                                    int64_t hw, int channels,                   \
                                                    int channels_per_group, int rows,           \
                                                    int silu) {                                 \
    gn_cl_apply<T, Vec16<T>::N>(x, stats, weight, bias, y, hw, channels, channels_per_group,   \
                                rows, silu);                                                     \
  }
TURBINE_FOR_EACH_DTYPE(GN_CL_ENTRY)
