// Host stand-in for nvcuda::wmma at 16x16x16: every lane holds the whole tile (the kernel never
// touches fragment elements, so the hardware's distribution over lanes is invisible to it).
// Loads and stores check the documented requirements: a 256-bit-aligned pointer, ldm a multiple
// of 8 (16-bit elements) or 4 (f32). Stores are done by lane 0 alone and nothing here
// synchronises, so a missing __syncwarp before other lanes read a result is a data race that
// ThreadSanitizer reports (and stale data that the comparison catches).
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  float x[16][16];
};

inline float elem(float v) { return v; }
inline float elem(__half v) { return __half2float(v); }
inline float elem(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check(const void* p, unsigned ldm, size_t elem_bytes) {
  if ((uintptr_t)p % 32 != 0 || ldm % (elem_bytes == 2 ? 8 : 4) != 0) {
    fprintf(stderr, "wmma: pointer %p with ldm %u breaks the alignment rules\n", p, ldm);
    abort();
  }
}

template <class F>
void fill_fragment(F& f, float v) {
  for (auto& row : f.x)
    for (auto& e : row) e = v;
}

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T));
  constexpr bool row = __is_same(L, row_major);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = elem(row ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  check(p, ldm, 4);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check(p, ldm, 4);
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float t[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      t[i][j] = s;
    }
  memcpy(d.x, t, sizeof t);
}
}  // namespace wmma
}  // namespace nvcuda
