// Tile plan of the tensor-core eval forward at stride S = 1 or 2 (fwd_mma_kernel, mma_fwd.cuh): geometry shared by the
// kernel, its launcher and the host checks. No ATen, no CUDA.
//
// The convolution of 16 output positions x 8 channels is a chain of m16n8k16 products: A row m = position m, its 16
// columns = input pixel under tap t0 at channels c0..c0+7, then under tap t1 (the taps in row-major order, paired
// 0-1, 2-3, ...; the last tap of an odd K*K alone, m16n8k8); B = the two taps' weights block-diagonally (w[t_j, c] at
// row 8 j + c, column c; zeros elsewhere); D = 16 positions x 8 channels in fp32. A tile is TH x TW outputs of one
// image, or of IMG images side by side (narrow outputs: IMG = 3 at TW 8, 2 at TW 16, so that the warp's lanes stage
// full rows of columns and the per-tile work is shared by more outputs); one warp per channel group (8 channels)
// stages the tile's input (S (TH - 1) + K rows; per image JS = S TW + K - 1 columns: the window's S (TW - 1) + K and,
// at S = 2, one zero column; 16 bytes per pixel) in its own shared-memory plane and walks the tile in m-tiles of
// 4 x 4 outputs. After the m-tiles the warp's plane holds the tile's outputs (slot r * OP + c; OP = 4 (mod 8): the D
// fragments' 4-byte stores are conflict-free), read back as 16-byte vectors of 8 channels and stored whole.
//
// Staged layout (16-byte slots): the input split into its S x S stride phases, slot(i, j) = (i % S) * RP +
// (i / S) * P + (j % S) * PH + j / S for input row i and column j of the tile (from S oh0 - pad, S ow0 - pad; at
// S = 1 simply i * P + j), so output (r, c) under tap (kh, kw) reads slot r * P + c + slot(kh, kw): a per-lane base
// plus a compile-time offset per tap. Lane l stages columns l + 32 u, u < NU (PH: the columns of a phase). P = 4
// (mod 8): the 8 rows of each 8x8 matrix ldmatrix reads (2 output rows x 4 columns) fall in 8 distinct 16-byte bank
// groups.
#pragma once

#include <stdint.h>

#include "common/macros.h"
#include "dwconv_bn_act/params.h"
#include "dwconv_bn_act/tile.h"

namespace mnet {

// Output rows of a tile at stride S and tile width TW (8, 16 or 28), and images side by side: tiles of 192, 256 and
// 224 (S = 1) or 112 (S = 2, as first designed; TH 8 there is untried) outputs.
MNET_HD constexpr int mma_tile_rows(int S, int TW) { return TW == 28 && S == 2 ? 4 : 8; }
MNET_HD constexpr int mma_tile_images(int TW) { return TW == 8 ? 3 : TW == 16 ? 2 : 1; }
// Staged columns per phase (slots): the IMG * JS columns of a staged row over the S column phases.
MNET_HD constexpr int mma_phase_cols(int S, int K, int TW) { return mma_tile_images(TW) * (S * TW + K - 1) / S; }
// The staged row pitch in 16-byte slots: the smallest >= S phases of ph slots that is 4 (mod 8).
MNET_HD constexpr int mma_pitch(int S, int ph) { return S * ph + ((4 - S * ph) % 8 + 8) % 8; }
// 16-byte slots of one warp's plane: S row phases of TH + (K - 1) / S rows.
MNET_HD constexpr int mma_plane_slots(int S, int K, int TW) {
  return S * (mma_tile_rows(S, TW) + (K - 1) / S) * mma_pitch(S, mma_phase_cols(S, K, TW));
}

template <int K, int S, int TW>
struct MmaGeom {
  static_assert(S == 1 || S == 2, "stride 1 or 2");
  static constexpr int TH = mma_tile_rows(S, TW), IMG = mma_tile_images(TW);
  static constexpr int HR = TH + (K - 1) / S;          // staged rows per row phase
  static constexpr int PH = mma_phase_cols(S, K, TW);  // slots per column phase in a staged row
  static constexpr int P = mma_pitch(S, PH);
  static constexpr int RP = HR * P;
  static constexpr int PLANE = mma_plane_slots(S, K, TW);
  static constexpr int IN_ROWS = S * (TH - 1) + K, IN_COLS = S * (TW - 1) + K;
  static constexpr int JS = S * TW + K - 1;  // staged columns per image (a multiple of S: every image's phases align)
  static constexpr int NU = (IMG * JS + 31) / 32;  // staged columns per lane
  static constexpr int OW = IMG * TW;               // output columns of the tile (images side by side)
  static constexpr int MR = TH / 4, MC = OW / 4;    // m-tiles per tile: MR x MC
  static constexpr int OP = OW + ((4 - OW) % 8 + 8) % 8;  // output row pitch in the plane (slots)
  static constexpr int NV = (TH * OW + 31) / 32;          // output vectors per lane and tile
  static_assert(TW % 4 == 0 && TH % 4 == 0, "m-tiles are 4 x 4 outputs");
  static_assert(JS % S == 0 && JS >= IN_COLS && S * HR >= IN_ROWS, "the phases hold the window");
  static_assert(P % 8 == 4 && P >= S * PH && S * PH == IMG * JS, "conflict-free ldmatrix rows");
  static_assert(OP % 8 == 4 && TH * OP <= PLANE, "the outputs fit the plane, conflict-free");
  MNET_HD static constexpr int slot(int i, int j) { return (i % S) * RP + (i / S) * P + (j % S) * PH + j / S; }
  MNET_HD static constexpr int tap(int t) { return slot(t / K, t % K); }
  // Output vector v (lane + 32 i: 16 bytes of 8 channels) of a tile, read back from the plane for the store: its
  // output row (TH: past the tile, never stored), image and column within the image.
  MNET_HD static constexpr int vec_row(int v) { return v < TH * OW ? v / OW : TH; }
  MNET_HD static constexpr int vec_image(int v) { return v % OW / TW; }
  MNET_HD static constexpr int vec_col(int v) { return v % OW % TW; }
  // Slot of m-tile mt's first position (row 0 of the tile, column 0 of its image): images JS / S slots apart.
  MNET_HD static constexpr int origin(int mt) {
    return (mt / MC) * 4 * P + (mt % MC) / (TW / 4) * (JS / S) + (mt % MC) % (TW / 4) * 4;
  }
};

// Position of row m (0..15) of an m-tile: output row (m / 8) * 2 + (m / 4) % 2, column m % 4. A lane's D rows
// g = lane / 4 and g + 8 are then output rows g / 4 and g / 4 + 2 of column g % 4.
MNET_HD constexpr int mma_pos_row(int m) { return (m >> 3) * 2 + ((m >> 2) & 1); }
MNET_HD constexpr int mma_pos_col(int m) { return m & 3; }

// The launch: grid (blocks, cblocks), GB warps per block (warp w: channel group blockIdx.y * GB + w), block b
// walks tiles [b * per_block, min((b + 1) * per_block, tiles)); tile = (image group * row_tiles + tile row) *
// col_tiles + tile column, image group g: images IMG g .. IMG g + IMG - 1 (< N).
struct MmaTilePlan {
  int TW = 8, TH = 8;
  int col_tiles = 0, row_tiles = 0;
  FastDiv col_div, row_div;  // by col_tiles, row_tiles (tile < 2^31: the launcher checks)
  int64_t tiles = 0;
  int GB = 1;       // channel groups (warps) per block: the largest of 4, 3, 2, 1 dividing C / 8
  int cblocks = 0;  // C / 8 / GB
  int per_block = 1;
  int64_t blocks = 0;
};

// The tensor-core forward's domain: bf16/fp16, channels_last, C % 8 == 0, stride 1 or 2, dilation 1, K 3/5/7 (the
// launcher also needs 16-byte aligned bases and an sm_80+ device; fwd.cu: use_mma_fwd).
MNET_HD bool mma_fwd_shape(const DwParams& p) {
  return p.dtype != DType::F32 && p.channels_last && p.C % 8 == 0 && (p.stride == 1 || p.stride == 2) &&
         p.dilation == 1 &&
         (p.k == 3 || p.k == 5 || p.k == 7);
}

MNET_HD constexpr int mma_smem_bytes(int S, int K, int TW, int GB) { return GB * mma_plane_slots(S, K, TW) * 16; }
// A block's shared memory at most: two blocks per SM on sm_80 (164 KB per SM, 1 KB reserved per block), so that
// the stride-2 K5 / K7 planes (24 KB per warp) run 3 warps per block rather than 4 warps in one block per SM
// (static report, sm_80: dw_c96_28x28 K5 and the 14x14 K7 layers, 1 -> 2 blocks); under sm_86 / sm_89's opt-in
// limit (99 KB); sm_90 (228 KB) holds two or more.
constexpr int kMmaSmemMax = 80 * 1024;
static_assert(mma_smem_bytes(2, 7, 8, 1) <= kMmaSmemMax && mma_smem_bytes(2, 7, 16, 1) <= kMmaSmemMax &&
                  mma_smem_bytes(2, 7, 28, 1) <= kMmaSmemMax && mma_smem_bytes(1, 7, 8, 1) <= kMmaSmemMax &&
                  mma_smem_bytes(1, 7, 16, 1) <= kMmaSmemMax && mma_smem_bytes(1, 7, 28, 1) <= kMmaSmemMax,
              "one warp's plane fits the shared memory of a block");

// Blocks of several tiles (the weights' fragments and the BN fold are built once per block) while at least
// kMmaMinBlocks blocks remain (about one wave: 132 SMs x 2-5 resident blocks of 1-4 warps). The CUDA emulator's build lowers it (tests/cuda_emu/build.py)
// so that its small shapes walk several tiles per block too.
#ifndef MNET_MMA_MIN_BLOCKS
#define MNET_MMA_MIN_BLOCKS 512
#endif
constexpr int64_t kMmaMinBlocks = MNET_MMA_MIN_BLOCKS;

inline MmaTilePlan mma_tile_plan(const DwParams& p) {
  MmaTilePlan t;
  t.TW = p.Wo <= 8 ? 8 : p.Wo <= 16 ? 16 : 28;
  t.TH = mma_tile_rows(p.stride, t.TW);
  t.col_tiles = (int)((p.Wo + t.TW - 1) / t.TW);
  t.row_tiles = (int)((p.Ho + t.TH - 1) / t.TH);
  const int64_t img = mma_tile_images(t.TW);
  t.tiles = (p.N + img - 1) / img * t.row_tiles * t.col_tiles;
  t.col_div = fast_div((uint32_t)t.col_tiles);
  t.row_div = fast_div((uint32_t)t.row_tiles);
  const int64_t groups = p.C / 8;
  // Warps per block: the most of 4, 3, 2, 1 dividing the groups whose planes fit kMmaSmemMax.
  t.GB = 1;
  for (int gb = 4; gb > 1 && t.GB == 1; --gb)
    if (groups % gb == 0 && mma_smem_bytes(p.stride, p.k, t.TW, gb) <= kMmaSmemMax) t.GB = gb;
  t.cblocks = (int)(groups / t.GB);
  for (int per = 8; per >= 1; per >>= 1) {
    t.per_block = per;
    t.blocks = (t.tiles + per - 1) / per;
    if (t.blocks * t.cblocks >= kMmaMinBlocks) break;
  }
  return t;
}


}  // namespace mnet
