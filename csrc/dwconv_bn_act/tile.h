// Tile plan of the dwconv_bn_act kernels: which outputs one thread computes, which input columns it reads, how
// channels map to lanes and how positions split into reduction chunks. Host and device (no ATen), so the host
// twin's tests run the same plan the CUDA kernels launch with (tests/test_cuda_backend.py: tile plan).
//
// The unit of work is a *strip*: TW outputs of one output row (n, oh) for one channel vector of V channels.
// Output m of a strip sits at column ow0 + m * out_step and reads, at tap (kh, kw), input row
// oh * stride - pad + kh * dilation and input column iw0 + (J * m + kw) * in_step. With J a compile-time constant
// the input column index j = J * m + kw is known at compile time, so a thread keeps its row of inputs in
// registers and each loaded vector feeds every output that reads it (a sliding window along W):
//
//   stride dilation | J in_step out_step | input columns per strip
//      1      1     | 1    1       1     | TW + K - 1
//      1      2     | 1    2       2     | TW + K - 1   (two interleaved phases of columns, each a plain conv)
//      2      1     | 2    1       1     | 2 (TW - 1) + K
//      2      2     | 1    2       1     | TW + K - 1
#pragma once

#include <stdint.h>

#include "common/macros.h"
#include "dwconv_bn_act/params.h"

namespace mnet {

// Unsigned division by a launch constant d >= 1 as a multiply-high, an add and a shift (the device's 32-bit
// division is ~20 instructions): for n < 2^31, n / d = (umulhi(n, mul) + n) >> shift with shift = ceil(log2 d) and
// mul = floor(2^32 (2^shift - d) / d) + 1 (the round-up method; umulhi(n, mul) <= n keeps the sum below 2^32).
// The host twin's tile-plan check runs the same arithmetic on every strip it checks.
struct FastDiv {
  uint32_t d = 1, mul = 1, shift = 0;
};

MNET_HD FastDiv fast_div(uint32_t d) {
  FastDiv f;
  f.d = d;
  f.shift = 0;
  while (f.shift < 31 && (uint32_t(1) << f.shift) < d) ++f.shift;
  f.mul = (uint32_t)((((uint64_t)1 << 32) * (((uint64_t)1 << f.shift) - d)) / d + 1);
  return f;
}

MNET_HD uint32_t div_of(const FastDiv& f, uint32_t n) {
#ifdef __CUDA_ARCH__
  const uint32_t hi = __umulhi(n, f.mul);
#else
  const uint32_t hi = (uint32_t)(((uint64_t)n * f.mul) >> 32);
#endif
  return (hi + n) >> f.shift;
}

MNET_HD int strip_j(int stride, int dilation) { return stride == 2 && dilation == 1 ? 2 : 1; }

// Input columns a strip of TW outputs reads (the register window).
MNET_HD constexpr int strip_cols(int J, int TW, int K) { return J * (TW - 1) + K; }

struct StripGeom {
  int in_step;        // input column step between window entries
  int out_step;       // output column step between the strip's outputs
  int64_t per_phase;  // strips per phase of a row
  int64_t per_row;    // strips per output row (= per_phase * out_step phases)
};

MNET_HD StripGeom strip_geom(int64_t Wo, int stride, int dilation, int TW) {
  StripGeom g;
  g.in_step = strip_j(stride, dilation) == 2 ? 1 : dilation;
  g.out_step = stride == 1 ? dilation : 1;
  const int64_t phase_len = (Wo + g.out_step - 1) / g.out_step;  // outputs of phase 0 (the longer one)
  g.per_phase = (phase_len + TW - 1) / TW;
  g.per_row = g.per_phase * g.out_step;
  return g;
}

// First output column of strip `s` (0 <= s < per_row) of a row; its outputs are ow0 + m * out_step while < Wo.
MNET_HD int64_t strip_ow0(const StripGeom& g, int64_t s, int TW) {
  const int64_t phase = s / g.per_phase, q = s - phase * g.per_phase;
  return phase + q * TW * g.out_step;
}

// Outputs of the strip at ow0 inside its row (ow0 + m * out_step < Wo, at most TW). 0 for the last strip of the
// shorter phase when out_step = 2 and Wo = 2 q TW + 1 (per_phase counts the longer phase's strips): the strip
// kernels must skip it (the stats' Chan step would divide by its zero count).
MNET_HD int strip_count(const StripGeom& g, int Wo, int ow0, int TW) {
  const int rest = Wo - ow0, left = g.out_step == 2 ? (rest + 1) >> 1 : rest;
  return left < TW ? left : TW;
}

// Window columns inside [0, W) of a strip whose window starts at input column iw0: bit j for column
// iw0 + j * in_step, in_step 1 or 2, ncol <= 31 columns. The same for every kernel row, so a row tests one bit per
// column (zero padding where clear).
MNET_HD uint32_t column_mask(int iw0, int in_step, int W, int ncol) {
  const int sh = in_step == 2 ? 1 : 0;
  const int lo = iw0 >= 0 ? 0 : (-iw0 + in_step - 1) >> sh;          // first j with iw0 + j * in_step >= 0
  const int hi = W - iw0 <= 0 ? 0 : (W - iw0 + in_step - 1) >> sh;  // first j with iw0 + j * in_step >= W
  const uint32_t below_hi = hi >= ncol ? (1u << ncol) - 1u : (1u << hi) - 1u;
  return lo >= ncol ? 0u : below_hi & ~((1u << lo) - 1u);
}

// First input column of the strip's window.
MNET_HD int64_t strip_iw0(int64_t ow0, int stride, int pad) { return ow0 * stride - pad; }

// ---- channels -> lanes ----------------------------------------------------------------------------------
// A block is `lanes` channel vectors (consecutive threads, so a warp reads consecutive 16-byte vectors of one
// pixel) times `walkers` strips. In channels_last, lanes = the channel vectors divided as evenly as possible into
// groups of at most 32 (C = 960 in vectors of 8: 4 groups of 30 lanes, none idle); in NCHW one channel per group
// and all threads walk strips (consecutive strips are consecutive memory).
struct LaneGeom {
  int64_t vectors;  // channel vectors per pixel: ceil(C / V)
  int64_t groups;   // channel groups (grid.y)
  int lanes;        // channel vectors per block
  int walkers;      // strips per block and step
};

MNET_HD LaneGeom lane_geom(int64_t C, int V, bool channels_last, int threads) {
  LaneGeom g;
  g.vectors = (C + V - 1) / V;
  if (!channels_last) {
    g.groups = C;
    g.lanes = 1;
  } else {
    g.groups = (g.vectors + 31) / 32;
    g.lanes = (int)((g.vectors + g.groups - 1) / g.groups);
  }
  g.walkers = threads / g.lanes;
  return g;
}

// ---- reduction chunks -----------------------------------------------------------------------------------
// The strips of all rows (N * Ho * per_row of them) split into `nchunks` contiguous ranges fixed by the shape
// alone, so each partial sum, and the order the final kernel combines them in, never depends on the GPU: results
// are bitwise reproducible. A chunk gives each walker at least `min_per_walker` strips; at most kMaxChunks
// chunks keep the final combine (one pass over [chunk][C] partials) short.
constexpr int64_t kMaxChunks = 512;

MNET_HD int64_t reduction_chunks(int64_t strips, int walkers, int64_t groups, int64_t min_per_walker) {
  const int64_t per = (int64_t)walkers * min_per_walker;
  int64_t n = (strips + per - 1) / per;
  // Enough blocks in all (chunks x groups) to fill a GPU a few times over, no more than the cap.
  const int64_t want = (1024 + groups - 1) / groups;
  if (n > want) n = want;
  return n < 1 ? 1 : (n > kMaxChunks ? kMaxChunks : n);
}

MNET_HD void chunk_range(int64_t total, int64_t nchunks, int64_t chunk, int64_t& begin, int64_t& end) {
  const int64_t per = (total + nchunks - 1) / nchunks;
  begin = chunk * per < total ? chunk * per : total;
  end = begin + per < total ? begin + per : total;
}

// ---- the plan of one launch ---------------------------------------------------------------------------------
// Channel vector width V and strip width TW per layout, element size, column pattern J and kernel size: 16-byte
// vectors of channels in channels_last; in NCHW one channel and a strip of 8 (consecutive threads read consecutive
// strips of a row). A strip kernel (fwd, stats, bwd_reduce) holds TW x V fp32 sums plus the K x V weights of one
// kernel row in registers. In channels_last (strip_wide) its strips are wide, in blocks of half the threads (up to
// 255 registers, still 2 blocks per SM): 14 outputs on rows of at least 14 up to K = 5 (an input vector then feeds
// (14 + K - 1) / 14 outputs of a row, against (4 + K - 1) / 4 at 4; at K = 7 the reductions spill), else 7, and 7
// for the column pattern J = 2 (stride 2, dilation 1; stride 2 with dilation 2 is J = 1 and may take 14):
// MobileNet widths (112, 56, 28, 14, 7) leave no partial strip. NCHW and the backward apply (narrow_tile_width,
// within 128 registers in blocks of 256: its dweight pass holds the strip's dz and K x V sums besides) take 4, or 2
// at J = 2 (NCHW 8).
MNET_HD constexpr int tile_vec(int elem_size, bool channels_last) { return channels_last ? 16 / elem_size : 1; }
MNET_HD constexpr int narrow_tile_width(bool channels_last, int J) { return channels_last ? (J == 2 ? 2 : 4) : 8; }
constexpr int kWideTW = 7, kLongTW = 14;  // wide strips; kLongTW on rows of at least that many outputs
MNET_HD constexpr bool strip_wide(bool channels_last) { return channels_last; }
MNET_HD constexpr bool long_strips(int J, int K) { return J == 1 && K <= 5; }
MNET_HD constexpr int strip_tile_width(bool channels_last, int J, int K, int64_t Wo) {
  return !strip_wide(channels_last) ? narrow_tile_width(channels_last, J)
                                    : long_strips(J, K) && Wo >= kLongTW ? kLongTW : kWideTW;
}
// Threads of a block: `threads`, half of them for wide strips.
MNET_HD constexpr int plan_threads(int threads, bool wide) { return wide ? threads / 2 : threads; }

struct TilePlan {
  StripGeom sg;
  LaneGeom lg;
  FastDiv per_row;      // divides by sg.per_row (strip -> (image, row))
  FastDiv ho;           // divides by Ho
  int64_t strips = 0;   // N * Ho * per_row
  int64_t nchunks = 1;  // reduction chunks (grid.x of the reduction kernels)
  int V = 1, TW = 1;
  bool wide = false;    // wide strips (strip_wide), in blocks of half the threads
  int cb = 1;           // channels per block: lanes * V (the shared-memory parameter rows)
};

// The strip kernels' plan; `threads`: the block size of narrow strips (wide ones take half).
MNET_HD TilePlan tile_plan(const DwParams& p, int elem_size, int threads) {
  TilePlan t;
  t.V = tile_vec(elem_size, p.channels_last);
  const int J = strip_j(p.stride, p.dilation);
  t.wide = strip_wide(p.channels_last);
  threads = plan_threads(threads, t.wide);
  t.TW = strip_tile_width(p.channels_last, J, p.k, p.Wo);
  t.sg = strip_geom(p.Wo, p.stride, p.dilation, t.TW);
  t.per_row = fast_div((uint32_t)t.sg.per_row);
  t.ho = fast_div((uint32_t)p.Ho);
  t.lg = lane_geom(p.C, t.V, p.channels_last, threads);
  t.strips = p.N * p.Ho * t.sg.per_row;
  t.nchunks = reduction_chunks(t.strips, t.lg.walkers, t.lg.groups, 4);
  t.cb = t.lg.lanes * t.V;
  return t;
}

// Weights in shared memory, per lane: [K*K][V] fp32 taps, so a lane reads every tap off one base address
// (compile-time offsets), plus 4 floats of padding where K*K*V is a multiple of 8: the 16-byte loads of 8
// consecutive lanes then start 12 or 28 words apart (mod 32) and fall in distinct banks.
MNET_HD constexpr int weight_lane_floats(int K, int V) { return K * K * V + ((K * K * V) % 8 == 0 ? 4 : 0); }

// The most shared memory a block may take for two resident blocks per SM on sm_80 (164 KB per SM, of which the
// runtime reserves 1 KB per block), so on sm_90 (228 KB) too: the backward apply's and the stats' blocks stay
// within it (the issue-12 budget of >= 2 blocks per SM in every hot kernel).
constexpr int64_t kSmemTwoBlocks = 81 * 1024;

// ---- staged band tiles (channels_last with 16-byte vectors: fwd and stats) -------------------------------
// A block of the staged kernels works on *band tiles*: R consecutive output rows [oh0, oh0 + R) of one image x one
// strip column q (strip q of each of those rows, the strip geometry above) x `lanes` channel vectors. Walker k
// (0 <= k < R) computes the strip of row oh0 + k (nothing past Ho). The block first copies the input band all R
// strips read into shared memory as fp32, zero outside the image: each input element is converted once per tile
// (not once per kernel row that reads it), and the conv's inner loop has no padding masks or zero fills.
//   staged row r    <-> input row    ih_base + r * row_step   (ih_base = oh0 * stride - pad)
//   staged column j <-> input column iw0 + j * in_step         (the strip's window: iw0 = strip_iw0(ow0))
// row_step = 2 at stride = dilation = 2 (only even offsets are read), else 1; walker k reads, at kernel row kh,
// staged row k * row_a + kh * row_b (row_a = stride / row_step, row_b = dilation / row_step), window column
// j = J * m + kw as in the register window.
// Layout in 16-byte chunks: [row][column][q][lane slot], q < V / 4 (4 fp32 of a lane's vector per chunk), 8 lane
// slots (kBandLaneSlots: a column's and a q's offsets are compile-time), rows `pitch` chunks apart. Bank pattern of
// the conv's LDS.128 (a quarter warp, threads t = k * lanes + l, t = 8u .. 8u + 7, reads 128 bytes at once): thread
// t reads chunk (k * row_a + kh * row_b) * pitch + const + l; with row_a * pitch = lanes (mod 8) that is
// t + const (mod 8): the 8 threads hit 8 distinct 16-byte bank groups, conflict-free. The pitch pads a row to
// that (row_a = 1: pitch = lanes mod 8; row_a = 2 needs an even lanes count, else up to 2-way conflicts).
constexpr int kBandLaneSlots = 8;      // most channel vectors per block
constexpr int kBandRowsMax = 16;       // most output rows (walkers) per tile: threads <= 8 x 16 = 128
// The staged band: with the parameters (<= 13 KB at K = 7) and the stats' tree (1.5 KB) a block stays within
// 99 KB, the most an sm_86 / sm_89 block may opt into (those GPUs run the sm_80 build; kernels.cuh asserts it),
// and 2 blocks fit an SM of sm_90 (228 KB).
constexpr int64_t kBandStageBytes = 84 * 1024;
// The stats' blocks (stats_band_kernel) hold besides the band their weights and a tree of kBandLaneSlots x
// kBandRowsMax Welford triples (kernels.cuh asserts its size), all within kSmemTwoBlocks: their band takes what is
// left (fewer rows per tile on the K = 5 and 7 layers than the forward's).
constexpr int64_t kBandTreeBytes = 12 * kBandLaneSlots * kBandRowsMax;
MNET_HD int64_t band_stage_budget(bool reduction, int k, int V, int lanes) {
  const int64_t stats = kSmemTwoBlocks - (int64_t)weight_lane_floats(k, V) * lanes * 4 - kBandTreeBytes;
  return reduction && stats < kBandStageBytes ? stats : kBandStageBytes;
}

struct BandTilePlan {
  StripGeom sg;         // strips of a row (width TW)
  int V = 1, TW = 1, J = 1, nq = 1;  // channel vector, strip width, column pattern, 16-byte chunks per vector
  int lanes = 1;        // channel vectors per block (<= kBandLaneSlots)
  int64_t groups = 1;   // channel groups (grid.y)
  int R = 1;            // output rows per tile = walkers per block
  int64_t bands = 1;    // tiles along the rows of an image: ceil(Ho / R)
  int64_t tiles = 1;    // N * bands * sg.per_row
  int row_step = 1, row_a = 1, row_b = 1;
  int rows_in = 1, cols_in = 1;  // staged rows and columns
  // Whole-row strips: stride 1, dilation 1 and W = Wo = TW (the 7x7 and 14x14 layers), so every tile's strip is
  // its whole row, its window starts at column -P (P = (k - 1) / 2 = pad) and the window columns [0, P) and
  // [cols_in - P, cols_in) are padding in every tile: the kernels (template WHOLE) neither stage nor read them.
  bool whole = false;
  int pitch = 1;        // 16-byte chunks between staged rows
  FastDiv per_row;      // tile -> (image * bands + band, strip column)
  FastDiv bands_div;    // image * bands + band -> (image, band)
  int64_t nchunks = 1;  // blocks along the tiles (grid.x): block b walks the tiles of chunk b (chunk_range) in order
  uint32_t per_chunk = 1;  // tiles per chunk: ceil(tiles / nchunks) (band_chunk_tiles)
  FastDiv lanes_div;    // divides by lanes (thread -> walker, lane)
  MNET_HD int threads() const { return lanes * R; }
  MNET_HD int64_t stage_floats() const { return (int64_t)rows_in * pitch * 4; }
};

MNET_HD int band_rows_in(int R, int k, int row_a, int row_b) { return (R - 1) * row_a + (k - 1) * row_b + 1; }

MNET_HD int band_pitch(int cols_in, int nq, int lanes, int row_a) {
  const int base = cols_in * nq * kBandLaneSlots;  // a multiple of 8 chunks
  const int pad = row_a == 1 ? lanes % 8 : (lanes / 2) % 4;  // row_a * pitch = lanes (mod 8) where solvable
  return base + pad;
}

// The staged kernels' plan (channels_last, V * elem_size = 16 bytes). `reduction`: blocks are the fixed chunks of the
// stats (reduction_chunks over tiles), else the forward's blocks of up to 8 tiles (parameters staged once per block).
MNET_HD BandTilePlan band_tile_plan(const DwParams& p, int elem_size, bool reduction) {
  BandTilePlan b;
  b.V = tile_vec(elem_size, true);
  b.nq = b.V / 4;
  b.J = strip_j(p.stride, p.dilation);
  b.TW = strip_tile_width(true, b.J, p.k, p.Wo);
  b.sg = strip_geom(p.Wo, p.stride, p.dilation, b.TW);
  const int64_t vectors = (p.C + b.V - 1) / b.V;
  b.groups = (vectors + kBandLaneSlots - 1) / kBandLaneSlots;
  b.lanes = (int)((vectors + b.groups - 1) / b.groups);
  b.row_step = p.stride == 2 && p.dilation == 2 ? 2 : 1;
  b.row_a = p.stride / b.row_step;
  b.row_b = p.dilation / b.row_step;
  b.cols_in = strip_cols(b.J, b.TW, p.k);
  b.whole = p.stride == 1 && p.dilation == 1 && p.W == b.TW && p.Wo == b.TW;
  b.pitch = band_pitch(b.cols_in, b.nq, b.lanes, b.row_a);
  // Rows per tile: as many as fit (up to 16, 8 when input rows advance by 2), split evenly over the image's rows.
  const int most = b.row_a == 1 ? kBandRowsMax : kBandRowsMax / 2;
  const int64_t budget = band_stage_budget(reduction, p.k, b.V, b.lanes);
  int64_t bands = (p.Ho + most - 1) / most;
  int R = (int)((p.Ho + bands - 1) / bands);
  while (R > 1 && (int64_t)band_rows_in(R, p.k, b.row_a, b.row_b) * b.pitch * 16 > budget) {
    ++bands;
    R = (int)((p.Ho + bands - 1) / bands);
  }
  b.R = R;
  b.bands = (p.Ho + R - 1) / R;
  b.rows_in = band_rows_in(R, p.k, b.row_a, b.row_b);
  b.tiles = p.N * b.bands * b.sg.per_row;
  b.per_row = fast_div((uint32_t)b.sg.per_row);
  b.bands_div = fast_div((uint32_t)b.bands);
  if (reduction) {
    b.nchunks = reduction_chunks(b.tiles, 1, b.groups, 4);
  } else {  // 8, 4, 2 or 1 tiles per block: the most that leave >= 1024 blocks (a few waves of 2 blocks per SM)
    int64_t per = 8;
    while (per > 1 && (b.tiles + per - 1) / per * b.groups < 1024) per >>= 1;
    b.nchunks = (b.tiles + per - 1) / per;
  }
  b.per_chunk = (uint32_t)((b.tiles + b.nchunks - 1) / b.nchunks);
  b.lanes_div = fast_div((uint32_t)b.lanes);
  return b;
}

// Tiles [begin, end) of chunk `chunk` in 32-bit arithmetic: chunk_range's partition (tiles < 2^31, so
// chunk * per_chunk < tiles + per_chunk < 2^32).
MNET_HD void band_chunk_tiles(const BandTilePlan& b, uint32_t chunk, uint32_t& begin, uint32_t& end) {
  const uint32_t tiles = (uint32_t)b.tiles, lo = chunk * b.per_chunk;
  begin = lo < tiles ? lo : tiles;
  end = tiles - begin > b.per_chunk ? begin + b.per_chunk : tiles;
}

// Tile `tile` (< 2^31: the launcher checks) -> image, first output row, strip column and the strip's first output
// column (the same 32-bit multiply-high arithmetic on the host check and the device).
MNET_HD void band_tile_origin(const BandTilePlan& b, uint32_t tile, uint32_t& n, uint32_t& oh0, uint32_t& ow0) {
  const uint32_t r = div_of(b.per_row, tile), q = tile - r * b.per_row.d;
  n = div_of(b.bands_div, r);
  oh0 = (r - n * b.bands_div.d) * (uint32_t)b.R;
  const uint32_t per_phase = (uint32_t)b.sg.per_phase, phase = q >= per_phase ? 1u : 0u;
  ow0 = phase + (q - phase * per_phase) * (uint32_t)b.TW * (uint32_t)b.sg.out_step;
}

// Staged rows inside the image, [lo, hi): staged row r (input row ih_base + r * row_step) is in [0, H) exactly for
// lo <= r < hi (lo = hi when none is). The staging copies these and stores zeros for the others (padding). 32-bit
// (band_launch_plan checks H < 2^30).
MNET_HD void band_rows_inside(const BandTilePlan& b, int H, int ih_base, int& lo, int& hi) {
  const int st = b.row_step, sh = st == 2 ? 1 : 0;  // row_step is 1 or 2: a shift, not a division
  lo = ih_base >= 0 ? 0 : (-ih_base + st - 1) >> sh;
  const int end = H - ih_base <= 0 ? 0 : (H - ih_base + st - 1) >> sh;  // first r with ih >= H
  hi = end < b.rows_in ? end : b.rows_in;
  lo = lo < hi ? lo : hi;
}

// Chunk offset of staged (row, column, q, lane) (the layout above).
MNET_HD int band_chunk(const BandTilePlan& b, int row, int col, int q, int lane) {
  return row * b.pitch + (col * b.nq + q) * kBandLaneSlots + lane;
}

// ---- backward apply: bands of rows ----------------------------------------------------------------------
// A block of the backward apply owns output rows [ob0, ob1) of one image (it sums their dweight terms) and the
// input rows [ib0, ib1) = [ob0 * stride, min(ob1 * stride, H)) (it writes their dx). It computes dz once, into
// shared memory, for output rows [r0, r1): the owned rows plus the halo the dx rows read. Bands tile both the
// output rows and (since Ho * stride >= H) the input rows exactly once.
struct BandRows {
  int64_t ob0, ob1, ib0, ib1, r0, r1;
};

MNET_HD BandRows band_rows(const DwParams& p, int64_t band, int rows) {
  BandRows b;
  b.ob0 = band * rows;
  b.ob1 = b.ob0 + rows < p.Ho ? b.ob0 + rows : p.Ho;
  b.ib0 = b.ob0 * p.stride;
  b.ib1 = b.ob1 * p.stride < p.H ? b.ob1 * p.stride : p.H;
  // oh * stride - pad + kh * dilation in [ib0, ib1) for some kh in [0, k)
  const int64_t lo = b.ib0 + p.pad - (int64_t)(p.k - 1) * p.dilation;
  int64_t r0 = lo <= 0 ? 0 : (lo + p.stride - 1) / p.stride;
  int64_t r1 = (b.ib1 - 1 + p.pad) / p.stride + 1;
  r0 = r0 < b.ob0 ? r0 : b.ob0;
  r1 = r1 > b.ob1 ? r1 : b.ob1;
  b.r0 = r0;
  b.r1 = r1 < p.Ho ? r1 : p.Ho;
  return b;
}

// Most dz rows a band needs (sizes the shared-memory tile).
MNET_HD int band_dz_rows(int rows, int k, int stride, int dilation) {
  return rows + ((k - 1) * dilation + stride - 1) / stride + 1;
}

// A backward-apply block: kApplyThreads threads (kernels.cuh: kThreads) and at most kSmemTwoBlocks of shared memory.
constexpr int kApplyThreads = 256;

// Shared memory of the backward apply besides its tile, in floats: the block's dweight sums [K*K][cb], the weights
// [lanes][weight_lane_floats] and 6 per-channel rows [6][cb] (cb = lanes * V).
MNET_HD int64_t apply_fixed_floats(int k, int V, int lanes) {
  const int64_t cb = (int64_t)lanes * V;
  return (int64_t)k * k * cb + (int64_t)lanes * weight_lane_floats(k, V) + 6 * cb;
}

// The tile's budget in floats: what kSmemTwoBlocks leaves besides apply_fixed_floats.
MNET_HD int64_t apply_tile_budget(int k, int V, int lanes) {
  return kSmemTwoBlocks / 4 - apply_fixed_floats(k, V, lanes);
}

struct BandPlan {
  int rows = 1;        // owned output rows per band
  int64_t bands = 1;   // bands per image
  int dz_rows = 1;     // rows of the dz tile
  StripGeom sg;        // strips of the dz rows (width TW)
  FastDiv per_row;     // divides by sg.per_row (dz items -> row)
  FastDiv w;           // divides by W (dx items -> input row)
  int lanes = 1;       // channel vectors per block (a power of two <= 8)
  int64_t groups = 1;  // channel groups (grid.y)
  int64_t nchunks = 1; // blocks along (image, band) items: each walks items b, b + nchunks, ... (grid.x)
  int V = 1, TW = 1, cb = 1;
  int dw_walkers = 1;  // dweight walkers per (lane, kernel row): kApplyThreads / lanes / k
  // Floats of the shared tile: the dz rows [dz_rows][Wo][cb], and after an item's dx and dweight passes the
  // walkers' dweight sums of that item [dw_walkers][K*K][cb] in the same space: the larger of the two.
  int64_t tile_floats = 1;
  MNET_HD int64_t smem_floats(int k) const { return tile_floats + apply_fixed_floats(k, V, lanes); }
};

// Owned output rows a band should hold (band_plan's lanes), and how many a band of `lanes` channel vectors holds
// within the tile's budget (< 1: not even one).
constexpr int kApplyMinRows = 16;
MNET_HD int64_t apply_band_rows(const DwParams& p, int halo, int V, int lanes) {
  return apply_tile_budget(p.k, V, lanes) / (p.Wo * lanes * V) - halo;
}

// Blocks the backward apply aims at along (image, band) items and channel groups (a few waves of 2 blocks per SM).
// The CUDA emulator's build lowers it (tests/cuda_emu/build.py) so that its small shapes walk several items per block.
#ifndef MNET_APPLY_MIN_BLOCKS
#define MNET_APPLY_MIN_BLOCKS 1024
#endif

MNET_HD BandPlan band_plan(const DwParams& p, int elem_size) {
  BandPlan b;
  b.V = tile_vec(elem_size, p.channels_last);
  b.TW = narrow_tile_width(p.channels_last, strip_j(p.stride, p.dilation));
  b.sg = strip_geom(p.Wo, p.stride, p.dilation, b.TW);
  b.per_row = fast_div((uint32_t)b.sg.per_row);
  b.w = fast_div((uint32_t)p.W);
  const int64_t vectors = (p.C + b.V - 1) / b.V;
  const int halo = band_dz_rows(0, p.k, p.stride, p.dilation);
  // Wide images: fewer lanes so that a band still holds kApplyMinRows owned rows, or the whole image (the halo
  // rows recomputed per band stay a small part: at most ~20 % at K = 3).
  const int64_t min_rows = p.Ho < kApplyMinRows ? p.Ho : kApplyMinRows;
  int lanes = 8;
  while (lanes > 1 && (lanes > vectors || apply_band_rows(p, halo, b.V, lanes) < min_rows)) lanes >>= 1;
  b.lanes = lanes;
  b.cb = lanes * b.V;
  b.groups = (vectors + lanes - 1) / lanes;
  int64_t rows = apply_band_rows(p, halo, b.V, lanes);
  rows = rows < 1 ? 1 : (rows > p.Ho ? p.Ho : rows);
  b.rows = (int)rows;
  b.bands = (p.Ho + rows - 1) / rows;
  b.dz_rows = band_dz_rows(b.rows, p.k, p.stride, p.dilation);
  b.dw_walkers = kApplyThreads / lanes / p.k;
  const int64_t dz = (int64_t)b.dz_rows * p.Wo * b.cb, sums = (int64_t)b.dw_walkers * p.k * p.k * b.cb;
  b.tile_floats = dz > sums ? dz : sums;
  const int64_t items = p.N * b.bands, want = (MNET_APPLY_MIN_BLOCKS + b.groups - 1) / b.groups;
  b.nchunks = items < want ? items : want;
  b.nchunks = b.nchunks > kMaxChunks ? kMaxChunks : b.nchunks;
  return b;
}

// Channels [c0, c0 + count) of lane `lane` in channel group `group` (count <= 0: an idle lane).
MNET_HD int64_t lane_c0(const TilePlan& t, int64_t group, int lane) { return (group * t.lg.lanes + lane) * t.V; }

// Strip `s` (0 <= s < strips < 2^31: the launcher checks) -> image, output row and first output column, in 32-bit
// unsigned arithmetic with the plan's precomputed divisors (the same code on the host twin's check and the device).
MNET_HD void strip_origin(const TilePlan& t, uint32_t s, uint32_t& n, uint32_t& oh, uint32_t& ow0) {
  const uint32_t per_phase = (uint32_t)t.sg.per_phase;
  const uint32_t r = div_of(t.per_row, s), q = s - r * t.per_row.d;
  const uint32_t phase = q >= per_phase ? 1u : 0u;  // at most two phases (out_step <= 2)
  ow0 = phase + (q - phase * per_phase) * (uint32_t)t.TW * (uint32_t)t.sg.out_step;
  n = div_of(t.ho, r);
  oh = r - n * t.ho.d;
}

}  // namespace mnet
