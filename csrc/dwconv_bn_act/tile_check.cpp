// Runs the CUDA kernels' tile plan (tile.h) on the host: CI's check of the geometry the GPU launches with
// (tests/test_cuda_backend.py). No ATen; op.cpp exposes it as torch.ops.mnet_ext_cuda._dw_tile_coverage.
#include <math.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/math.h"
#include "dwconv_bn_act/launch.h"
#include "dwconv_bn_act/tile.h"

namespace mnet {

namespace {
[[noreturn]] void plan_error(const std::string& what) { throw std::runtime_error("mnet_ext tile plan: " + what); }

// The kernels' chunks (chunk_range) partition items [0, n) in order: each starts where the last ended, the last ends
// at n. `what` names the items in the errors.
void check_chunks(int64_t n, int64_t nchunks, const std::string& what) {
  int64_t next = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t lo, hi;
    chunk_range(n, nchunks, c, lo, hi);
    if (lo != next && lo < n) plan_error("chunks do not partition the " + what);
    next = hi > next ? hi : next;
  }
  if (next != n) plan_error("chunks do not cover every one of the " + what);
}
}  // namespace

// Backward apply: the bands partition the output rows (dweight) and the input rows (dx) in order, each band's dz
// rows hold its owned rows and every output row its dx rows read, and fit the shared-memory tile.
void check_bands(const DwParams& p, int elem_size) {
  const BandPlan b = band_plan(p, elem_size);
  if (b.lanes < 1 || b.lanes > 8 || (b.lanes & (b.lanes - 1)) != 0) plan_error("lanes must be a power of two <= 8");
  if (b.groups * b.lanes * b.V < p.C) plan_error("channel groups miss channels");
  if (b.dw_walkers < 1 || b.lanes * p.k * b.dw_walkers > kApplyThreads) plan_error("dweight walkers do not fit the block");
  if (b.tile_floats < (int64_t)b.dz_rows * p.Wo * b.cb || b.tile_floats < (int64_t)b.dw_walkers * p.k * p.k * b.cb)
    plan_error("the backward apply's tile holds neither its dz rows nor the walkers' dweight sums");
  if (b.rows > 1 && b.smem_floats(p.k) * 4 > kSmemTwoBlocks) plan_error("the backward apply exceeds its shared memory");
  int64_t next_o = 0, next_i = 0;
  for (int64_t band = 0; band < b.bands; ++band) {
    const BandRows r = band_rows(p, band, b.rows);
    if (r.ob0 != next_o || r.ib0 != next_i || r.ob1 <= r.ob0) plan_error("bands do not tile the rows in order");
    next_o = r.ob1;
    next_i = r.ib1;
    if (r.r0 > r.ob0 || r.r1 < r.ob1 || r.r1 - r.r0 > b.dz_rows) plan_error("dz rows miss owned rows or overflow");
    for (int64_t ih = r.ib0; ih < r.ib1; ++ih)
      for (int kh = 0; kh < p.k; ++kh) {
        const int64_t num = ih + p.pad - (int64_t)kh * p.dilation;
        if (num < 0 || num % p.stride != 0 || num / p.stride >= p.Ho) continue;
        if (num / p.stride < r.r0 || num / p.stride >= r.r1) plan_error("a dx row reads a dz row outside the band");
      }
  }
  if (next_o != p.Ho || next_i != p.H) plan_error("bands do not cover every row");
  // The kernel's 32-bit item indices and multiply-high divisors (dz / dweight items by strips per row, dx items by W).
  const int64_t most = (int64_t)b.dz_rows * (p.W > b.sg.per_row ? p.W : b.sg.per_row) * 8;
  if (most >= (int64_t(1) << 31)) plan_error("a band's items need more than 31 bits");
  for (uint32_t q = 0; q < (uint32_t)most; q += 1 + q / 64)
    if (div_of(b.per_row, q) != q / b.sg.per_row || div_of(b.w, q) != q / p.W) plan_error("fast division differs");
  if (b.nchunks < 1 || b.nchunks > p.N * b.bands) plan_error("bad chunk count of the backward apply");
}

// Staged band tiles (fwd_band_kernel, stats_band_kernel): the chunks partition the tiles in order, every output is
// computed by exactly one (tile, walker, m), every tap a strip reads lies inside the staged band at the staged
// row and column of the conv's own input coordinates (zero there exactly when the conv pads), the band fits its
// shared-memory budget and the block its threads, the conv's LDS.128 pattern is conflict-free where the pitch can
// make it so, and whole-row tiles leave unstaged and unread only columns that are padding in every tile (tile.h).
void check_band_plan(const DwParams& p, const BandTilePlan& b, int64_t stage_budget) {
  if (b.whole && b.J != 1) plan_error("whole-row band tiles need the column pattern J = 1");
  if (b.lanes < 1 || b.lanes > kBandLaneSlots || b.groups * b.lanes * b.V < p.C) plan_error("band lanes miss channels");
  if (b.R < 1 || b.threads() > kBandLaneSlots * kBandRowsMax) plan_error("band block shape does not fit 128 threads");
  if (b.R > 1 && b.stage_floats() * 4 > stage_budget) plan_error("the staged band exceeds its shared memory");
  if (b.tiles >= (int64_t(1) << 31)) plan_error("the band tiles need more than 31 bits");
  if (b.bands * b.R < p.Ho || (b.bands - 1) * b.R >= p.Ho) plan_error("bands do not cover the rows");
  check_chunks(b.tiles, b.nchunks, "band tiles");
  for (int64_t c = 0; c < b.nchunks; ++c) {  // the kernels' 32-bit chunk bounds
    int64_t lo, hi;
    uint32_t lo32, hi32;
    chunk_range(b.tiles, b.nchunks, c, lo, hi);
    band_chunk_tiles(b, (uint32_t)c, lo32, hi32);
    if (lo32 != lo || hi32 != hi) plan_error("band chunk bounds differ from chunk_range");
  }
  for (uint32_t t = 0; t < (uint32_t)b.threads(); ++t)
    if (div_of(b.lanes_div, t) != t / (uint32_t)b.lanes) plan_error("fast division by lanes differs");
  // LDS.128 banks: a quarter warp (threads 8u .. 8u + 7 = walker * lanes + lane) at one tap reads 8 distinct
  // 16-byte bank groups (chunk mod 8).
  if (b.row_a == 1 || b.lanes % 2 == 0)
    for (int kh = 0; kh < p.k; ++kh)
      for (int t0 = 0; t0 < b.threads(); t0 += 8) {
        uint32_t seen = 0;
        for (int t = t0; t < t0 + 8 && t < b.threads(); ++t) {
          const int k = t / b.lanes, lane = t % b.lanes;
          const uint32_t bit = 1u << (band_chunk(b, k * b.row_a + kh * b.row_b, 0, 0, lane) & 7);
          if (seen & bit) plan_error("the staged band's LDS.128 pattern has bank conflicts");
          seen |= bit;
        }
      }
  const int J = b.J, in_step = b.sg.in_step;
  std::vector<int32_t> counts((size_t)(p.N * p.Ho * p.Wo), 0);
  for (int64_t tile = 0; tile < b.tiles; ++tile) {
    uint32_t n32, oh032, ow032;
    band_tile_origin(b, (uint32_t)tile, n32, oh032, ow032);
    const int64_t r = tile / b.sg.per_row, q = tile - r * b.sg.per_row;
    if (n32 != r / b.bands || oh032 != (r % b.bands) * b.R || ow032 != strip_ow0(b.sg, q, b.TW))
      plan_error("band tile origin differs from plain division");
    const int64_t oh0 = oh032, ow0 = ow032, ih_base = oh0 * p.stride - p.pad, iw0 = strip_iw0(ow0, p.stride, p.pad);
    const uint32_t mask = column_mask((int)iw0, in_step, (int)p.W, b.cols_in);
    if (b.whole) {  // whole-row tiles: the kernels skip window columns [0, P) and [cols_in - P, cols_in) unread
      const int P = (p.k - 1) / 2;
      const uint32_t inside = ((1u << (b.cols_in - P)) - 1u) & ~((1u << P) - 1u);
      if (b.cols_in - 2 * P != b.TW || mask != inside)
        plan_error("whole-row band tiles: the window's columns inside the image are not [P, cols_in - P)");
    }
    int lo, hi;
    band_rows_inside(b, (int)p.H, (int)ih_base, lo, hi);
    for (int r = 0; r < b.rows_in; ++r) {
      const int64_t ih = ih_base + (int64_t)r * b.row_step;
      if ((r >= lo && r < hi) != (ih >= 0 && ih < p.H)) plan_error("staged rows inside the image differ");
    }
    for (int k = 0; k < b.R; ++k) {
      const int64_t oh = oh0 + k;
      if (oh >= p.Ho) break;
      const int cnt = strip_count(b.sg, (int)p.Wo, (int)ow0, b.TW);
      for (int m = 0; m < cnt; ++m) {
        const int64_t ow = ow0 + (int64_t)m * b.sg.out_step;
        if (ow >= p.Wo) plan_error("a band strip's output count differs from its outputs");
        ++counts[(size_t)((n32 * p.Ho + oh) * p.Wo + ow)];
        for (int kh = 0; kh < p.k; ++kh)
          for (int kw = 0; kw < p.k; ++kw) {
            const int row = k * b.row_a + kh * b.row_b, col = J * m + kw;  // what band_conv_strip reads
            if (row >= b.rows_in || col >= b.cols_in) plan_error("a tap reads outside the staged band");
            const int64_t ih = ih_base + (int64_t)row * b.row_step, iw = iw0 + (int64_t)col * in_step;  // stage_band
            if (ih != in_coord(oh, kh, p.stride, p.dilation, p.pad) || iw != in_coord(ow, kw, p.stride, p.dilation, p.pad))
              plan_error("a staged tap differs from the conv's input");
            const bool staged_in = row >= lo && row < hi && ((mask >> col) & 1u);
            if (staged_in != (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)) plan_error("staged padding differs");
          }
      }
    }
  }
  for (size_t i = 0; i < counts.size(); ++i)
    if (counts[i] != 1) plan_error("band tiles compute an output " + std::to_string(counts[i]) + " times");
}

// The forward's plan and the stats' (fewer rows per tile where their budget is smaller: tile.h band_stage_budget).
void check_band_tiles(const DwParams& p, int elem_size) {
  const BandTilePlan b = band_tile_plan(p, elem_size, false);
  const BandTilePlan br = band_tile_plan(p, elem_size, true);
  if (br.pitch != b.pitch || br.whole != b.whole || br.TW != b.TW || br.lanes != b.lanes || br.R > b.R)
    plan_error("the staged kernels' plans differ beyond the stats' rows per tile");
  check_band_plan(p, b, band_stage_budget(false, p.k, b.V, b.lanes));
  // the stats' block (band, weights, Welford tree) within kSmemTwoBlocks: two blocks per SM on sm_80
  check_band_plan(p, br, kSmemTwoBlocks - (int64_t)weight_lane_floats(p.k, br.V) * br.lanes * 4 - kBandTreeBytes);
}

// Adds to counts ([N, C, Ho, Wo]) the (strip, lane) work items of plan t that write each output; checks the
// chunks, the fast divisions, each window's columns and padding mask against the convolution's.
void cover(const DwParams& p, const TilePlan& t, int threads, int32_t* counts) {
  const int J = strip_j(p.stride, p.dilation);
  if (t.lg.walkers < 1 || t.lg.lanes * t.lg.walkers > plan_threads(threads, t.wide))
    plan_error("block shape does not fit the thread count");
  check_chunks(t.strips, t.nchunks, "strips");
  if (t.strips >= (int64_t(1) << 31)) plan_error("the strips need more than 31 bits");
  const int ncol = strip_cols(J, t.TW, p.k);
  if (ncol > 31) plan_error("the window is wider than the column mask");
  if (t.TW > kLongTW) plan_error("a strip is wider than kLongTW");
  // The stats kernel's Chan step over every strip in plan order, z = the output column (NaN past the strip's
  // count): the mean of 0 .. Wo - 1 over N * Ho * Wo outputs, whatever the empty or partial strips.
  float wcount = 0.0f, wmean[1] = {0.0f}, wm2[1] = {0.0f};
  for (int64_t s = 0; s < t.strips; ++s) {
    uint32_t n32, oh32, ow032;
    strip_origin(t, (uint32_t)s, n32, oh32, ow032);
    const int64_t n = n32, oh = oh32, ow0 = ow032;
    const int cnt = strip_count(t.sg, (int)p.Wo, (int)ow0, t.TW);
    float z[kLongTW][1];
    for (int m = 0; m < kLongTW; ++m) z[m][0] = m < cnt ? (float)(ow0 + (int64_t)m * t.sg.out_step) : NAN;
    welford_add_strip<kLongTW, 1>(wcount, wmean, wm2, z, cnt);
    // The precomputed divisors against plain division (the kernels rely on them for every strip).
    const int64_t r = s / t.sg.per_row, q = s - r * t.sg.per_row;
    if (n != r / p.Ho || oh != r % p.Ho || ow0 != strip_ow0(t.sg, q, t.TW)) plan_error("fast division differs");
    const int64_t iw0 = strip_iw0(ow0, p.stride, p.pad);
    const uint32_t mask = column_mask((int)iw0, t.sg.in_step, (int)p.W, ncol);
    for (int j = 0; j < ncol; ++j) {
      const int64_t iw = iw0 + (int64_t)j * t.sg.in_step;
      if (((mask >> j) & 1u) != (iw >= 0 && iw < p.W ? 1u : 0u)) plan_error("the column mask differs from the padding");
    }
    for (int m = 0; m < t.TW; ++m) {
      const int64_t ow = ow0 + (int64_t)m * t.sg.out_step;
      if ((ow < p.Wo) != (m < cnt)) plan_error("a strip's output count differs from its outputs");
      if (ow >= p.Wo) break;
      for (int kw = 0; kw < p.k; ++kw) {
        const int64_t iw = iw0 + (int64_t)(J * m + kw) * t.sg.in_step;
        if (iw != in_coord(ow, kw, p.stride, p.dilation, p.pad)) plan_error("a window column differs from the conv's");
      }
      if (J * m + p.k - 1 >= ncol) plan_error("a tap falls outside the register window");
      for (int64_t g = 0; g < t.lg.groups; ++g)
        for (int lane = 0; lane < t.lg.lanes; ++lane) {
          const int64_t c0 = lane_c0(t, g, lane);
          for (int v = 0; v < t.V && c0 + v < p.C; ++v) ++counts[((n * p.C + c0 + v) * p.Ho + oh) * p.Wo + ow];
        }
    }
  }
  const float want = 0.5f * (float)(p.Wo - 1);
  if (wcount != (float)(p.N * p.Ho * p.Wo) || !(fabsf(wmean[0] - want) <= 1e-4f * (1.0f + want)))
    plan_error("the stats' Chan step over the strips gives count " + std::to_string(wcount) + ", mean " +
               std::to_string(wmean[0]) + " (want " + std::to_string(want) + ")");
}

// counts: [N, C, Ho, Wo] (contiguous, zeroed): how many (strip, lane) work items of the strip kernels' plan write
// each output. Every strip's register window must read exactly the input columns the convolution needs (else: an
// error), the reduction chunks must partition the strips in order, the backward apply's bands must pass
// check_bands, and in channels_last the staged band tiles check_band_tiles.
void dw_tile_coverage(const DwParams& p, int elem_size, int threads, int32_t* counts) {
  check_bands(p, elem_size);
  if (p.channels_last) check_band_tiles(p, elem_size);
  const LaneGeom lg = lane_geom(p.C, tile_vec(elem_size, p.channels_last), p.channels_last, threads);
  if (lg.walkers < 1 || lg.lanes * lg.walkers > threads) plan_error("block shape does not fit the thread count");
  cover(p, tile_plan(p, elem_size, threads), threads, counts);
}

}  // namespace mnet
