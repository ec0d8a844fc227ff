// The static kernel report's activation probes (bench/kernel_report.py: act_costs): the CUDA kernels pick their
// activation with a runtime switch, and the report's path count takes its cheapest case (none); these kernels
// measure what each case adds, on the code the kernels inline, 8 outputs per thread:
//   act_cost<A>       act_fwd<A> (csrc/common/activations.h) on 8 fp32 values: the kernels that round after it;
//   act_pair_cost<A>  act_pair<A, bf16> (csrc/common/device.cuh) on 4 pairs: the tensor-core forward's epilogue
//                     (relu and relu6 on the rounded pairs).
// A probe's SASS length minus its <None>'s, over 8, is the activation's instructions per output element.
// Compiled by the report only (not part of the extension).
#include "common/activations.h"
#include "common/device.cuh"

// x, y: [8 * blockDim.x] fp32, 16-byte aligned; thread i reads and writes elements 8 i ... 8 i + 7.
template <mnet::Act A>
__global__ void act_cost(const float4* __restrict__ x, float4* __restrict__ y) {
  const int i = (int)threadIdx.x;
  float4 v[2] = {x[2 * i], x[2 * i + 1]};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    v[j].x = mnet::act_fwd<A>(v[j].x);
    v[j].y = mnet::act_fwd<A>(v[j].y);
    v[j].z = mnet::act_fwd<A>(v[j].z);
    v[j].w = mnet::act_fwd<A>(v[j].w);
  }
  y[2 * i] = v[0];
  y[2 * i + 1] = v[1];
}

// x: [8 * blockDim.x] fp32, y: [blockDim.x] 16-byte vectors of 8 bf16; thread i reads 8 i ... 8 i + 7, writes y[i].
template <mnet::Act A>
__global__ void act_pair_cost(const float4* __restrict__ x, uint4* __restrict__ y) {
  const int i = (int)threadIdx.x;
  const float4 a = x[2 * i], b = x[2 * i + 1];
  using mnet::dev::act_pair;
  y[i] = make_uint4(act_pair<A, __nv_bfloat16>(a.x, a.y), act_pair<A, __nv_bfloat16>(a.z, a.w),
                    act_pair<A, __nv_bfloat16>(b.x, b.y), act_pair<A, __nv_bfloat16>(b.z, b.w));
}

#define MNET_ACT_COST(A)                                                          \
  template __global__ void act_cost<mnet::Act::A>(const float4*, float4*);        \
  template __global__ void act_pair_cost<mnet::Act::A>(const float4*, uint4*);
MNET_ACT_COST(None)
MNET_ACT_COST(Relu)
MNET_ACT_COST(Relu6)
MNET_ACT_COST(Hardswish)
MNET_ACT_COST(Silu)
MNET_ACT_COST(Hardsigmoid)
MNET_ACT_COST(Sigmoid)
