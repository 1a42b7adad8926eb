// Runs the source of kernels/flash_attn.cu on the host (see cuda_mock.h and mma.h) and compares
// it with softmax attention in double precision. flash_attn_check.sh builds and runs it.
//
// Every block of the grid runs as 128 threads (host_runtime.h) over shared memory filled with
// 0xff bytes (NaN in f16, bf16 and f32), and the output starts as NaN: an unwritten output
// element or a read of shared memory the kernel never wrote shows up as a non-finite result.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include FLASH_ATTN_SOURCE
#include "host_runtime.h"

template <class T>
T from_float(float f);
template <>
__half from_float<__half>(float f) { return __float2half_rn(f); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }

struct Case {
  int batch, heads, lq, lk;
  float gain;  // on q: 10 gives logits of +-40, a dominant key per row
};

template <class T, class Kernel>
bool check(Kernel kernel, const char* name, Case c, double bound, std::mt19937& rng) {
  const int64_t ld = (int64_t)c.heads * 64;
  std::uniform_real_distribution<float> magnitude(0.05f, 2.f);
  auto random = [&](int64_t rows, float gain) {
    std::vector<T> v(rows * ld);
    for (auto& x : v) x = from_float<T>((rng() & 1 ? 1.f : -1.f) * magnitude(rng) * gain);
    return v;
  };
  const std::vector<T> q = random((int64_t)c.batch * c.lq, c.gain);
  const std::vector<T> k = random((int64_t)c.batch * c.lk, 1.f);
  const std::vector<T> v = random((int64_t)c.batch * c.lk, 1.f);
  std::vector<T> o((int64_t)c.batch * c.lq * ld, from_float<T>(NAN));
  const double scale = 0.125;
  const float scale_log2 = (float)(scale * 1.4426950408889634);

  // Grid (ceil(Lq / 64), H, B) of FA_THREADS, as src/ops/flash.rs launches it.
  cuda_host::launch({(unsigned)(c.lq + 63) / 64, (unsigned)c.heads, (unsigned)c.batch},
                    {FA_THREADS, 1, 1}, 0, [&] {
                      kernel(q.data(), k.data(), v.data(), o.data(), c.heads, c.lq, c.lk,
                             scale_log2);
                    });

  auto at = [&](const std::vector<T>& x, int b, int len, int i, int h, int col) {
    return (double)nvcuda::wmma::elem(x[((int64_t)b * len + i) * ld + h * 64 + col]);
  };
  double worst = 0, largest = 0;
  std::vector<double> p(c.lk);
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < c.lq; ++i) {
        double m = -INFINITY, l = 0;
        for (int j = 0; j < c.lk; ++j) {
          double s = 0;
          for (int x = 0; x < 64; ++x) s += at(q, b, c.lq, i, h, x) * at(k, b, c.lk, j, h, x);
          p[j] = s * scale;
          m = fmax(m, p[j]);
        }
        for (int j = 0; j < c.lk; ++j) l += (p[j] = exp(p[j] - m));
        for (int x = 0; x < 64; ++x) {
          double want = 0;
          for (int j = 0; j < c.lk; ++j) want += p[j] * at(v, b, c.lk, j, h, x);
          want /= l;
          const double got = at(o, b, c.lq, i, h, x);
          if (!std::isfinite(got)) {
            printf("%s: b=%d h=%d row %d col %d is %f (not written?)\n", name, b, h, i, x, got);
            return false;
          }
          worst = fmax(worst, fabs(got - want));
          largest = fmax(largest, fabs(want));
        }
      }
  const double rel = worst / largest;
  printf("%s B=%d H=%d lq=%d lk=%d gain=%g: rel err %.2e (bound %.0e)\n", name, c.batch,
         c.heads, c.lq, c.lk, c.gain, rel, bound);
  return rel <= bound;
}

int main(int argc, char** argv) {
  const std::vector<Case> all = {
      {1, 1, 1, 1, 1},       // one query, one key
      {3, 5, 15, 77, 1},     // cross-attention, Lq below one wmma tile
      {1, 3, 100, 100, 1},   // multiples of neither 64 nor 16
      {1, 1, 256, 256, 10},  // whole tiles, dominant keys
      {2, 1, 77, 1030, 10},  // 17 key tiles, the last of 6 keys
      {1, 2, 130, 15, 1},    // 3 query tiles, the last of 2 rows
      {2, 3, 64, 128, 1},    // exact tiles
  };
  // ThreadSanitizer is ~20x slower: two cases that still cross tile edges.
  const std::vector<Case> small = {{1, 1, 1, 1, 1}, {1, 2, 70, 77, 10}};
  const bool quick = argc > 1 && std::string(argv[1]) == "--small";
  std::mt19937 rng(1);
  bool ok = true;
  for (const Case& c : quick ? small : all) {
    ok &= check<__nv_bfloat16>(flash_attn_bf16, "bf16", c, 1e-2, rng);
    ok &= check<__half>(flash_attn_f16, "f16", c, 2e-3, rng);
  }
  puts(ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
