// The emulator's runtime (emu.h): fiber scheduler, barrier checks, shared-memory fill and guard, checked loads, and
// the few CUDA runtime calls the launchers make.
#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "emu.h"
#include "emu_runtime.h"

extern unsigned char __start_mnet_emu_smem[], __stop_mnet_emu_smem[];  // the static __shared__ arrays

namespace emu {
uint3 g_tid, g_bid;
dim3 g_bdim, g_gdim;
unsigned char* g_dynamic_smem = nullptr;
int g_order = 0;
std::vector<std::string> g_errors;
std::vector<Buffer> g_buffers;

namespace {
constexpr size_t kStack = 256 * 1024, kGuard = 4096;
constexpr size_t kSmemMax = 227 * 1024;  // sm_90's opt-in maximum of dynamic shared memory per block
enum State { kReady, kAtBarrier, kExited };
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state;
  const char* file;
  int line;
};
std::vector<Fiber> fibers;
ucontext_t scheduler;
int current = -1;
void (*g_body)(void*);
void* g_ctx;
std::map<const void*, int> g_allowed_smem;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize) per kernel
// The block's static shared arrays (MNET_SHARED_ARRAY): an arena of 48 KB (the static limit), NaN-filled before each
// block, and the offset of each declaration (file, line) the block has run.
constexpr size_t kStaticSmem = 48 * 1024;
alignas(64) unsigned char g_arena[kStaticSmem];
size_t g_arena_used = 0;
std::map<std::pair<std::string, int>, size_t> g_arrays;

void error(std::string msg) {
  if (g_errors.size() < 20) g_errors.push_back(std::move(msg));
}

void fiber_main() {
  g_body(g_ctx);
  fibers[current].state = kExited;
  swapcontext(&fibers[current].ctx, &scheduler);
}

// The order the threads of a block run in during barrier epoch `epoch`: forward, reverse, or alternating.
int thread_at(int k, int n, int epoch) {
  const bool reverse = g_order == 1 || (g_order == 2 && (epoch & 1));
  return reverse ? n - 1 - k : k;
}

void run_block(int n) {
  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack.reset(new char[kStack]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = kReady;
  }
  for (int epoch = 0;; ++epoch) {
    for (int k = 0; k < n; ++k) {
      const int t = thread_at(k, n, epoch);
      if (fibers[t].state != kReady) continue;
      current = t;
      g_tid = make_uint3((unsigned)t, 0, 0);
      swapcontext(&scheduler, &fibers[t].ctx);
    }
    int waiting = -1, exited = 0;
    for (int t = 0; t < n; ++t) {
      if (fibers[t].state == kExited) {
        ++exited;
        continue;
      }
      if (waiting < 0) {
        waiting = t;
      } else if (fibers[t].line != fibers[waiting].line || std::string(fibers[t].file) != fibers[waiting].file) {
        error("block (" + std::to_string(g_bid.x) + "," + std::to_string(g_bid.y) + "): thread " +
              std::to_string(waiting) + " waits at the barrier at " + fibers[waiting].file + ":" +
              std::to_string(fibers[waiting].line) + ", thread " + std::to_string(t) + " at " + fibers[t].file +
              ":" + std::to_string(fibers[t].line));
        for (Fiber& f : fibers) f.state = kExited;  // abandon the block: it cannot be continued consistently
        return;
      }
    }
    if (waiting < 0) return;
    if (exited)
      error("block (" + std::to_string(g_bid.x) + "," + std::to_string(g_bid.y) + "): the barrier at " +
            fibers[waiting].file + ":" + std::to_string(fibers[waiting].line) + " is not reached by " +
            std::to_string(exited) + " of " + std::to_string(n) + " threads (they exited)");
    for (int t = 0; t < n; ++t)
      if (fibers[t].state == kAtBarrier) fibers[t].state = kReady;
  }
}
}  // namespace

void syncthreads(const char* file, int line) {
  Fiber& f = fibers[current];
  f.state = kAtBarrier;
  f.file = file;
  f.line = line;
  swapcontext(&f.ctx, &scheduler);
}

void* shared_array(size_t bytes, size_t align, const char* file, int line) {
  const auto key = std::make_pair(std::string(file), line);
  auto it = g_arrays.find(key);
  if (it == g_arrays.end()) {
    const size_t at = (g_arena_used + align - 1) / align * align;
    if (at + bytes > kStaticSmem) {
      std::fprintf(stderr, "emulator: static shared arrays over 48 KB at %s:%d\n", file, line);
      std::exit(1);
    }
    g_arena_used = at + bytes;
    it = g_arrays.emplace(key, at).first;
  }
  return g_arena + it->second;
}

void check_load(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  bool in = false;
  for (const Buffer& b : g_buffers)
    in = in || (a >= reinterpret_cast<uintptr_t>(b.data) && a + bytes <= reinterpret_cast<uintptr_t>(b.data) + b.bytes);
  if (!in) error("__ldg of " + std::to_string(bytes) + " bytes outside every buffer");
  if (a % bytes) error("__ldg of " + std::to_string(bytes) + " bytes at a misaligned address");
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx) {
  const unsigned n = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n == 0 || n > 1024)
    error("launch with block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
          std::to_string(block.z) + "): the kernels index threads along x only, at most 1024");
  if (grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z != 1)
    error("launch with grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
          std::to_string(grid.z) + ")");
  const auto allowed = g_allowed_smem.find(kernel);
  const size_t limit = allowed == g_allowed_smem.end() ? 48 * 1024 : (size_t)allowed->second;
  if (smem > limit || smem > kSmemMax)
    error("launch with " + std::to_string(smem) + " bytes of dynamic shared memory, the kernel allows " +
          std::to_string(limit));
  if (!g_errors.empty()) return;
  // The launch on stdout (the test checks which kernel a shape runs): grid, block, smem, the kernel's demangled name.
  Dl_info info{};
  std::string name = "?";
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    name = status == 0 ? d : info.dli_sname;
    std::free(d);
  }
  std::printf("launch grid %u %u block %u smem %zu kernel %s\n", grid.x, grid.y, n, smem, name.c_str());
  if (fibers.size() < n) fibers.resize(n);
  std::vector<unsigned char> buffer(smem + kGuard + 16);
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buffer.data()) + 15) & ~uintptr_t(15));
  g_dynamic_smem = base;
  g_gdim = grid;
  g_bdim = block;
  g_body = body;
  g_ctx = ctx;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_bid = make_uint3(bx, by, 0);
      std::memset(base, 0xff, smem + kGuard);  // NaN in every float: a value no thread staged shows
      std::memset(__start_mnet_emu_smem, 0xff, __stop_mnet_emu_smem - __start_mnet_emu_smem);
      std::memset(g_arena, 0xff, sizeof(g_arena));
      g_arena_used = 0;
      g_arrays.clear();
      run_block((int)n);
      if (smem + g_arena_used > kSmemMax)
        error("block (" + std::to_string(bx) + "," + std::to_string(by) + "): " + std::to_string(smem) +
              " bytes of dynamic and " + std::to_string(g_arena_used) + " of static shared memory, over sm_90's " +
              std::to_string(kSmemMax));
      for (size_t i = smem; i < smem + kGuard; ++i)
        if (base[i] != 0xff) {
          error("block (" + std::to_string(bx) + "," + std::to_string(by) + ") wrote shared memory at byte " +
                std::to_string(i) + ", past the launch's " + std::to_string(smem) + " bytes");
          break;
        }
      if (!g_errors.empty()) return;
    }
}
}  // namespace emu

// ---- the CUDA runtime calls of the launchers (cuda_check.cuh, kernels.cuh: allow_smem) ----------------------------
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > (int)emu::kSmemMax) return cudaErrorInvalidValue;
    emu::g_allowed_smem[func] = value;
  }
  return cudaSuccess;
}
