// The emulator's runtime (emu.h): fiber scheduler, barrier checks, shared-memory fill and guard, checked loads, and
// the few CUDA runtime calls the launchers make.
#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <array>
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
enum State { kReady, kAtBarrier, kAtWarp, kExited };
// A lane's operands of a warp collective (emu.h), and where its results go.
struct WarpCall {
  enum Kind { kLdmatrix, kMma, kSync } kind;
  int n = 0;          // ldmatrix: matrices; mma: K (8 or 16)
  uint32_t row = 0;   // ldmatrix: this lane's row address
  uint32_t* r = nullptr;
  bool bf16 = false;
  float* d = nullptr;
  const uint32_t* a = nullptr;
  const uint32_t* b = nullptr;
};
struct Copy {
  uint32_t dst;
  std::array<unsigned char, 16> bytes;
};
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state;
  const char* file;
  int line;
  WarpCall* call;
  std::vector<Copy> pending;  // cp.async copies not yet waited for
};
std::vector<Fiber> fibers;
ucontext_t scheduler;
int current = -1;
void (*g_body)(void*);
void* g_ctx;
std::map<const void*, int> g_allowed_smem;
size_t g_smem_bytes = 0;  // the launch's dynamic shared memory
// A planted layout defect (MNET_EMU_DEFECT, for the fragment self-test's own test): "ldmatrix" hands lanes the
// elements of the next row pair, "mma" swaps the A registers of rows g + 8 and columns + 8.
const std::string g_defect = std::getenv("MNET_EMU_DEFECT") ? std::getenv("MNET_EMU_DEFECT") : "";  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize) per kernel
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
  if (!fibers[current].pending.empty())
    error("thread " + std::to_string(current) + " exited with cp.async copies it never waited for");
  fibers[current].state = kExited;
  swapcontext(&fibers[current].ctx, &scheduler);
}

// The order the threads of a block run in during barrier epoch `epoch`: forward, reverse, or alternating.
int thread_at(int k, int n, int epoch) {
  const bool reverse = g_order == 1 || (g_order == 2 && (epoch & 1));
  return reverse ? n - 1 - k : k;
}

float half_bits(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

const unsigned char* smem_row(uint32_t row) {
  if (row % 16 || (size_t)row + 16 > g_smem_bytes) {
    error("ldmatrix row address " + std::to_string(row) + " misaligned or outside the " +
          std::to_string(g_smem_bytes) + " bytes of dynamic shared memory");
    return nullptr;
  }
  return g_dynamic_smem + row;
}

// The collective of the warp whose lanes are fibers[t0 .. t0 + 31], every one at the same call. Layouts: PTX ISA,
// "Warp-level matrix load instruction: ldmatrix" and "Matrix fragments for mma.m16n8k16 / mma.m16n8k8" (floating
// point): g = lane / 4, t = lane % 4.
void warp_collective(int t0) {
  WarpCall* c[32];
  for (int l = 0; l < 32; ++l) c[l] = fibers[t0 + l].call;
  if (c[0]->kind == WarpCall::kSync) return;
  if (c[0]->kind == WarpCall::kLdmatrix) {
    // Matrix i: rows from the addresses of lanes 8i .. 8i + 7; lane l gets row l / 4, elements 2 (l % 4), +1.
    for (int i = 0; i < c[0]->n; ++i)
      for (int l = 0; l < 32; ++l) {
        const int src = 8 * i + (g_defect == "ldmatrix" ? ((l >> 2) + 1) % 8 : l >> 2);
        const unsigned char* row = smem_row(c[src]->row);
        if (!row) return;
        std::memcpy(&c[l]->r[i], row + 4 * (l & 3), 4);
      }
    return;
  }
  const int kd = c[0]->n;
  const bool bf16 = c[0]->bf16;
  double A[16][16] = {}, B[16][8] = {}, C[16][8];
  for (int l = 0; l < 32; ++l) {
    if (c[l]->bf16 != bf16) error("mma: lanes disagree on the operand type");
    const int g = l >> 2, t = l & 3;
    const auto put = [&](double (&m)[16][16], int row, int col, uint32_t v) {
      m[row][col] = half_bits((uint16_t)(v & 0xffffu), bf16);
      m[row][col + 1] = half_bits((uint16_t)(v >> 16), bf16);
    };
    const bool swap = g_defect == "mma";
    put(A, g, 2 * t, c[l]->a[0]);
    put(A, g + 8, 2 * t, c[l]->a[swap && kd == 16 ? 2 : 1]);
    if (kd == 16) {
      put(A, g, 2 * t + 8, c[l]->a[swap ? 1 : 2]);
      put(A, g + 8, 2 * t + 8, c[l]->a[3]);
    }
    for (int j = 0; j < kd / 8; ++j) {
      B[2 * t + 8 * j][g] = half_bits((uint16_t)(c[l]->b[j] & 0xffffu), bf16);
      B[2 * t + 8 * j + 1][g] = half_bits((uint16_t)(c[l]->b[j] >> 16), bf16);
    }
    for (int j = 0; j < 4; ++j) C[g + 8 * (j >> 1)][2 * t + (j & 1)] = c[l]->d[j];
  }
  // fp32 accumulation of exact products: the sum in double, rounded once (the hardware's order is unspecified).
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j) {
      const int row = g + 8 * (j >> 1), col = 2 * t + (j & 1);
      double acc = C[row][col];
      for (int k = 0; k < kd; ++k) acc += A[row][k] * B[k][col];
      c[l]->d[j] = (float)acc;
    }
  }
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
    f.pending.clear();
  }
  for (int epoch = 0;; ++epoch) {
    for (int k = 0; k < n; ++k) {
      const int t = thread_at(k, n, epoch);
      if (fibers[t].state != kReady) continue;
      current = t;
      g_tid = make_uint3((unsigned)t, 0, 0);
      swapcontext(&scheduler, &fibers[t].ctx);
    }
    bool collectives = false;
    for (int w = 0; w * 32 < n; ++w) {
      const int t0 = w * 32;
      int at = -1;
      for (int t = t0; t < t0 + 32 && t < n; ++t)
        if (fibers[t].state == kAtWarp) at = t;
      if (at < 0) continue;
      for (int t = t0; t < t0 + 32; ++t) {
        const Fiber* f = t < n ? &fibers[t] : nullptr;
        if (!f || f->state != kAtWarp || f->line != fibers[at].line || std::string(f->file) != fibers[at].file ||
            f->call->kind != fibers[at].call->kind || f->call->n != fibers[at].call->n) {
          error("block (" + std::to_string(g_bid.x) + "," + std::to_string(g_bid.y) + "): warp " + std::to_string(w) +
                ": lane " + std::to_string(at - t0) + " is at the warp collective at " + fibers[at].file + ":" +
                std::to_string(fibers[at].line) + ", lane " + std::to_string(t - t0) +
                (!f ? " does not exist" : f->state == kExited ? " exited" : " is elsewhere") +
                " (every lane of the warp must reach it)");
          for (Fiber& x : fibers) x.state = kExited;
          return;
        }
      }
      warp_collective(t0);
      for (int t = t0; t < t0 + 32; ++t) fibers[t].state = kReady;
      collectives = true;
    }
    if (collectives) continue;
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

namespace {
void warp_call(WarpCall& call, const char* file, int line) {
  Fiber& f = fibers[current];
  f.state = kAtWarp;
  f.file = file;
  f.line = line;
  f.call = &call;
  swapcontext(&f.ctx, &scheduler);
}
}  // namespace

uint32_t smem_offset(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < g_dynamic_smem || q > g_dynamic_smem + g_smem_bytes) error("a shared-memory address outside the block's buffer");
  return (uint32_t)(q - g_dynamic_smem);
}

void ldmatrix(int n, uint32_t row, uint32_t* r, const char* file, int line) {
  WarpCall call{WarpCall::kLdmatrix};
  call.n = n;
  call.row = row;
  call.r = r;
  warp_call(call, file, line);
}

void mma(bool bf16, int kd, float* d, const uint32_t* a, const uint32_t* b, const char* file, int line) {
  WarpCall call{WarpCall::kMma};
  call.n = kd;
  call.bf16 = bf16;
  call.d = d;
  call.a = a;
  call.b = b;
  warp_call(call, file, line);
}

void warp_sync(const char* file, int line) {
  WarpCall call{WarpCall::kSync};
  warp_call(call, file, line);
}

void cp_async_16(uint32_t dst, const void* src, bool in) {
  Copy c{dst, {}};
  if (dst % 16 || (size_t)dst + 16 > g_smem_bytes) {
    error("cp.async to shared byte " + std::to_string(dst) + ": misaligned or past the launch's " +
          std::to_string(g_smem_bytes) + " bytes");
    return;
  }
  if (in) {
    check_load(src, 16);
    std::memcpy(c.bytes.data(), src, 16);
  }
  fibers[current].pending.push_back(c);
}

void cp_async_wait_all() {
  for (const Copy& c : fibers[current].pending) std::memcpy(g_dynamic_smem + c.dst, c.bytes.data(), 16);
  fibers[current].pending.clear();
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
  g_smem_bytes = smem;
  g_gdim = grid;
  g_bdim = block;
  g_body = body;
  g_ctx = ctx;
  // Blocks in launch order at thread order 0, else in reverse: a block that writes outputs another block owns (a
  // race on a GPU, where block order is unspecified) is caught whichever way its stale write lands.
  const size_t blocks = (size_t)grid.x * grid.y;
  for (size_t i = 0; i < blocks; ++i) {
    const size_t b = g_order == 0 ? i : blocks - 1 - i;
    const unsigned bx = (unsigned)(b % grid.x), by = (unsigned)(b / grid.x);
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
    for (size_t j = smem; j < smem + kGuard; ++j)
      if (base[j] != 0xff) {
        error("block (" + std::to_string(bx) + "," + std::to_string(by) + ") wrote shared memory at byte " +
              std::to_string(j) + ", past the launch's " + std::to_string(smem) + " bytes");
        break;
      }
    if (!g_errors.empty()) return;
  }
}
}  // namespace emu

// ---- the CUDA runtime calls of the launchers (cuda_check.cuh, kernels.cuh: allow_smem) ----------------------------
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
// An sm_90 device (fwd.cu: use_mma_fwd asks for the compute capability).
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 9 : attr == cudaDevAttrComputeCapabilityMinor ? 0 : -1;
  return attr == cudaDevAttrComputeCapabilityMajor || attr == cudaDevAttrComputeCapabilityMinor
             ? cudaSuccess
             : cudaErrorInvalidValue;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > (int)emu::kSmemMax) return cudaErrorInvalidValue;
    emu::g_allowed_smem[func] = value;
  }
  return cudaSuccess;
}
