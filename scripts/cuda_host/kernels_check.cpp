// Runs the sources of turbine's kernels other than flash attention (kernels/group_norm.cu,
// attn_softmax.cu, bias_residual.cu, conv_prefill.cu, geglu.cu, postprocess.cu, upsample.cu) on
// the host (cuda_mock.h, host_runtime.h) and compares every f32, f16 and bf16 entry point with a
// double-precision reference of its op. kernels_check.sh builds and runs it.
//
// Each op is launched as its Rust side launches it: the functions named launch_* below repeat
// the grid, block, shared-memory and argument computation of the function their comment names,
// constant for constant, so a wrong launch shows up here as a wrong or unwritten result, an
// out-of-bounds access (ASan) or an invalid launch. Buffers the Rust side allocates without
// initialising (outputs, partials, statistics) start as NaN (0xAB bytes for u8), and every
// buffer has exactly the size the Rust side gives it, so ASan catches any access past it.
//
// Errors are measured as tests/ops.rs does: max|got - want| / max|want| over the output, with
// its bounds (f32 1e-5, f16 2e-3, bf16 1e-2); the references take the already rounded inputs.
//
//   kernels_check [--small]   (--small: the cases marked for the ThreadSanitizer build)
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "host_runtime.h"
// The host copies kernels_check.sh makes, __shared__ declarations rewritten.
#include "attn_softmax.cu"
#include "bias_residual.cu"
#include "conv_prefill.cu"
#include "geglu.cu"
#include "group_norm.cu"
#include "postprocess.cu"
#include "upsample.cu"

namespace {

// ---- Dtypes and entry points ----

// The `extern "C"` symbols of one dtype, as src/ops/cuda.rs's `func` names them
// ("{base}_{f32|f16|bf16}").
template <class T>
struct Entry;
#define ENTRY(NAME, T)                                         \
  template <>                                                  \
  struct Entry<T> {                                            \
    static constexpr const char* dtype = #NAME;                \
    static constexpr auto gn_stats = gn_stats_##NAME;          \
    static constexpr auto gn_apply = gn_apply_##NAME;          \
    static constexpr auto gn_cl_stats = gn_cl_stats_##NAME;    \
    static constexpr auto gn_cl_apply = gn_cl_apply_##NAME;    \
    static constexpr auto gn_cl_stats_vec = gn_cl_stats_vec_##NAME; \
    static constexpr auto gn_cl_apply_vec = gn_cl_apply_vec_##NAME; \
    static constexpr auto attn_softmax = attn_softmax_##NAME;  \
    static constexpr auto bias_residual = bias_residual_##NAME; \
    static constexpr auto conv_prefill_rows = conv_prefill_rows_##NAME; \
    static constexpr auto conv_prefill_rows_vec = conv_prefill_rows_vec_##NAME; \
    static constexpr auto conv_prefill_planes = conv_prefill_planes_##NAME; \
    static constexpr auto conv_prefill_planes_vec = conv_prefill_planes_vec_##NAME; \
    static constexpr auto geglu = geglu_##NAME;                \
    static constexpr auto geglu_bias = geglu_bias_##NAME;      \
    static constexpr auto to_rgb8 = to_rgb8_##NAME;            \
  };
TURBINE_FOR_EACH_DTYPE(ENTRY)
#undef ENTRY

// tests/ops.rs's `tolerance`.
template <class T>
double tolerance() {
  if constexpr (sizeof(T) == 4) return 1e-5;
  else if constexpr (std::is_same_v<T, __half>) return 2e-3;
  else return 1e-2;
}

template <class F>
void for_each_dtype(F&& f) {
  f.template operator()<float>();
  f.template operator()<__half>();
  f.template operator()<__nv_bfloat16>();
}

template <class T>
double value(T x) {
  return to_f32(x);
}

// ---- Device memory ----

// One device allocation: exactly `n` elements (AddressSanitizer bounds every access by them),
// 256-byte aligned as cudaMalloc's are.
template <class T>
class Buffer {
 public:
  Buffer(size_t n, T fill)
      : n_(n), p_(static_cast<T*>(::operator new(n ? n * sizeof(T) : 1, std::align_val_t(256)))) {
    std::fill(p_.get(), p_.get() + n, fill);
  }
  T* data() const { return p_.get(); }
  size_t size() const { return n_; }
  T& operator[](size_t i) const { return p_.get()[i]; }
  // What the Rust side gets from an unsafe `dev.alloc`: here, NaN in every float dtype.
  static Buffer uninit(size_t n) { return Buffer(n, from_f32<T>(NAN)); }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t(256)); }
  };
  size_t n_;
  std::unique_ptr<T, Free> p_;
};

std::mt19937 rng(20240611);

// tests/ops.rs's `random`: magnitude in [0.05, 2), random sign, plus `offset`; never zero.
template <class T>
Buffer<T> random_buffer(size_t n, float offset = 0.f, float gain = 1.f) {
  std::uniform_real_distribution<float> magnitude(0.05f, 2.f);
  Buffer<T> b(n, T{});
  for (size_t i = 0; i < n; ++i)
    b[i] = from_f32<T>((rng() & 1 ? 1.f : -1.f) * magnitude(rng) * gain + offset);
  return b;
}

// The Rust side's to_i32 / to_u32: an argument out of range is an error there, so a case that
// produced one is a broken case here.
int to_i32(size_t v, const char* what) {
  if (v > 0x7fffffffu) cuda_host::fail("%s = %zu exceeds i32", what, v);
  return (int)v;
}
unsigned to_u32(size_t v, const char* what) {
  if (v > 0xffffffffu) cuda_host::fail("%s = %zu exceeds u32", what, v);
  return (unsigned)v;
}
size_t div_ceil(size_t a, size_t b) { return (a + b - 1) / b; }

// ---- Comparison ----

// max|got - want| / max|want| (tests/ops.rs's measure), fed one element at a time; a non-finite
// `got` is an element the kernel did not write.
struct Error {
  double worst = 0, scale = 0, worst_got = 0, worst_want = 0;
  size_t at = 0, unwritten = 0, first_unwritten = 0, stray = 0;
  void add(size_t i, double got, double want) {
    if (!std::isfinite(got)) {
      if (unwritten++ == 0) first_unwritten = i;
      return;
    }
    scale = std::max(scale, fabs(want));
    const double e = fabs(got - want);
    if (e > worst) worst = e, at = i, worst_got = got, worst_want = want;
  }
  // An element outside the launch's output that must keep its poison.
  void outside(bool kept) { stray += !kept; }
  double rel() const { return worst / std::max(scale, 1e-30); }
};

int failures = 0;

// One output line per case; counts the failures.
void report(const std::string& what, const Error& e, double bound) {
  const char* w = what.c_str();
  if (e.unwritten)
    printf("%-76s FAILED: %zu elements not finite, the first at %zu (not written?)\n", w,
           e.unwritten, e.first_unwritten);
  else if (e.stray)
    printf("%-76s FAILED: changed %zu elements outside its output\n", w, e.stray);
  else if (e.rel() <= bound)
    printf("%-76s rel err %.2e (bound %.0e)\n", w, e.rel(), bound);
  else
    printf("%-76s rel err %.2e (bound %.0e) FAILED: element %zu is %.9g, want %.9g\n", w,
           e.rel(), bound, e.at, e.worst_got, e.worst_want);
  failures += e.unwritten || e.stray || !(e.rel() <= bound);
}

// Exact comparisons (copies, bytes): the number of differing elements and the first.
void report_exact(const std::string& what, size_t n, const std::function<bool(size_t)>& equal) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i)
    if (!equal(i) && bad++ == 0) first = i;
  if (bad)
    printf("%-76s FAILED: %zu of %zu differ, the first at %zu\n", what.c_str(), bad, n, first);
  else
    printf("%-76s exact (%zu elements)\n", what.c_str(), n);
  failures += bad != 0;
}

std::string dims(std::initializer_list<size_t> d) {
  std::string s = "[";
  for (size_t v : d) s += (s.size() > 1 ? "," : "") + std::to_string(v);
  return s + "]";
}

// ---- GroupNorm ----

struct GroupNormCase {
  const char* label;
  bool channels_last;
  size_t n, c, hw, groups;
  double eps;
  bool silu;
  float offset;  // on x: mean >> std exercises the kernels' shifted sums
  bool small;    // in the ThreadSanitizer set
  // x one element into its buffer (a view at an offset): not 16-byte aligned, so the
  // channels-last launch takes the scalar kernels.
  bool misaligned = false;
};

// Mirrors src/ops/group_norm.rs vector_layout: which 16-byte-vector kernels a channels-last
// launch takes.
struct VectorLayout {
  bool stats, apply;
};
VectorLayout vector_layout(size_t elem_bytes, size_t c, size_t cpg, uintptr_t ptr_bits) {
  const size_t SLOTS = 2, vec = 16 / elem_bytes;
  const bool apply = c % vec == 0 && ptr_bits % 16 == 0;
  const bool groups_fit = cpg > 0 && (cpg % vec == 0 || (vec % cpg == 0 && vec / cpg <= SLOTS));
  return {apply && groups_fit, apply};
}

// Mirrors src/ops/group_norm.rs GroupNormOp::cuda: statistics (gn_stats / gn_cl_stats),
// gn_finalize, then gn_apply / gn_cl_apply, with that function's constants.
template <class T>
VectorLayout launch_group_norm(const GroupNormCase& s, const T* xp, const Buffer<T>& w,
                               const Buffer<T>& b, const Buffer<T>& y) {
  using E = Entry<T>;
  const size_t STATS_CHUNK = 8192, APPLY_CHUNK = 4096, CL_STATS_ELEMS = 16384,
               CL_STATS_BLOCKS = 1024, CL_APPLY_ELEMS = 8192, CL_MAX_GROUPS = 2048,
               MAX_GRID_Y = 65535;
  const unsigned THREADS = 256, FIN_THREADS = 128;
  const size_t cpg = s.c / s.groups, num_groups = s.n * s.groups;
  const int channels_arg = to_i32(s.c, "group_norm channels");
  const int cpg_arg = to_i32(cpg, "group_norm channels per group");
  const int silu_arg = s.silu;

  // Statistics blocks: positions per block (channels last) or elements per chunk (first).
  const size_t group_len = cpg * s.hw;
  const size_t cl_rows =
      std::max<size_t>(std::min(CL_STATS_ELEMS / s.c, div_ceil(s.hw, CL_STATS_BLOCKS)), 1);
  const size_t splits =
      s.channels_last ? div_ceil(s.hw, cl_rows) : div_ceil(group_len, STATS_CHUNK);
  auto partial = Buffer<float>::uninit(num_groups * splits * 3);
  const int splits_arg = to_i32(splits, "group_norm splits");
  const VectorLayout vec =
      s.channels_last
          ? vector_layout(sizeof(T), s.c, cpg, (uintptr_t)xp | (uintptr_t)y.data())
          : VectorLayout{false, false};
  if (s.channels_last) {
    if (s.groups > CL_MAX_GROUPS || s.n > MAX_GRID_Y) cuda_host::fail("group_norm: Rust bails");
    const int64_t hw_arg = (int64_t)s.hw;
    const int rows_arg = to_i32(cl_rows, "group_norm rows per block");
    cuda_host::launch({to_u32(splits, "group_norm stats blocks"),
                       to_u32(s.n, "group_norm batch"), 1},
                      {THREADS, 1, 1}, to_u32(s.groups * 12, "group_norm shared memory"), [&] {
                        (vec.stats ? E::gn_cl_stats_vec : E::gn_cl_stats)(
                            xp, partial.data(), hw_arg, channels_arg, cpg_arg, rows_arg,
                            splits_arg);
                      });
  } else {
    const size_t stats_chunk = div_ceil(group_len, splits);
    const int64_t group_len_arg = (int64_t)group_len, chunk_arg = (int64_t)stats_chunk;
    cuda_host::launch({to_u32(num_groups * splits, "group_norm stats blocks"), 1, 1},
                      {THREADS, 1, 1}, 0, [&] {
                        E::gn_stats(xp, partial.data(), group_len_arg, chunk_arg, splits_arg);
                      });
  }

  auto stats = Buffer<float>::uninit(num_groups * 2);
  {
    const int groups_arg = to_i32(num_groups, "group_norm groups");
    const float eps_arg = (float)s.eps;
    cuda_host::launch({to_u32(num_groups, "group_norm groups"), 1, 1}, {FIN_THREADS, 1, 1}, 0,
                      [&] {
                        gn_finalize(partial.data(), stats.data(), groups_arg, splits_arg,
                                    eps_arg);
                      });
  }

  if (s.channels_last) {
    const size_t rows = std::max<size_t>(CL_APPLY_ELEMS / s.c, 1);
    const int64_t hw_arg = (int64_t)s.hw;
    const int rows_arg = to_i32(rows, "group_norm rows per block");
    cuda_host::launch({to_u32(div_ceil(s.hw, rows), "group_norm apply blocks"),
                       to_u32(s.n, "group_norm batch"), 1},
                      {THREADS, 1, 1}, 0, [&] {
                        (vec.apply ? E::gn_cl_apply_vec : E::gn_cl_apply)(
                            xp, stats.data(), w.data(), b.data(), y.data(), hw_arg,
                            channels_arg, cpg_arg, rows_arg, silu_arg);
                      });
  } else {
    const size_t apply_chunk = std::max<size_t>(APPLY_CHUNK, div_ceil(s.hw, 65535));
    const int64_t hw_arg = (int64_t)s.hw, apply_chunk_arg = (int64_t)apply_chunk;
    cuda_host::launch({to_u32(s.n * s.c, "group_norm planes"),
                       to_u32(div_ceil(s.hw, apply_chunk), "group_norm chunks"), 1},
                      {THREADS, 1, 1}, 0, [&] {
                        E::gn_apply(xp, stats.data(), w.data(), b.data(), y.data(),
                                    channels_arg, cpg_arg, hw_arg, apply_chunk_arg, silu_arg);
                      });
  }
  return vec;
}

// torch's F.group_norm (biased variance, eps inside the square root, affine) then F.silu, as
// src/ops/group_norm.rs's CPU reference computes it: two-pass statistics in f64.
template <class T>
std::vector<double> group_norm_reference(const GroupNormCase& s, const Buffer<T>& x,
                                         const Buffer<T>& w, const Buffer<T>& b) {
  const size_t cpg = s.c / s.groups;
  auto index = [&](size_t n, size_t ch, size_t p) {
    return s.channels_last ? (n * s.hw + p) * s.c + ch : (n * s.c + ch) * s.hw + p;
  };
  std::vector<double> y(x.size());
  for (size_t n = 0; n < s.n; ++n)
    for (size_t g = 0; g < s.groups; ++g) {
      double sum = 0, sq = 0;
      for (size_t ch = g * cpg; ch < (g + 1) * cpg; ++ch)
        for (size_t p = 0; p < s.hw; ++p) sum += value(x[index(n, ch, p)]);
      const double len = (double)(cpg * s.hw), mean = sum / len;
      for (size_t ch = g * cpg; ch < (g + 1) * cpg; ++ch)
        for (size_t p = 0; p < s.hw; ++p) sq += pow(value(x[index(n, ch, p)]) - mean, 2);
      const double rstd = 1 / sqrt(sq / len + s.eps);
      for (size_t ch = g * cpg; ch < (g + 1) * cpg; ++ch)
        for (size_t p = 0; p < s.hw; ++p) {
          double v = (value(x[index(n, ch, p)]) - mean) * rstd * value(w[ch]) + value(b[ch]);
          if (s.silu) v /= 1 + exp(-v);
          y[index(n, ch, p)] = v;
        }
    }
  return y;
}

void check_group_norm(bool small) {
  // SDXL-Turbo at 512x512: the UNet's norms (32 groups, eps 1e-5, channels first) at its three
  // levels; the VAE decoder's (eps 1e-6) channels first and channels last at the mid-block's
  // real size and at reduced sizes for the larger levels (up to 512x512 in the model: the same
  // code paths, just more blocks). Shapes chosen for the launch arithmetic are noted.
  const GroupNormCase cases[] = {
      // 5 stats chunks of exactly 8192, apply planes of exactly one 4096 chunk.
      {"unet 320@64x64", false, 1, 320, 64 * 64, 32, 1e-5, true, 0, false},
      // Batch 2; stats chunk 6827 (20480 = 2 * 6827 + 6826).
      {"unet 640@32x32", false, 2, 640, 32 * 32, 32, 1e-5, false, 0, false},
      {"unet 1280@16x16", false, 1, 1280, 16 * 16, 32, 1e-5, true, 0, false},
      {"vae mid 512@64x64", false, 1, 512, 64 * 64, 32, 1e-6, false, 0, false},
      // 9 stats chunks of 7512 (the last 7504), apply chunks 4 * 4096 + 516. mean/std ~ 260:
      // both layouts fail f32's bound without the statistics' shifted sums (sum(x^2) -
      // sum(x)^2 / n cancels) or with the apply as x * scale + (bias - mean * scale).
      {"vae 128@130x130 mean 300", false, 1, 128, 130 * 130, 32, 1e-6, true, 300, false},
      // Groups of 105 elements: most of the 256 threads hold no element (count 0 merges).
      {"odd 12@5x7 batch 3", false, 3, 12, 5 * 7, 4, 1e-5, false, 3, true},
      // One element per group: variance 0, rstd = 1/sqrt(eps), y = bias exactly.
      {"one element per group", false, 2, 8, 1, 8, 1e-5, true, 0, true},
      // 2 stats chunks of 4356, 1 ragged apply chunk.
      {"small 32@33x33", false, 1, 32, 33 * 33, 4, 1e-5, true, 0, true},
      // Channels last. 1024 stats blocks of 4 positions, 2 channel strips of 256.
      {"vae mid 512@64x64", true, 1, 512, 64 * 64, 32, 1e-6, true, 0, false},
      // Batch 2: 820 stats blocks of 2 positions; apply blocks of 32 (1640 = 51 * 32 + 8).
      {"vae 256@41x40", true, 2, 256, 41 * 40, 32, 1e-6, false, 0, false},
      // Stats blocks of 17 positions over 2 phases of 128 channels (995, the last of 2);
      // apply blocks of 64 (16900 = 264 * 64 + 4); mean/std ~ 260.
      {"vae 128@130x130 mean 300", true, 1, 128, 130 * 130, 32, 1e-6, true, 300, false},
      // 320 channels: a strip of 256 and one of 64, and group 25 (channels 250..259) straddles
      // the strips.
      {"320@7x9 batch 2", true, 2, 320, 7 * 9, 32, 1e-5, true, 0, true},
      // 48 channels: 5 phases, threads 240..255 idle; 2 positions per stats block.
      {"48@50x30", true, 1, 48, 50 * 30, 3, 1e-5, false, 3, false},
      {"48@10x9", true, 1, 48, 10 * 9, 3, 1e-5, false, 3, true},
      // 300 stats blocks: gn_finalize's 128 threads merge 2 or 3 partials each.
      {"32@15x20", true, 1, 32, 15 * 20, 8, 1e-5, false, 0, true},
      // 16 phases of 16 channels.
      {"16@5x7 batch 3", true, 3, 16, 5 * 7, 4, 1e-5, true, 0, true},
      // CL_MAX_GROUPS: 2048 groups of one channel, 24 KiB of dynamic shared memory.
      {"2048 groups 2048@1x3", true, 1, 2048, 3, 2048, 1e-5, false, 0, false},
      // The 16-byte-vector kernels (most channels-last cases above take them: see each line's
      // "vec" tag) and the scalar ones on the same shapes through a misaligned view.
      {"vae 128@130x130 mean 300", true, 1, 128, 130 * 130, 32, 1e-6, true, 300, false, true},
      {"16@5x7 batch 3", true, 3, 16, 5 * 7, 4, 1e-5, true, 0, true, true},
      {"vae mid 512@64x64", true, 1, 512, 64 * 64, 32, 1e-6, true, 0, false, true},
      // 2304 channels in groups of 4: 2 strips of vectors (bf16: 256 + 32 lanes; f32: 256 +
      // 256 + 64), each bf16 vector over 2 groups.
      {"2304@5x3 in 576 groups", true, 2, 2304, 5 * 3, 576, 1e-5, true, 0, true},
      // Groups of 2 channels: 4 a bf16 vector, over the 2 slots (scalar stats, vector apply);
      // f32 vectors hold 2 groups each.
      {"64@9x7 in 32 groups", true, 1, 64, 9 * 7, 32, 1e-5, false, 0, true},
      // Groups of 24: 3 bf16 vectors or 6 f32 ones each; 12 channels is not a whole number of
      // bf16 vectors.
      {"96@11x13 in 4 groups", true, 2, 96, 11 * 13, 4, 1e-5, true, 0, true},
      {"12@6x6 in 3 groups", true, 1, 12, 6 * 6, 3, 1e-5, false, 0, true},
  };
  for (const auto& s : cases) {
    if (small && !s.small) continue;
    for_each_dtype([&]<class T>() {
      auto x = random_buffer<T>(s.n * s.c * s.hw, s.offset);
      auto w = random_buffer<T>(s.c);
      auto b = random_buffer<T>(s.c);
      auto y = Buffer<T>::uninit(x.size());
      // A misaligned case reads x one element into a buffer one element longer.
      Buffer<T> shifted(s.misaligned ? x.size() + 1 : 0, T{});
      if (s.misaligned) std::copy(x.data(), x.data() + x.size(), shifted.data() + 1);
      const VectorLayout vec =
          launch_group_norm(s, s.misaligned ? shifted.data() + 1 : x.data(), w, b, y);
      const auto want = group_norm_reference(s, x, w, b);
      Error e;
      for (size_t i = 0; i < y.size(); ++i) e.add(i, value(y[i]), want[i]);
      char what[160];
      snprintf(what, sizeof what, "group_norm %s %s %s %s G=%zu%s%s%s",
               s.channels_last ? "NHWC" : "NCHW", Entry<T>::dtype, s.label,
               (s.channels_last ? dims({s.n, s.hw, s.c}) : dims({s.n, s.c, s.hw})).c_str(),
               s.groups, s.silu ? " silu" : "", vec.stats ? " vec-stats" : "",
               vec.apply ? " vec-apply" : "");
      report(what, e, tolerance<T>());
    });
  }
}

// ---- Attention softmax ----

struct SoftmaxCase {
  const char* label;
  size_t batch, heads, lq, lk, d;  // d sets the scale, 1/sqrt(d), and the logits' spread
  bool causal;
  size_t chunk_bytes;  // AttentionOp::chunk_bytes; 0 for its default
  float gain;          // on the logits: 10 makes one key dominate each row
  bool small;
};

std::string softmax_label(const SoftmaxCase& c, const char* dtype) {
  char s[200];
  snprintf(s, sizeof s, "attn_softmax %s %s B=%zu H=%zu lq=%zu lk=%zu%s%s", dtype, c.label,
           c.batch, c.heads, c.lq, c.lk, c.causal ? " causal" : "",
           c.chunk_bytes ? " chunked" : "");
  return s;
}

// Mirrors the softmax half of src/ops/attention.rs cuda_impl::run: the same chunks of
// (batch, head) slices or of query rows, each a launch of attn_softmax over the chunk's scores
// with that function's arguments. The scores the GEMM would write are random logits here (the
// GEMMs are cuBLAS's); each chunk's probabilities are compared before the next chunk reuses
// the buffers, and the buffer's rows past the chunk must keep their poison.
template <class T>
void check_softmax(const SoftmaxCase& c) {
  const size_t DEFAULT_CHUNK_BYTES = (size_t)512 << 20, SOFTMAX_ROWS_PER_BLOCK = 4;
  const size_t chunk_bytes = c.chunk_bytes ? c.chunk_bytes : DEFAULT_CHUNK_BYTES;
  const size_t images = c.heads == 1 ? 1 : c.batch, inner = c.heads == 1 ? c.batch : c.heads;
  const size_t per_row = c.lk * (4 + sizeof(T));
  size_t slices, rows;
  if (c.lq * per_row <= chunk_bytes)
    slices = std::clamp<size_t>(chunk_bytes / (c.lq * per_row), 1, inner), rows = c.lq;
  else
    slices = 1, rows = std::clamp<size_t>(chunk_bytes / per_row, 1, c.lq);
  auto scores = Buffer<float>::uninit(slices * rows * c.lk);
  auto probs = Buffer<T>::uninit(slices * rows * c.lk);
  const int lk_i = to_i32(c.lk, "attention Lk");
  const float scale = (float)(1 / sqrt((double)c.d));
  const int causal = c.causal;
  // Q.K^T of tests/ops.rs's inputs (|q|, |k| in [0.05, 2)) has a standard deviation of
  // ~1.37 sqrt(d).
  std::normal_distribution<float> logit(0.f, 1.37f * sqrtf((float)c.d) * c.gain);

  Error e;
  std::vector<double> p(c.lk);
  for (size_t image = 0; image < images; ++image)
    for (size_t s0 = 0; s0 < inner; s0 += slices) {
      const size_t ns = std::min(slices, inner - s0);
      for (size_t r0 = 0; r0 < c.lq; r0 += rows) {
        const size_t nr = std::min(rows, c.lq - r0);
        const int nr_i = to_i32(nr, "attention rows per chunk");
        const int row_offset = to_i32(r0, "attention row offset");
        for (size_t i = 0; i < ns * nr * c.lk; ++i) scores[i] = logit(rng);
        std::fill(probs.data(), probs.data() + probs.size(), from_f32<T>(NAN));
        const size_t softmax_rows = ns * nr;
        const int64_t rows_arg = (int64_t)softmax_rows;
        cuda_host::launch({to_u32(div_ceil(softmax_rows, SOFTMAX_ROWS_PER_BLOCK),
                                  "attention rows"), 1, 1},
                          {32 * (unsigned)SOFTMAX_ROWS_PER_BLOCK, 1, 1}, 0, [&] {
                            Entry<T>::attn_softmax(scores.data(), probs.data(), rows_arg, nr_i,
                                                   lk_i, scale, causal, row_offset);
                          });
        // Row r of slice i is query r0 + r of (image, s0 + i): torch's top-left causal mask.
        for (size_t row = 0; row < softmax_rows; ++row) {
          const size_t query = r0 + row % nr;
          const size_t visible = c.causal ? std::min(c.lk, query + 1) : c.lk;
          const float* s = &scores[row * c.lk];
          double m = -INFINITY, sum = 0;
          for (size_t j = 0; j < visible; ++j) m = std::max(m, (double)scale * s[j]);
          for (size_t j = 0; j < visible; ++j) sum += p[j] = exp((double)scale * s[j] - m);
          const size_t at = ((image * inner + s0 + row / nr) * c.lq + query) * c.lk;
          for (size_t j = 0; j < c.lk; ++j)
            e.add(at + j, value(probs[row * c.lk + j]), j < visible ? p[j] / sum : 0.);
        }
        for (size_t i = softmax_rows * c.lk; i < probs.size(); ++i)
          e.outside(std::isnan(value(probs[i])));
      }
    }
  report(softmax_label(c, Entry<T>::dtype), e, tolerance<T>());
}

void check_attn_softmax(bool small) {
  // SDXL at 512x512: self-attention over 1024 tokens (10 heads of 64) and cross-attention onto
  // 77 text tokens (20 heads at 16x16), the VAE's single-head attention over 4096 tokens (head
  // dim 512), CLIP's causal self-attention; fewer query rows than the model where rows only
  // repeat the same code. Small chunk budgets force the chunk loops tests/ops.rs forces.
  const SoftmaxCase cases[] = {
      {"unet self-attn, 256 of 1024 queries", 1, 10, 256, 1024, 64, false, 0, 1, false},
      {"unet cross-attn 16x16", 2, 20, 256, 77, 64, false, 0, 1, false},
      // One head: the images are the GEMM batch (slices).
      {"vae mid attention, 96 of 4096 queries", 2, 1, 96, 4096, 512, false, 0, 1, false},
      {"clip text encoder", 2, 12, 77, 77, 64, true, 0, 1, false},
      {"peaked logits, 1000 keys", 1, 3, 9, 1000, 64, false, 0, 10, false},
      // Row chunks of 10 (f32) or 13 (f16, bf16) queries, the causal mask offset by each
      // chunk's first row.
      {"row chunks", 2, 3, 77, 77, 64, true, 10 * 77 * 8, 1, true},
      {"row chunks, one head", 3, 1, 40, 50, 16, true, 6 * 50 * 8, 1, true},
      // Chunks of 2 (batch, head) slices: 2 + 2 + 1 per image.
      {"slice chunks", 2, 5, 20, 30, 16, false, 2 * 20 * 30 * 8, 1, true},
      // Fewer keys than lanes: most lanes see none.
      {"5 keys", 1, 2, 5, 5, 64, true, 0, 1, true},
      {"1 key", 3, 1, 2, 1, 64, false, 0, 1, true},
      // 27 rows: the last block's fourth warp has no row.
      {"peaked logits, 100 keys", 1, 3, 9, 100, 64, false, 0, 10, true},
  };
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for_each_dtype([&]<class T>() { check_softmax<T>(c); });
  }
}

// ---- Bias + residual ----

struct BiasResidualCase {
  const char* label;
  size_t outer, channels, inner;  // y is [outer, channels, inner]; bias [C] when inner is 1
  bool small;
};

// Mirrors src/ops/bias_residual.rs BiasResidualOp::cuda.
template <class T>
void launch_bias_residual(const BiasResidualCase& c, const Buffer<T>& y, const Buffer<T>& bias,
                          const Buffer<T>& residual, const Buffer<T>& out) {
  const size_t CHUNK = 4096;
  const unsigned THREADS = 256;
  const size_t n = y.size();
  const size_t plane_len = c.inner == 1 ? c.channels : c.inner;
  const size_t planes = n / plane_len;
  const size_t chunk_len = std::max(CHUNK, div_ceil(plane_len, 65535));
  const int channels_arg = to_i32(c.channels, "bias_residual channels");
  const int64_t inner_arg = (int64_t)c.inner, plane_arg = (int64_t)plane_len,
                chunk_arg = (int64_t)chunk_len;
  cuda_host::launch({(unsigned)to_i32(planes, "bias_residual planes"),
                     to_u32(div_ceil(plane_len, chunk_len), "bias_residual chunks"), 1},
                    {THREADS, 1, 1}, 0, [&] {
                      Entry<T>::bias_residual(y.data(), bias.data(), residual.data(), out.data(),
                                              channels_arg, inner_arg, plane_arg, chunk_arg);
                    });
}

void check_bias_residual(bool small) {
  // The UNet's Linear layers that end in a residual add (forward_residual: to_out and the
  // feed-forward's output, [B, tokens, C] with a bias on C) and its proj_out
  // (forward_channels_first_residual: [B, C, HW] with a [C, 1] bias), at 512x512.
  const BiasResidualCase cases[] = {
      {"unet to_out 640ch 32x32 batch 2 [2*1024, 640] bias [640]", 2 * 1024, 640, 1, false},
      {"unet ff out 1280ch 16x16 [256, 1280] bias [1280]", 256, 1280, 1, false},
      {"unet proj_out [2, 640, 1024] bias [640, 1]", 2, 640, 1024, false},
      {"unet proj_out [1, 1280, 256] bias [1280, 1]", 1, 1280, 256, false},
      // Rows longer than a chunk: 4096 + 904 columns.
      {"[2, 3, 5000] bias [5000]", 6, 5000, 1, false},
      // Planes of 9000: chunks of 4096, 4096, 808.
      {"[1, 3, 9000] bias [3, 1]", 1, 3, 9000, false},
      {"[2, 5, 3, 7] bias [5, 1, 1]", 2, 5, 21, true},
      {"[3, 7] bias [7]", 3, 7, 1, true},
      {"[2, 300] bias [300]", 2, 300, 1, true},
  };
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for_each_dtype([&]<class T>() {
      const size_t n = c.outer * c.channels * c.inner;
      auto y = random_buffer<T>(n), bias = random_buffer<T>(c.channels),
           residual = random_buffer<T>(n), out = Buffer<T>::uninit(n);
      launch_bias_residual(c, y, bias, residual, out);
      Error e;
      for (size_t i = 0; i < n; ++i)
        e.add(i, value(out[i]),
              value(y[i]) + value(bias[i / c.inner % c.channels]) + value(residual[i]));
      report(std::string("bias_residual ") + Entry<T>::dtype + " " + c.label, e, tolerance<T>());
    });
  }
}

// ---- Conv prefill ----

struct PrefillCase {
  const char* label;
  size_t n, o, oh, ow;  // the convolution's output geometry
  bool channels_last, residual, small;
  // y and the residual one element into their buffers (views at an offset): the scalar form.
  bool misaligned = false;
};

// Mirrors src/ops/conv.rs prefill_launch and src/ops/conv/cudnn.rs prefill: y = bias[channel]
// (+ residual), before cuDNN accumulates the convolution into y. Returns whether it took the
// 16-byte-vector form.
template <class T>
bool launch_prefill(const PrefillCase& c, const Buffer<T>& bias, const T* residual, T* y) {
  const size_t THREADS = 256, ROW_BLOCK_ELEMS = 8192, PLANE_CHUNK = 4096, MAX_GRID_Y = 65535;
  const size_t vec = 16 / sizeof(T);
  const bool aligned = (((uintptr_t)y | (uintptr_t)residual) % 16) == 0;
  const int channels_arg = to_i32(c.o, "conv2d out channels");
  const int has_residual = residual != nullptr;
  // Without a residual the kernel never reads its residual argument; bias stands in for it.
  const T* r = residual ? residual : bias.data();
  if (c.channels_last) {
    const size_t rows = c.n * c.oh * c.ow;
    const size_t per_block = std::max<size_t>(ROW_BLOCK_ELEMS / c.o, 1);
    const bool v = aligned && c.o % vec == 0;
    const int64_t rows_arg = (int64_t)rows;
    const int per_block_arg = to_i32(per_block, "conv2d prefill rows per block");
    cuda_host::launch({(unsigned)to_i32(div_ceil(rows, per_block), "conv2d prefill blocks"), 1, 1},
                      {(unsigned)THREADS, 1, 1}, 0, [&] {
                        (v ? Entry<T>::conv_prefill_rows_vec : Entry<T>::conv_prefill_rows)(
                            bias.data(), r, y, rows_arg, channels_arg, per_block_arg,
                            has_residual);
                      });
    return v;
  }
  const size_t plane_len = c.oh * c.ow;
  const bool v = aligned && plane_len % vec == 0;
  const size_t unit = v ? vec : 1;
  const size_t chunk =
      div_ceil(std::max(PLANE_CHUNK, div_ceil(plane_len, MAX_GRID_Y)), unit) * unit;
  const int64_t plane_len_arg = (int64_t)plane_len, chunk_arg = (int64_t)chunk;
  const unsigned chunks = to_u32(div_ceil(plane_len, chunk), "conv2d prefill chunks");
  if (chunks > MAX_GRID_Y) cuda_host::fail("conv2d prefill: Rust bails");
  cuda_host::launch({(unsigned)to_i32(c.n * c.o, "conv2d prefill blocks"), chunks, 1},
                    {(unsigned)THREADS, 1, 1}, 0, [&] {
                      (v ? Entry<T>::conv_prefill_planes_vec : Entry<T>::conv_prefill_planes)(
                          bias.data(), r, y, plane_len_arg, channels_arg, chunk_arg,
                          has_residual);
                    });
  return v;
}

void check_conv_prefill(bool small) {
  // The UNet's convolutions are NCHW, the VAE decoder's NHWC; resnets' second convolutions add
  // the shortcut as the residual.
  const PrefillCase cases[] = {
      {"unet resnet conv2 320@64x64 + shortcut", 1, 320, 64, 64, false, true, false},
      {"unet conv 1280@16x16 batch 2", 2, 1280, 16, 16, false, false, false},
      {"vae conv 512@64x64", 1, 512, 64, 64, true, false, false},
      // 33 chunks a plane (the last short) in NCHW; 64 rows a block, 2059 blocks in NHWC.
      {"resnet conv2 128@363x363 + shortcut", 1, 128, 363, 363, true, true, false},
      {"resnet conv2 16@363x363 + shortcut", 1, 16, 363, 363, false, true, false},
      {"5@7x3 batch 3 + residual", 3, 5, 7, 3, false, true, true},
      {"7@5x3 batch 2", 2, 7, 5, 3, true, false, true},
      // 320 channels: 40 bf16 lanes, 6 phases, 16 threads idle; 25 rows a block.
      {"320@9x7 batch 2 + residual", 2, 320, 9, 7, true, true, true},
      // More channels than a block's 8192 elements: one row a block, lanes striding twice.
      {"10240@2x3 + residual", 1, 10240, 2, 3, true, true, true},
      // Planes of 8x8: whole vectors (64 elements).
      {"24@8x8 batch 2 + residual", 2, 24, 8, 8, false, true, true},
      // The scalar forms on shapes the vector forms take, through misaligned views.
      {"vae conv 128@33x31 + residual", 1, 128, 33, 31, true, true, true, true},
      {"unet 320@16x16 + residual", 1, 320, 16, 16, false, true, true, true},
  };
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for_each_dtype([&]<class T>() {
      const size_t total = c.n * c.o * c.oh * c.ow, plane = c.oh * c.ow;
      const size_t skew = c.misaligned ? 1 : 0;
      auto bias = random_buffer<T>(c.o);
      auto residual = random_buffer<T>(c.residual ? total + skew : 0);
      // y one element longer when misaligned: the element before the view must keep its
      // poison (NaN).
      auto y = Buffer<T>::uninit(total + skew);
      const bool v = launch_prefill(c, bias, c.residual ? residual.data() + skew : nullptr,
                                    y.data() + skew);
      Error e;
      for (size_t i = 0; i < total; ++i) {
        const size_t ch = c.channels_last ? i % c.o : i / plane % c.o;
        e.add(i, value(y[i + skew]),
              value(bias[ch]) + (c.residual ? value(residual[i + skew]) : 0.));
      }
      if (skew) e.outside(std::isnan(value(y[0])));
      const auto shape =
          c.channels_last ? dims({c.n, c.oh, c.ow, c.o}) : dims({c.n, c.o, c.oh, c.ow});
      report(std::string("conv_prefill ") + Entry<T>::dtype +
                 (c.channels_last ? " NHWC " : " NCHW ") + c.label + " " + shape +
                 (v ? " vec" : ""),
             e, tolerance<T>());
    });
  }
}

// ---- GEGLU ----

struct GegluCase {
  const char* label;
  size_t rows, d;  // x [rows, 2d] -> y [rows, d]
  bool small;
};

// Mirrors src/ops/geglu.rs cuda_fwd: geglu_* without a bias, geglu_bias_* with one.
template <class T>
void launch_geglu(const GegluCase& c, const Buffer<T>& x, const Buffer<T>* bias,
                  const Buffer<T>& y) {
  const size_t THREADS = 256;
  const int d_arg = to_i32(c.d, "geglu width");
  cuda_host::launch({to_u32(c.rows, "geglu rows"),
                     to_u32(div_ceil(c.d, THREADS), "geglu column blocks"), 1},
                    {(unsigned)THREADS, 1, 1}, 0, [&] {
                      if (bias)
                        Entry<T>::geglu_bias(x.data(), bias->data(), y.data(), d_arg);
                      else
                        Entry<T>::geglu(x.data(), y.data(), d_arg);
                    });
}

void check_geglu(bool small) {
  // diffusers' GEGLU in SDXL's feed-forwards: proj to 2 x 4C, C = 640 (1024 tokens) and 1280
  // (256 tokens) at 512x512.
  const GegluCase cases[] = {
      {"unet ff 640ch 32x32 [1024, 2x2560]", 1024, 2560, false},
      {"unet ff 1280ch 16x16 batch 2 [512, 2x5120]", 512, 5120, false},
      {"[3, 2x77]", 3, 77, true},
      {"[5, 2x300]", 5, 300, true},
      {"[4, 2x1]", 4, 1, true},
  };
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for (bool with_bias : {false, true})
      for_each_dtype([&]<class T>() {
        // Gates out to +-4: GELU's whole bend, and its tails.
        auto x = random_buffer<T>(c.rows * 2 * c.d, 0.f, 2.f);
        auto bias = random_buffer<T>(2 * c.d, 0.f, 0.5f);
        auto y = Buffer<T>::uninit(c.rows * c.d);
        launch_geglu(c, x, with_bias ? &bias : nullptr, y);
        Error e;
        for (size_t r = 0; r < c.rows; ++r)
          for (size_t j = 0; j < c.d; ++j) {
            double a = value(x[r * 2 * c.d + j]), g = value(x[r * 2 * c.d + c.d + j]);
            if (with_bias) a += value(bias[j]), g += value(bias[c.d + j]);
            // torch's F.gelu(approximate="none"), as src/ops/geglu.rs's gelu_erf.
            e.add(r * c.d + j, value(y[r * c.d + j]), a * 0.5 * g * (1 + erf(g * M_SQRT1_2)));
          }
        report(std::string(with_bias ? "geglu_bias " : "geglu ") + Entry<T>::dtype + " " +
                   c.label,
               e, tolerance<T>());
      });
  }
}

// ---- Postprocess ----

struct PostprocessCase {
  const char* label;
  size_t b, c, h, w;
  bool small;
};

// Mirrors src/ops/postprocess.rs ToRgb8::cuda.
template <class T>
void launch_to_rgb8(const PostprocessCase& c, const Buffer<T>& x, const Buffer<uint8_t>& y) {
  const size_t THREADS = 256;
  const size_t n_out = c.b * c.c * c.h * c.w;
  const int64_t n_arg = (int64_t)n_out, plane_arg = (int64_t)(c.h * c.w);
  const int c_arg = to_i32(c.c, "to_rgb8 channels");
  cuda_host::launch({to_u32(div_ceil(n_out, THREADS), "to_rgb8 blocks"), 1, 1},
                    {(unsigned)THREADS, 1, 1}, 0,
                    [&] { Entry<T>::to_rgb8(x.data(), y.data(), n_arg, c_arg, plane_arg); });
}

// src/ops/postprocess.rs's `byte`, the contract: the same f32 steps as the CPU path (diffusers'
// (x / 2 + 0.5).clamp(0, 1), numpy's round half to even of x * 255), so the bytes must be equal,
// not within one: a double-precision evaluation would round the few values within an f32 ulp
// of a .5 tie differently from both.
uint8_t rgb8_reference(float x) {
  float v = x * 0.5f + 0.5f;
  v = v < 0.f ? 0.f : v > 1.f ? 1.f : v;  // Rust's clamp: NaN stays NaN...
  v = nearbyintf(v * 255.f);
  return std::isnan(v) ? 0 : (uint8_t)v;  // ... and `as u8` makes it 0
}

void check_postprocess(bool small) {
  const PostprocessCase cases[] = {
      {"vae output 512x512", 1, 3, 512, 512, false},
      {"batch 2, 37x53", 2, 3, 37, 53, true},
      {"4 channels 5x7", 1, 4, 5, 7, true},
  };
  // The clamp's edges, out-of-range and non-finite values, and x whose (x / 2 + 0.5) * 255 is a
  // .5 tie in f32 (postprocess.rs's test's values).
  std::vector<float> special = {-2, -1, -0.999f, 0, 1, 1.5f, NAN, INFINITY, -INFINITY};
  for (int k : {0, 1, 2, 127, 128, 253}) special.push_back(((k + 0.5f) / 255.f - 0.5f) * 2.f);
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for_each_dtype([&]<class T>() {
      const size_t n = c.b * c.c * c.h * c.w;
      Buffer<T> x(n, T{});
      std::uniform_real_distribution<float> pixel(-1.2f, 1.2f);
      for (size_t i = 0; i < n; ++i)
        x[i] = from_f32<T>(i < special.size() ? special[i] : pixel(rng));
      Buffer<uint8_t> y(n, 0xab);
      launch_to_rgb8(c, x, y);
      const size_t plane = c.h * c.w;
      report_exact(std::string("to_rgb8 ") + Entry<T>::dtype + " " + c.label + " " +
                       dims({c.b, c.c, c.h, c.w}) + " -> NHWC u8",
                   n, [&](size_t i) {
                     const size_t ch = i % c.c, pixel = i / c.c;
                     const size_t b = pixel / plane, p = pixel % plane;
                     return y[i] == rgb8_reference(value(x[(b * c.c + ch) * plane + p]));
                   });
    });
  }
}

// ---- Nearest 2x upsampling ----

// Mirrors src/ops/upsample.rs copy_unit: the widest unit (16, 8, 4 or 2 bytes) that divides a
// pixel's bytes and both base addresses.
size_t copy_unit(size_t pixel_bytes, const void* x, const void* y, const char* op) {
  const size_t align = (size_t)((uintptr_t)x | (uintptr_t)y);
  for (size_t u : {16, 8, 4, 2})
    if (pixel_bytes % u == 0 && align % u == 0) return u;
  cuda_host::fail("%s: no copy unit (Rust bails)", op);
}

struct UpsampleCase {
  const char* label;
  size_t n, h, w, c;
  size_t offset;  // the input is a view this many elements into its allocation
  bool small;
};

// Mirrors src/ops/upsample.rs UpsampleNearest2xNhwc::cuda, which picks the copy unit from the
// pixel's bytes and the two pointers' alignment; returns the unit.
template <class T>
size_t launch_upsample(const UpsampleCase& c, const T* x, const Buffer<T>& y) {
  const size_t THREADS = 256;
  const size_t pixel_bytes = c.c * sizeof(T);
  const size_t unit = copy_unit(pixel_bytes, x, y.data(), "upsample");
  const size_t units = pixel_bytes / unit, row_units = 2 * c.w * units;
  const int width_arg = to_i32(c.w, "upsample width");
  const int units_arg = to_i32(units, "upsample units per pixel");
  to_i32(row_units, "upsample units per output row");
  const mock_dim3 grid = {to_u32(c.n * 2 * c.h, "upsample output rows"),
                          to_u32(div_ceil(row_units, THREADS), "upsample blocks per row"), 1};
  if (grid.x > 0x7fffffffu || grid.y > 65535) cuda_host::fail("upsample: too large (Rust bails)");
  auto run = [&]<class U>(void (*kernel)(const U*, U*, int, int)) {
    cuda_host::launch(grid, {(unsigned)THREADS, 1, 1}, 0, [&] {
      kernel(reinterpret_cast<const U*>(x), reinterpret_cast<U*>(y.data()), width_arg, units_arg);
    });
  };
  switch (unit) {
    case 16: run(nearest2x_nhwc_u16); break;
    case 8: run(nearest2x_nhwc_u8); break;
    case 4: run(nearest2x_nhwc_u4); break;
    default: run(nearest2x_nhwc_u2); break;
  }
  return unit;
}

void check_upsample(bool small) {
  // The VAE decoder's upsamplers run on [1, 64, 64, 512], [1, 128, 128, 512] and
  // [1, 256, 256, 256] at 512x512: the first at its size, the other two's code paths on
  // smaller maps; channel counts and offsets that select every copy unit.
  const UpsampleCase cases[] = {
      {"vae up 512ch 64x64", 1, 64, 64, 512, 0, false},
      {"256ch 17x23 batch 2", 2, 17, 23, 256, 0, false},
      {"3 channels", 1, 5, 7, 3, 0, true},
      {"4 channels batch 2", 2, 3, 4, 4, 0, true},
      {"512ch, input at element 1 of its allocation", 1, 9, 11, 512, 1, true},
      {"1 channel", 1, 33, 65, 1, 0, true},
  };
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for_each_dtype([&]<class T>() {
      const size_t in = c.n * c.h * c.w * c.c, out = 4 * in;
      auto alloc = random_buffer<T>(c.offset + in);
      const T* x = alloc.data() + c.offset;
      auto y = Buffer<T>::uninit(out);
      const size_t unit = launch_upsample(c, x, y);
      char what[160];
      snprintf(what, sizeof what, "nearest2x_nhwc_u%zu (%s) %s %s", unit, Entry<T>::dtype, c.label,
               dims({c.n, c.h, c.w, c.c}).c_str());
      report_exact(what, out, [&](size_t i) {
        const size_t ch = i % c.c, ow = i / c.c % (2 * c.w), oh = i / c.c / (2 * c.w) % (2 * c.h),
                     n = i / c.c / (2 * c.w) / (2 * c.h);
        return memcmp(&y[i], &x[((n * c.h + oh / 2) * c.w + ow / 2) * c.c + ch], sizeof(T)) == 0;
      });
    });
  }
}

// ---- Upsampling + 3x3 convolution as four phases: the interleave ----

struct PhasesCase {
  const char* label;
  bool channels_last;
  size_t n, h, w, o;  // the low resolution; the input has (h+1) x (w+1) pixels of 4*o channels
  size_t offset;      // the input is a view this many elements into its allocation
  bool small;
};

// Mirrors src/ops/upsample_conv.rs InterleavePhases::cuda; returns the unit it moves (NHWC: the
// widest that divides a pixel and both pointers, as for the upsampling; NCHW: one element).
template <class T>
size_t launch_phases(const PhasesCase& c, const T* x, const Buffer<T>& y) {
  const size_t THREADS = 256;
  const int height = to_i32(c.h, "interleave_phases height");
  const int width = to_i32(c.w, "interleave_phases width");
  size_t unit = 0, rows, row_len, last;
  if (c.channels_last) {
    const size_t pixel_bytes = c.o * sizeof(T);
    unit = copy_unit(pixel_bytes, x, y.data(), "interleave_phases");
    const size_t units = pixel_bytes / unit;
    rows = c.n * 2 * c.h, row_len = 2 * c.w * units, last = units;
  } else {
    unit = sizeof(T), rows = c.n * c.o * 2 * c.h, row_len = 2 * c.w, last = c.o;
  }
  to_i32(row_len, "interleave_phases row length");
  const int last_arg = to_i32(last, "interleave_phases units or channels");
  const mock_dim3 grid = {to_u32(rows, "interleave_phases output rows"),
                          to_u32(div_ceil(row_len, THREADS), "interleave_phases blocks per row"),
                          1};
  if (grid.x > 0x7fffffffu || grid.y > 65535)
    cuda_host::fail("interleave_phases: too large (Rust bails)");
  auto run = [&]<class U>(void (*kernel)(const U*, U*, int, int, int)) {
    cuda_host::launch(grid, {(unsigned)THREADS, 1, 1}, 0, [&] {
      kernel(reinterpret_cast<const U*>(x), reinterpret_cast<U*>(y.data()), height, width,
             last_arg);
    });
  };
  if (c.channels_last) {
    switch (unit) {
      case 16: run(phases_nhwc_u16); break;
      case 8: run(phases_nhwc_u8); break;
      case 4: run(phases_nhwc_u4); break;
      default: run(phases_nhwc_u2); break;
    }
  } else if (unit == 4) {
    run(phases_nchw_u4);
  } else {
    run(phases_nchw_u2);
  }
  return unit;
}

void check_phases(bool small) {
  // The VAE decoder's first upsampler (64x64 of 512 channels, channels-last) at its size; the
  // UNet's (NCHW, 1280 channels at 32x32) with fewer channels; odd sizes, batches, channel
  // counts and offsets that select every copy unit, rows wider than one block.
  const PhasesCase cases[] = {
      {"vae up 512ch 64x64", true, 1, 64, 64, 512, 0, false},
      {"unet up 32x32, 64ch batch 2", false, 2, 32, 32, 64, 0, false},
      {"17x23 256ch batch 2", true, 2, 17, 23, 256, 0, false},
      {"3 channels", true, 1, 5, 7, 3, 0, true},
      {"4 channels batch 2", true, 2, 3, 4, 4, 0, true},
      {"8 channels, input at element 1", true, 1, 4, 5, 8, 1, true},
      {"1 channel, 1x1", true, 1, 1, 1, 1, 0, true},
      {"3 channels nchw batch 2", false, 2, 5, 7, 3, 0, true},
      {"nchw rows wider than a block", false, 1, 2, 300, 2, 0, true},
      {"1 channel nchw 1x1", false, 1, 1, 1, 1, 0, true},
  };
  for (const auto& c : cases) {
    if (small && !c.small) continue;
    for_each_dtype([&]<class T>() {
      const size_t in = c.n * (c.h + 1) * (c.w + 1) * 4 * c.o, out = c.n * 4 * c.h * c.w * c.o;
      auto alloc = random_buffer<T>(c.offset + in);
      const T* x = alloc.data() + c.offset;
      auto y = Buffer<T>::uninit(out);
      const size_t unit = launch_phases(c, x, y);
      char what[160];
      snprintf(what, sizeof what, "phases_%s_u%zu (%s) %s %s",
               c.channels_last ? "nhwc" : "nchw", unit, Entry<T>::dtype, c.label,
               dims({c.n, c.h, c.w, c.o}).c_str());
      const size_t h1 = c.h + 1, w1 = c.w + 1, o = c.o;
      report_exact(what, out, [&](size_t i) {
        size_t src;
        if (c.channels_last) {
          const size_t ch = i % o, ow = i / o % (2 * c.w), oh = i / o / (2 * c.w) % (2 * c.h),
                       n = i / o / (2 * c.w) / (2 * c.h), a = oh % 2, b = ow % 2;
          src = (((n * h1 + oh / 2 + a) * w1 + ow / 2 + b) * 4 + 2 * a + b) * o + ch;
        } else {
          const size_t ow = i % (2 * c.w), oh = i / (2 * c.w) % (2 * c.h),
                       plane = i / (2 * c.w) / (2 * c.h), n = plane / o, ch = plane % o,
                       a = oh % 2, b = ow % 2;
          src = ((n * 4 * o + (2 * a + b) * o + ch) * h1 + oh / 2 + a) * w1 + ow / 2 + b;
        }
        return memcmp(&y[i], &x[src], sizeof(T)) == 0;
      });
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::string(argv[1]) == "--small";
  setvbuf(stdout, nullptr, _IOLBF, 0);  // a line per case as it finishes, also into a pipe
  check_group_norm(small);
  check_attn_softmax(small);
  check_bias_residual(small);
  check_conv_prefill(small);
  check_geglu(small);
  check_postprocess(small);
  check_upsample(small);
  check_phases(small);
  printf(failures ? "FAILED: %d cases\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
