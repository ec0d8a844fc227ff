// The static kernel report's activation probe (bench/kernel_report.py: act_costs): the CUDA kernels pick their
// activation with a runtime switch, and the report's path count takes its cheapest case (none); this file measures
// what each case adds. act_cost<A> applies act_fwd<A> (csrc/common/activations.h, the code the kernels inline) to
// 8 fp32 values per thread; its SASS length minus act_cost<None>'s, over 8, is the activation's instructions per
// output element. Compiled by the report only (not part of the extension).
#include "common/activations.h"

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

#define MNET_ACT_COST(A) template __global__ void act_cost<mnet::Act::A>(const float4*, float4*);
MNET_ACT_COST(None)
MNET_ACT_COST(Relu)
MNET_ACT_COST(Relu6)
MNET_ACT_COST(Hardswish)
MNET_ACT_COST(Silu)
MNET_ACT_COST(Hardsigmoid)
MNET_ACT_COST(Sigmoid)
