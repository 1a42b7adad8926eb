// Flash-attention forward for the UNet's attention: O = softmax(scale * Q.K^T) . V with head dim
// 64, never writing the scores to global memory. The cuBLAS path (attention.rs) writes Q.K^T in
// f32 and the probabilities in 16 bits and reads both back: ~12 bytes per score, ~2.6 GB per
// 512x512 image in SDXL's UNet. Here a block keeps its scores in shared memory.
//
// Layout: q [B, Lq, H*64], k and v [B, Lk, H*64], o [B, Lq, H*64], head h in columns
// h*64..h*64+63 of every row (what to_q/to_k/to_v write and to_out reads), rows H*64 apart.
//
// Grid (ceil(Lq / 64), H, B), 128 threads = 4 warps; warp w owns query rows q0+16w..q0+16w+15.
// Per key tile of 64:
//   1. the block copies K and V rows k0..k0+63 to shared memory, zero past Lk;
//   2. each warp computes its S = Q_w . K_tile^T (16x64, f32) with wmma into its f32 scratch;
//   3. the warp walks its 16 rows (all 32 lanes on one row, lane j owning keys j and j+32): keys
//      >= Lk are -inf, running max m and sum l updated online, P = exp2(x - m) rounded to the
//      storage dtype into shared memory, alpha = exp2(m_old - m_new);
//   4. O (16x64 f32, kept in wmma accumulators) is staged through the scratch to be scaled
//      row-wise by alpha (the accumulator's element-to-row mapping is unspecified, so the
//      scaling goes through memory), reloaded, and O += P . V_tile with wmma.
// At the end O / l is rounded once to the storage dtype; rows >= Lq (zero-filled Q) are computed
// and never written.
//
// Softmax in base 2 with scale*log2(e) folded into one factor (the caller passes it). l sums the
// probabilities after their rounding, so the output is an exact convex combination of V's rows
// with the weights the P.V product actually used. Every tile holds at least one key < Lk (tiles
// start below Lk), so each row's running max is finite after the first tile and no -inf - -inf
// (NaN) can arise; masked keys give exp2(-inf) = 0 against zero-filled V rows.
//
// Shared memory (static, 45 KiB, below the 48 KiB static limit): 16-bit tiles with a leading
// dimension of 72 (64 + 8: rows 144 bytes apart spread ldmatrix accesses over the banks), f32
// scratch with 72 too (64 + 8: sm_90 stores and loads the accumulators as 64-bit pairs, lane
// (g, t) = (lane / 4, lane % 4) at words g*ldf + 2t and 2t + 1, which a row stride of 72 words
// spreads over all 32 banks per half-warp; 68 left 2-way conflicts, 64 4-way). wmma needs
// 256-bit-aligned fragment pointers and ldm a multiple of 8 (16-bit) or 4 (f32): every fragment
// starts at a multiple of 16 rows and 16 columns, i.e. at 16*144 = 2304 or 16*288 = 4608 bytes
// (multiples of 32) plus 32 or 64 bytes per 16 columns.
//
// Checked without a GPU: scripts/cuda_host/flash_attn_check.sh runs this source on the host
// (CUDA emulated, wmma alignment asserted, under AddressSanitizer and ThreadSanitizer too) and
// scripts/flash_attn_emulate.py re-derives the same steps in numpy, both against plain softmax
// attention. tests/ops.rs checks the compiled kernel on a GPU.
#include <math_constants.h>
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

#define FA_D 64
#define FA_BQ 64
#define FA_BK 64
#define FA_WARPS 4
#define FA_THREADS (32 * FA_WARPS)
#define FA_LDH 72
#define FA_LDF 72

#define FA_TILE_BYTES (FA_BQ * FA_LDH * 2)
#define FA_SCRATCH_BYTES (FA_WARPS * 16 * FA_LDF * 4)
#define FA_SMEM_BYTES (3 * FA_TILE_BYTES + FA_SCRATCH_BYTES)

static_assert(FA_BQ == 16 * FA_WARPS, "one warp per 16 query rows");
static_assert(FA_BQ == FA_BK, "Q and P share one tile buffer shape with K and V");
static_assert(FA_TILE_BYTES % 32 == 0 && (16 * FA_LDH * 2) % 32 == 0, "16-bit tile alignment");
static_assert((16 * FA_LDF * 4) % 32 == 0, "f32 scratch alignment");
static_assert(FA_LDH % 8 == 0 && FA_LDF % 4 == 0, "wmma ldm");
static_assert(FA_SMEM_BYTES <= 48 * 1024, "static shared memory limit");

// Copies rows 0..63 (columns 0..63) of `src`, rows `ld` elements apart, into `dst` (rows FA_LDH
// apart), zero for rows >= `valid`. 16-byte chunks: 8 per row, 512 per tile, 4 per thread of the
// FA_THREADS the launch must use. The caller guarantees 16-byte-aligned `src` and `ld` a
// multiple of 8 (ld = H*64).
template <typename T>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src,
                                          int64_t ld, int valid) {
#pragma unroll
  for (int i = 0; i < FA_BQ * (FA_D / 8) / FA_THREADS; ++i) {
    const int c = threadIdx.x + i * FA_THREADS;
    const int r = c / (FA_D / 8);
    const int col = (c % (FA_D / 8)) * 8;
    uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) chunk = *reinterpret_cast<const uint4*>(src + r * ld + col);
    *reinterpret_cast<uint4*>(dst + r * FA_LDH + col) = chunk;
  }
}

template <typename T>
__device__ void flash_attn(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, T* __restrict__ o, int heads, int lq, int lk,
                           float scale_log2) {
  __shared__ __align__(128) unsigned char smem[FA_SMEM_BYTES];
  // Q tile, then each warp's P in its own 16 rows (a warp only ever reads its own Q rows).
  T* qp_s = reinterpret_cast<T*>(smem);
  T* k_s = reinterpret_cast<T*>(smem + FA_TILE_BYTES);
  T* v_s = reinterpret_cast<T*>(smem + 2 * FA_TILE_BYTES);
  float* f_s = reinterpret_cast<float*>(smem + 3 * FA_TILE_BYTES);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * FA_BQ;
  const int64_t ld = (int64_t)heads * FA_D;
  const int64_t b = blockIdx.z;
  const int64_t col0 = (int64_t)blockIdx.y * FA_D;
  const T* qb = q + (b * lq + q0) * ld + col0;
  const T* kb = k + b * lk * ld + col0;
  const T* vb = v + b * lk * ld + col0;
  T* ob = o + (b * lq + q0) * ld + col0;

  T* p_w = qp_s + warp * 16 * FA_LDH;
  float* f_w = f_s + warp * 16 * FA_LDF;
  // Row r's running max, running sum and this tile's rescale factor live in lane r (r < 16) and
  // are broadcast with __shfl_sync when needed: 3 registers per lane instead of 48 copies of the
  // same values (168-184 -> 128 registers: 4 blocks per SM instead of 2-3), and no shared-memory
  // read-modify-write to order between lanes.
  float m_lane = -CUDART_INF_F, l_lane = 0.f, alpha_lane = 1.f;

  load_tile(qp_s, qb, ld, min(FA_BQ, lq - q0));
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[FA_D / 16];
#pragma unroll
  for (int kk = 0; kk < FA_D / 16; ++kk) wmma::load_matrix_sync(qf[kk], p_w + kk * 16, FA_LDH);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[FA_D / 16];
#pragma unroll
  for (int n = 0; n < FA_D / 16; ++n) wmma::fill_fragment(of[n], 0.f);

  for (int k0 = 0; k0 < lk; k0 += FA_BK) {
    // Every warp is done with the previous K/V tile (and, on the first pass, its Q fragments)
    // before they are overwritten.
    __syncthreads();
    const int valid = min(FA_BK, lk - k0);
    load_tile(k_s, kb + k0 * ld, ld, valid);
    load_tile(v_s, vb + k0 * ld, ld, valid);
    __syncthreads();

    // S = Q_w . K^T: B(d, j) = K[j][d] is K's tile read column-major.
#pragma unroll
    for (int n = 0; n < FA_BK / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.f);
#pragma unroll
      for (int kk = 0; kk < FA_D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, k_s + n * 16 * FA_LDH + kk * 16, FA_LDH);
        wmma::mma_sync(sf, qf[kk], kf, sf);
      }
      wmma::store_matrix_sync(f_w + n * 16, sf, FA_LDF, wmma::mem_row_major);
    }
    __syncwarp();

    const bool valid0 = lane < valid;
    const bool valid1 = lane + 32 < valid;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const float x0 = valid0 ? f_w[r * FA_LDF + lane] * scale_log2 : -CUDART_INF_F;
      const float x1 = valid1 ? f_w[r * FA_LDF + lane + 32] * scale_log2 : -CUDART_INF_F;
      const float m_old = __shfl_sync(0xffffffffu, m_lane, r);
      const float m_new = fmaxf(m_old, warp_max(fmaxf(x0, x1)));
      const float alpha = exp2f(m_old - m_new);
      const T p0 = from_f32<T>(exp2f(x0 - m_new));
      const T p1 = from_f32<T>(exp2f(x1 - m_new));
      p_w[r * FA_LDH + lane] = p0;
      p_w[r * FA_LDH + lane + 32] = p1;
      const float sum = warp_sum(to_f32(p0) + to_f32(p1));
      const float l_old = __shfl_sync(0xffffffffu, l_lane, r);
      if (lane == r) {
        m_lane = m_new;
        l_lane = l_old * alpha + sum;
        alpha_lane = alpha;
      }
    }
    // All lanes have read S before O overwrites the scratch.
    __syncwarp();
#pragma unroll
    for (int n = 0; n < FA_D / 16; ++n)
      wmma::store_matrix_sync(f_w + n * 16, of[n], FA_LDF, wmma::mem_row_major);
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const float alpha = __shfl_sync(0xffffffffu, alpha_lane, r);
      f_w[r * FA_LDF + lane] *= alpha;
      f_w[r * FA_LDF + lane + 32] *= alpha;
    }
    __syncwarp();

    // O += P . V: B(j, c) = V[j][c] is V's tile read row-major.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf[FA_BK / 16];
#pragma unroll
    for (int kk = 0; kk < FA_BK / 16; ++kk) wmma::load_matrix_sync(pf[kk], p_w + kk * 16, FA_LDH);
#pragma unroll
    for (int n = 0; n < FA_D / 16; ++n) {
      wmma::load_matrix_sync(of[n], f_w + n * 16, FA_LDF, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < FA_BK / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, v_s + kk * 16 * FA_LDH + n * 16, FA_LDH);
        wmma::mma_sync(of[n], pf[kk], vf, of[n]);
      }
    }
  }

  // The last tile's fragment loads from the scratch are done before it is overwritten.
  __syncwarp();
#pragma unroll
  for (int n = 0; n < FA_D / 16; ++n)
    wmma::store_matrix_sync(f_w + n * 16, of[n], FA_LDF, wmma::mem_row_major);
  __syncwarp();
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int row = warp * 16 + r;
    // l >= 1: the key holding the running max contributes exp2(0) = 1, exact in any dtype.
    const float inv = 1.f / __shfl_sync(0xffffffffu, l_lane, r);
    if (q0 + row < lq) {
      ob[row * ld + lane] = from_f32<T>(f_w[r * FA_LDF + lane] * inv);
      ob[row * ld + lane + 32] = from_f32<T>(f_w[r * FA_LDF + lane + 32] * inv);
    }
  }
}

// PTX has no templates: one symbol per dtype. 16-bit types only (wmma has no f32 inputs).
#define FA_ENTRY(NAME, T)                                                                    \
  extern "C" __global__ void __launch_bounds__(FA_THREADS)                                   \
      flash_attn_##NAME(const T* q, const T* k, const T* v, T* o, int heads, int lq, int lk, \
                        float scale_log2) {                                                  \
    flash_attn<T>(q, k, v, o, heads, lq, lk, scale_log2);                                    \
  }
// wmma on bf16 needs sm_80 (f16 sm_70): a build for an older GPU gets no flash kernel, and
// src/ops/flash.rs `supports` keeps the lever off there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
FA_ENTRY(f16, __half)
FA_ENTRY(bf16, __nv_bfloat16)
#endif
