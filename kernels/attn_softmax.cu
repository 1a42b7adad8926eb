// Row softmax of attention scores: p = softmax(scale * s [+ causal mask]) over the last dim.
// Scores come in as f32 (cuBLAS writes Q.K^T with f32 output, so the logits are never rounded to
// bf16, as in flash attention); probabilities go out in the storage dtype for the P.V GEMM.
//
// One warp per row, 4 rows per block: rows are short (77 for cross-attention, up to 4096 for
// self-attention at 1024x1024), there are many of them (batch * heads * queries), and a warp needs
// no __syncthreads. Pass 1 is an online max/sum (one exp per element); pass 2 re-reads the row,
// which is still in L1/L2 (a 4096-long f32 row is 16 KiB), and writes it.
// Causal masking is top-left aligned (key j is visible to query i iff j <= i), as torch's
// scaled_dot_product_attention(is_causal=True); CLIP's text encoders use it. The scores may be a
// chunk of query rows: `lq` rows of each slice starting at query `row_offset`.
#include <math_constants.h>

#include "common.cuh"

#define SM_WARPS 4

template <typename T>
__device__ void attn_softmax(const float* __restrict__ s, T* __restrict__ p, int64_t rows, int lq,
                             int lk, float scale, int causal, int row_offset) {
  const int64_t row = (int64_t)blockIdx.x * SM_WARPS + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float* sr = s + row * lk;
  T* pr = p + row * lk;
  const int visible = causal ? min(lk, (int)(row % lq) + row_offset + 1) : lk;
  // Work in base 2: exp(x) = exp2(x * log2(e)), folded into the scale.
  const float k = scale * 1.4426950408889634f;
  float m = -CUDART_INF_F, l = 0.f;
  for (int j = lane; j < visible; j += 32) {
    const float v = sr[j] * k;
    if (v > m) {
      l = l * exp2f(m - v) + 1.f;
      m = v;
    } else {
      l += exp2f(v - m);
    }
  }
  const float row_max = warp_max(m);
  // Lanes that saw no element keep m = -inf and l = 0: they add nothing.
  l = (m == -CUDART_INF_F) ? 0.f : l * exp2f(m - row_max);
  const float inv = 1.f / warp_sum(l);
  for (int j = lane; j < lk; j += 32) {
    const float e = j < visible ? exp2f(sr[j] * k - row_max) * inv : 0.f;
    pr[j] = from_f32<T>(e);
  }
}

#define SM_ENTRY(NAME, T)                                                                      \
  extern "C" __global__ void attn_softmax_##NAME(const float* s, T* p, int64_t rows, int lq, \
                                                 int lk, float scale, int causal,             \
                                                 int row_offset) {                            \
    attn_softmax<T>(s, p, rows, lq, lk, scale, causal, row_offset);                           \
  }
TURBINE_FOR_EACH_DTYPE(SM_ENTRY)
