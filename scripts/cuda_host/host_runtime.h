// The host half of cuda_mock.h: launches a kernel's grid block by block, every CUDA thread of a
// block a fiber on this one OS thread. Include it once per program, after the kernel sources.
//
// Why fibers and not one std::thread per CUDA thread: every __syncthreads or shuffle would then
// be a context switch per thread through the kernel (~10 ms per block of gn_stats, 256 threads
// and 15 shuffles, on two cores), and the norm kernels at the model's shapes run thousands of
// blocks. A fiber switch is a few register moves.
//
// What the schedule guarantees and checks:
// - A thread runs until it reaches a barrier (__syncthreads, __syncwarp, a shuffle) or returns;
//   between barriers the ready threads run in a fresh random order each time, so a read that
//   no barrier orders after the write it needs sees 0xff poison or stale data in some run, and
//   the comparison fails. A grid's blocks run in a random order too (seeded: runs repeat).
// - Shuffles and __syncwarp take the full mask and all 32 lanes; __syncthreads all threads of
//   the block. A barrier that can never complete (threads returned or wait elsewhere) stops the
//   program with who waits where.
// - Shared memory: each static __shared__ array and the dynamic buffer is its own heap block of
//   the exact size, filled with 0xff (NaN in every float dtype) per block, so AddressSanitizer
//   sees an overrun of one array; static + dynamic may not exceed the 48 KiB a launch gets
//   without opting in (none of turbine's launches opt in).
// - Launch bounds as the driver checks them: grid x < 2^31, y and z <= 65535, 1024 threads.
// - ThreadSanitizer: fibers switch without implying any order, a barrier orders the threads of
//   its block (release on arrival, acquire on leaving), each block gets fresh shared memory and
//   barrier state, and the scheduler's own bookkeeping is hidden from TSan. Blocks run
//   alternately on two sets of fibers, and nothing orders blocks on different sets (every other
//   block of the random order): TSan reports a shared-memory race inside a block, and a
//   global-memory conflict between two blocks on different sets (both writing an element, or
//   one reading what the other writes). Launches are ordered with each other and with the
//   host, as kernels on one stream are.
#pragma once
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <memory>
#include <new>
#include <random>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_HOST_ASAN 1
#else
#define CUDA_HOST_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
// Exported by libtsan, not declared in its header: accesses of the calling thread go unrecorded.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#define CUDA_HOST_TSAN 1
#else
#define CUDA_HOST_TSAN 0
#endif

mock_dim3 threadIdx, blockIdx, blockDim, gridDim;

// Swaps stacks: saves the callee-saved registers and the FP control words on the current stack,
// stores its pointer in *save, and resumes the stack at `load` (System V x86-64).
extern "C" void cuda_host_swap(void** save, void* load);
// A new fiber's first return lands here, with its Fiber* in r12.
extern "C" void cuda_host_fiber_start();
asm(R"(
  .text
  .globl cuda_host_swap
  .type cuda_host_swap, @function
cuda_host_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_host_swap, .-cuda_host_swap

  .globl cuda_host_fiber_start
  .type cuda_host_fiber_start, @function
cuda_host_fiber_start:
  movq %r12, %rdi
  call cuda_host_fiber_main
  ud2
  .size cuda_host_fiber_start, .-cuda_host_fiber_start
)");

namespace cuda_host {

constexpr size_t kSharedLimit = 48 * 1024;

struct Fiber {
  enum State { ready, at_syncthreads, at_warp_barrier, returned };
  void* sp = nullptr;
  unsigned char* stack = nullptr;
  size_t stack_size = 0;
  void* tsan = nullptr;
  void* asan_fake_stack = nullptr;
  mock_dim3 tid{};
  unsigned linear = 0;  // tid as one index: warp = linear / 32
  State state = ready;
  int shuffle_parity = 0;
};

// One block's barrier and shuffle state, new for every block (see the TSan notes above).
struct Block {
  struct Static {
    const char* file;
    int line;
    size_t align;
    void* p;
  };
  unsigned threads = 0, warps = 0;
  // Shuffle slots [warp][parity][lane]: alternate exchanges use alternate halves, so a lane
  // that leaves an exchange and enters the next cannot overwrite a value another lane of the
  // first has yet to read.
  std::vector<unsigned char> slots;
  // Addresses TSan keys the barriers' release/acquire on: [0] __syncthreads, [1 + w] warp w.
  std::vector<char> sync;
  std::vector<Static> statics;
  size_t static_bytes = 0, dynamic_bytes = 0;
  void* dynamic = nullptr;

  unsigned char* slot(unsigned warp, int parity, unsigned lane) {
    return &slots[((warp * 2 + parity) * 32 + lane) * 8];
  }
  ~Block() {
    for (auto& s : statics) ::operator delete(s.p, std::align_val_t(s.align));
    ::operator delete(dynamic, std::align_val_t(16));
  }
};

struct Runtime {
  // Two sets: consecutive blocks run on different fibers, so that TSan sees no program order
  // between them.
  std::vector<std::unique_ptr<Fiber>> fibers[2];
  void* host_sp = nullptr;
  void* host_tsan = nullptr;
  void* host_fake_stack = nullptr;
  const void* host_stack_bottom = nullptr;
  size_t host_stack_size = 0;
  Fiber* current = nullptr;
  Block* block = nullptr;
  void (*call)(void*) = nullptr;
  void* ctx = nullptr;
  std::mt19937 order_rng{12345};
  char launch_sync = 0, end_sync = 0;  // TSan: host -> launch, launch -> host
};
// Never destroyed: at exit the fibers are still parked mid-kernel-loop.
inline Runtime& rt = *new Runtime;

// Stops the program; inside a kernel, says which block and thread got there.
[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  fputs("cuda_host: ", stderr);
  if (rt.current)
    fprintf(stderr, "block (%u,%u,%u) thread (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z,
            threadIdx.x, threadIdx.y, threadIdx.z);
  vfprintf(stderr, fmt, args);
  fputc('\n', stderr);
  va_end(args);
  abort();
}

inline void tsan_ignore(bool on) {
#if CUDA_HOST_TSAN
  if (on)
    __tsan_ignore_thread_begin();
  else
    __tsan_ignore_thread_end();
#else
  (void)on;
#endif
}
inline void tsan_release(void* a) {
#if CUDA_HOST_TSAN
  __tsan_release(a);
#else
  (void)a;
#endif
}
inline void tsan_acquire(void* a) {
#if CUDA_HOST_TSAN
  __tsan_acquire(a);
#else
  (void)a;
#endif
}

// Fiber -> scheduler.
inline void yield(Fiber* f) {
#if CUDA_HOST_ASAN
  __sanitizer_start_switch_fiber(&f->asan_fake_stack, rt.host_stack_bottom, rt.host_stack_size);
#endif
#if CUDA_HOST_TSAN
  __tsan_switch_to_fiber(rt.host_tsan, __tsan_switch_to_fiber_no_sync);
#endif
  cuda_host_swap(&f->sp, rt.host_sp);
#if CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &rt.host_stack_bottom, &rt.host_stack_size);
#endif
}

// Scheduler -> fiber, until it yields.
inline void resume(Fiber* f) {
  rt.current = f;
  threadIdx = f->tid;
#if CUDA_HOST_ASAN
  __sanitizer_start_switch_fiber(&rt.host_fake_stack, f->stack, f->stack_size);
#endif
#if CUDA_HOST_TSAN
  __tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);
#endif
  cuda_host_swap(&rt.host_sp, f->sp);
#if CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(rt.host_fake_stack, nullptr, nullptr);
#endif
  rt.current = nullptr;
}

inline Fiber* new_fiber() {
  // Generous: the ASan build's frames hold wmma fragments (1 KiB each) with redzones.
  constexpr size_t kStack = 256 << 10, kGuard = 4096;
  auto f = new Fiber;
  void* mem = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) fail("mmap of a fiber stack failed");
  mprotect(mem, kGuard, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
  f->stack = static_cast<unsigned char*>(mem) + kGuard;
  f->stack_size = kStack;
  // The frame cuda_host_swap pops: FP control words, r15..r12 (r12 = f), rbx, rbp, and the
  // return address; the stack is 16-byte aligned where cuda_host_fiber_start calls.
  void** sp = reinterpret_cast<void**>(f->stack + kStack);
  *--sp = reinterpret_cast<void*>(cuda_host_fiber_start);
  *--sp = nullptr;  // rbp
  *--sp = nullptr;  // rbx
  *--sp = f;        // r12
  *--sp = nullptr;  // r13
  *--sp = nullptr;  // r14
  *--sp = nullptr;  // r15
  sp -= 2;
  const unsigned mxcsr = __builtin_ia32_stmxcsr();
  unsigned short fpucw;
  asm volatile("fnstcw %0" : "=m"(fpucw));
  memcpy(sp, &fpucw, sizeof fpucw);
  memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof mxcsr);
  f->sp = sp;
#if CUDA_HOST_TSAN
  f->tsan = __tsan_create_fiber(0);
#endif
  return f;
}

inline unsigned lane_of(const Fiber* f) { return f->linear % 32; }
inline unsigned warp_of(const Fiber* f) { return f->linear / 32; }

// Waits at the barrier `state` names with the other threads it covers.
inline void barrier(Fiber::State state, void* sync) {
  Fiber* f = rt.current;
  tsan_release(sync);
  f->state = state;
  yield(f);
  tsan_acquire(sync);
}

inline int lane_id() { return (int)lane_of(rt.current); }

inline void warp_exchange(unsigned mask, const void* in, void* out, size_t bytes, int src_lane) {
  if (mask != 0xffffffffu) fail("shuffle with mask %#x: only full warps are emulated", mask);
  if (bytes > 8) fail("shuffle of %zu bytes", bytes);
  Fiber* f = rt.current;
  Block& b = *rt.block;
  const unsigned w = warp_of(f), lane = lane_of(f);
  memcpy(b.slot(w, f->shuffle_parity, lane), in, bytes);
  barrier(Fiber::at_warp_barrier, &b.sync[1 + w]);
  // Out of range (__shfl_down_sync past lane 31): the caller keeps its own value.
  const unsigned src = src_lane >= 0 && src_lane < 32 ? (unsigned)src_lane : lane;
  memcpy(out, b.slot(w, f->shuffle_parity, src), bytes);
  f->shuffle_parity ^= 1;
}

inline void* shared_alloc(size_t bytes) {
  void* p = ::operator new(bytes ? bytes : 1, std::align_val_t(16));
  memset(p, 0xff, bytes);
  return p;
}

// Runs one block on fiber set `set` to completion.
inline void run_block(std::vector<std::unique_ptr<Fiber>>& set, Block& b) {
  const unsigned n = b.threads;
  std::vector<unsigned> ready(n), next;
  unsigned returned = 0, at_sync = 0;
  std::vector<unsigned> at_warp(b.warps, 0);
  for (unsigned t = 0; t < n; ++t) {
    Fiber* f = set[t].get();
    f->linear = t;
    f->tid = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    f->state = Fiber::ready;
    f->shuffle_parity = 0;
    ready[t] = t;
  }
  while (returned < n) {
    if (ready.empty()) {
      // Nothing can run: a barrier some threads will never reach.
      fprintf(stderr, "cuda_host: block (%u,%u,%u) deadlocks: %u threads returned, %u wait at "
              "__syncthreads", blockIdx.x, blockIdx.y, blockIdx.z, returned, at_sync);
      for (unsigned w = 0; w < b.warps; ++w)
        if (at_warp[w])
          fprintf(stderr, ", %u lanes of warp %u at a shuffle or __syncwarp", at_warp[w], w);
      fputc('\n', stderr);
      abort();
    }
    std::shuffle(ready.begin(), ready.end(), rt.order_rng);
    next.clear();
    for (unsigned t : ready) {
      Fiber* f = set[t].get();
      resume(f);
      switch (f->state) {
        case Fiber::returned:
          ++returned;
          break;
        case Fiber::at_syncthreads:
          if (++at_sync == n) {
            at_sync = 0;
            for (unsigned u = 0; u < n; ++u)
              if (set[u]->state == Fiber::at_syncthreads) next.push_back(u);
          }
          break;
        case Fiber::at_warp_barrier: {
          const unsigned w = warp_of(f);
          if (++at_warp[w] == 32) {
            at_warp[w] = 0;
            for (unsigned u = w * 32; u < w * 32 + 32; ++u)
              if (set[u]->state == Fiber::at_warp_barrier) next.push_back(u);
          }
          break;
        }
        case Fiber::ready:
          fail("fiber yielded without a reason (scheduler bug)");
      }
    }
    for (unsigned u : next) set[u]->state = Fiber::ready;
    ready.swap(next);
  }
}

template <class F>
void launch(mock_dim3 grid, mock_dim3 block, size_t dynamic_smem, F&& kernel) {
  const unsigned threads = block.x * block.y * block.z;
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 ||
      grid.z > 65535)
    fail("launch: invalid grid (%u, %u, %u)", grid.x, grid.y, grid.z);
  if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > 1024)
    fail("launch: invalid block (%u, %u, %u)", block.x, block.y, block.z);
  if (threads % 32 != 0)
    fail("launch: %u threads per block, not whole warps (not emulated)", threads);
  if (dynamic_smem > kSharedLimit) fail("launch: %zu bytes of dynamic shared memory", dynamic_smem);

  rt.call = [](void* ctx) { (*static_cast<std::remove_reference_t<F>*>(ctx))(); };
  rt.ctx = &kernel;
#if CUDA_HOST_TSAN
  if (!rt.host_tsan) rt.host_tsan = __tsan_get_current_fiber();
#endif
  tsan_release(&rt.launch_sync);
  tsan_ignore(true);
  for (auto& set : rt.fibers)
    while (set.size() < threads) set.emplace_back(new_fiber());
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rt.order_rng);
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t i = order[k];
    blockIdx = {(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y),
                (unsigned)(i / ((uint64_t)grid.x * grid.y))};
    auto b = std::make_unique<Block>();
    b->threads = threads;
    b->warps = threads / 32;
    b->slots.assign((size_t)b->warps * 2 * 32 * 8, 0xff);
    b->sync.assign(1 + b->warps, 0);
    b->dynamic_bytes = dynamic_smem;
    b->dynamic = shared_alloc(dynamic_smem);
    rt.block = b.get();
    run_block(rt.fibers[k % 2], *b);
    rt.block = nullptr;
  }
  tsan_ignore(false);
  tsan_acquire(&rt.end_sync);
}

}  // namespace cuda_host

// A new fiber starts here and never returns: it runs the current launch's kernel once per block
// it is resumed for.
extern "C" [[noreturn]] void cuda_host_fiber_main(cuda_host::Fiber* f) {
  using namespace cuda_host;
#if CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &rt.host_stack_bottom, &rt.host_stack_size);
#endif
  for (;;) {
    tsan_acquire(&rt.launch_sync);
    rt.call(rt.ctx);
    tsan_release(&rt.end_sync);
    f->state = Fiber::returned;
    yield(f);
  }
}

void __syncthreads() {
  using namespace cuda_host;
  barrier(Fiber::at_syncthreads, &rt.block->sync[0]);
}

void __syncwarp(unsigned mask) {
  using namespace cuda_host;
  if (mask != 0xffffffffu) fail("__syncwarp(%#x): only full warps are emulated", mask);
  barrier(Fiber::at_warp_barrier, &rt.block->sync[1 + warp_of(rt.current)]);
}

void* mock_shared(size_t bytes, size_t align, const char* file, int line) {
  using namespace cuda_host;
  Block& b = *rt.block;
  for (const auto& s : b.statics)
    if (s.line == line && strcmp(s.file, file) == 0) return s.p;
  // The first thread of the block to get here creates it; hidden from TSan like the
  // scheduler's work, so the other threads' accesses race with nothing but each other.
  tsan_ignore(true);
  align = std::max<size_t>(align, 16);
  void* p = ::operator new(bytes, std::align_val_t(align));
  memset(p, 0xff, bytes);
  b.statics.push_back({file, line, align, p});
  b.static_bytes += bytes;
  tsan_ignore(false);
  if (b.static_bytes + b.dynamic_bytes > kSharedLimit)
    fail("%zu bytes of static and %zu of dynamic shared memory exceed %zu", b.static_bytes,
         b.dynamic_bytes, kSharedLimit);
  return p;
}

void* mock_dynamic_shared(size_t align) {
  using namespace cuda_host;
  if (align > 16) fail("dynamic shared memory is 16-byte aligned, %zu asked", align);
  return rt.block->dynamic;
}
