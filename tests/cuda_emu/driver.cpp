// The emulator's command line: runs one dwconv_bn_act primitive through the real CUDA launchers (csrc/dwconv_bn_act
// *.cu, launches rewritten by build.py) on buffers that tests/test_cuda_emulator.py wrote, and writes the outputs.
//
//   emu --selftest NAME   runs one of selftest.cpp's defective kernels
//   emu DIR   DIR/meta.txt: "prim N C H W k stride dilation act dtype channels_last order"
//             prim: fwd | stats | bwd_reduce | bwd_apply; dtype: 0 fp32, 1 fp16, 2 bf16 (DType); order: emu.h
//             inputs DIR/<name>.bin (x, weight, mean, invstd, gamma, beta, grad_y, mean_g, mean_g_xhat: raw, 4-D
//             tensors in their memory format), outputs DIR/out0.bin, DIR/out1.bin.
// Every device buffer sits between guard areas of 0xff bytes (NaN in every dtype: a read there shows in the outputs;
// a write there is an error), is 256-byte aligned as cudaMalloc's, and outputs and scratch start as 0xff too, so an
// output no thread writes reads NaN. Exit status 0 on success; errors (emulator and guards) on stderr, status 1.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dwconv_bn_act/launch.h"
#include "emu_runtime.h"

namespace {
constexpr size_t kGuardBytes = 1024;

struct DeviceBuffer {
  std::vector<unsigned char> raw;
  unsigned char* data = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : raw(n + 2 * kGuardBytes + 256, 0xff), bytes(n) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw.data()) + kGuardBytes;
    data = reinterpret_cast<unsigned char*>((a + 255) & ~uintptr_t(255));
    emu::g_buffers.push_back({data, bytes});
  }
  bool guards_intact() const {
    for (const unsigned char* q = raw.data(); q < data; ++q)
      if (*q != 0xff) return false;
    for (const unsigned char* q = data + bytes; q < raw.data() + raw.size(); ++q)
      if (*q != 0xff) return false;
    return true;
  }
};

std::vector<std::unique_ptr<DeviceBuffer>> buffers;
std::string dir;

DeviceBuffer& alloc(size_t bytes) {
  buffers.emplace_back(new DeviceBuffer(bytes));
  return *buffers.back();
}

void* input(const std::string& name, size_t bytes) {
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  DeviceBuffer& b = alloc(bytes);
  if (!f.read(reinterpret_cast<char*>(b.data), (std::streamsize)bytes))
    throw std::runtime_error("cannot read " + std::to_string(bytes) + " bytes of " + name);
  return b.data;
}

void output(const std::string& name, const void* data, size_t bytes) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(data), (std::streamsize)bytes);
}

mnet::Strides4 strides(bool cl, int64_t C, int64_t H, int64_t W) {
  return cl ? mnet::Strides4{H * W * C, 1, W * C, C} : mnet::Strides4{C * H * W, H * W, W, 1};
}

mnet::Act parse_act(const std::string& s) {
  const char* names[] = {"none", "relu", "relu6", "hardswish", "silu"};
  for (int i = 0; i < 5; ++i)
    if (s == names[i]) return (mnet::Act)i;
  throw std::runtime_error("unknown activation " + s);
}
}  // namespace

int run_selftest(const std::string& name);  // selftest.cpp

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--selftest") {
    run_selftest(argv[2]);
    for (const std::string& e : emu::g_errors) std::cerr << "emulator: " << e << "\n";
    return emu::g_errors.empty() ? 0 : 1;
  }
  if (argc != 2) {
    std::cerr << "usage: emu DIR | emu --selftest NAME\n";
    return 2;
  }
  dir = argv[1];
  std::ifstream meta(dir + "/meta.txt");
  std::string prim, act;
  int dtype = 0, cl = 0;
  mnet::DwParams p;
  meta >> prim >> p.N >> p.C >> p.H >> p.W >> p.k >> p.stride >> p.dilation >> act >> dtype >> cl >> emu::g_order;
  if (!meta) {
    std::cerr << "bad meta.txt\n";
    return 2;
  }
  try {
    p.pad = (p.k - 1) / 2 * p.dilation;
    p.Ho = (p.H + 2 * p.pad - p.dilation * (p.k - 1) - 1) / p.stride + 1;
    p.Wo = (p.W + 2 * p.pad - p.dilation * (p.k - 1) - 1) / p.stride + 1;
    p.act = parse_act(act);
    p.dtype = (mnet::DType)dtype;
    p.channels_last = cl != 0;
    const size_t es = dtype == 0 ? 4 : 2, C = (size_t)p.C;
    const size_t xbytes = (size_t)(p.N * p.C * p.H * p.W) * es, ybytes = (size_t)(p.N * p.C * p.Ho * p.Wo) * es;
    p.xs = strides(p.channels_last, p.C, p.H, p.W);
    p.x = input("x", xbytes);
    p.weight = input("weight", C * p.k * p.k * es);
    const bool bn = prim != "stats", bwd = prim == "bwd_reduce" || prim == "bwd_apply";
    if (bn) {
      p.mean = static_cast<const float*>(input("mean", C * 4));
      p.invstd = static_cast<const float*>(input("invstd", C * 4));
      p.gamma = static_cast<const float*>(input("gamma", C * 4));
      p.beta = static_cast<const float*>(input("beta", C * 4));
    }
    if (bwd) {
      p.grad_y = input("grad_y", ybytes);
      p.gs = strides(p.channels_last, p.C, p.Ho, p.Wo);
    }
    DeviceBuffer *o0 = nullptr, *o1 = nullptr;
    int64_t work = 0;
    if (prim == "fwd") {
      o0 = &alloc(ybytes);
      p.y = o0->data;
      p.ys = strides(p.channels_last, p.C, p.Ho, p.Wo);
    } else if (prim == "bwd_apply") {
      p.mean_g = static_cast<const float*>(input("mean_g", C * 4));
      p.mean_g_xhat = static_cast<const float*>(input("mean_g_xhat", C * 4));
      o0 = &alloc(xbytes);
      o1 = &alloc(C * p.k * p.k * es);
      p.y = o0->data;
      p.ys = p.xs;
      p.dweight = o1->data;
      work = mnet::dw_bwd_apply_workspace(p);
    } else {
      o0 = &alloc(C * 4);
      o1 = &alloc(C * 4);
      p.out0 = reinterpret_cast<float*>(o0->data);
      p.out1 = reinterpret_cast<float*>(o1->data);
      work = prim == "stats" ? mnet::dw_stats_workspace(p) : mnet::dw_bwd_reduce_workspace(p);
    }
    DeviceBuffer& w = alloc((size_t)(work > 1 ? work : 1) * 4);  // op.cpp: scratch of at least one float
    p.work = reinterpret_cast<float*>(w.data);
    if (prim == "fwd") mnet::dw_fwd_cuda(p, nullptr);
    else if (prim == "stats") mnet::dw_stats_cuda(p, nullptr);
    else if (prim == "bwd_reduce") mnet::dw_bwd_reduce_cuda(p, nullptr);
    else if (prim == "bwd_apply") mnet::dw_bwd_apply_cuda(p, nullptr);
    else throw std::runtime_error("unknown primitive " + prim);
    for (size_t i = 0; i < buffers.size(); ++i)
      if (!buffers[i]->guards_intact()) emu::g_errors.push_back("a write past device buffer " + std::to_string(i));
    if (o0) output("out0", o0->data, o0->bytes);
    if (o1) output("out1", o1->data, o1->bytes);
  } catch (const std::exception& e) {
    emu::g_errors.push_back(std::string("exception: ") + e.what());
  }
  for (const std::string& e : emu::g_errors) std::cerr << "emulator: " << e << "\n";
  return emu::g_errors.empty() ? 0 : 1;
}
