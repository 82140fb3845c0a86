// CUDA kernels of the lossy comms codec (format and arithmetic in lossy_codec.h). Also compiled
// on the CPU by tools/conv_emu/lossy_emu_test.cpp (LOSSY_EMULATE: every thread of a block a
// std::thread, __syncthreads / __syncwarp barriers), which checks them byte for byte against the
// CPU implementation without a GPU.
//
// Work is cut into units: one tile (a range of 8-value words) of one (chunk, group). A block
// takes units grid-stride; its threads take the tile's words block-stride, so a warp reads 32
// consecutive words (16-byte loads where the layout allows) and writes or reads its 32 words'
// bytes as one contiguous run, staged in shared memory (coalesced byte stores instead of b
// strided ones per thread).
//   encode = lossy_minmax_kernel (per unit: min, max, NaN/inf of its tile -> partial[unit]) then
//            lossy_pack_kernel (per unit: reduces its group's partials, quantises and packs its
//            tile; the unit of tile 0 writes the header and marks a bad group in *status).
//            The input is read twice; the second read mostly hits L2 for all-to-all-sized
//            tensors (the H200 has 50 MB of L2).
//   decode = lossy_unpack_kernel (one pass: header, codes -> float32, 16-byte stores).
#pragma once

#include "lossy_codec.h"

#ifdef LOSSY_EMULATE
#include "emu_runtime.h"
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
#define LC_TID (emu::cur_tid)
#define LC_BID (emu::cur->bidx.x)
#define LC_GDIM (emu::cur->gdim.x)
#define LC_SYNC() emu::cur->block_bar->arrive_and_wait()
#define LC_SYNCWARP() emu::cur->warp_bar[emu::cur_tid / 32]->arrive_and_wait()
#define LC_SHARED static
#else
#include <cuda_runtime.h>
#define LC_TID (threadIdx.x)
#define LC_BID (blockIdx.x)
#define LC_GDIM (gridDim.x)
#define LC_SYNC() __syncthreads()
#define LC_SYNCWARP() __syncwarp()
#define LC_SHARED __shared__
#endif

namespace torchrec_tt {
namespace lossy {

// Groups per launch: their widths and payload offsets travel as kernel parameters (no host to
// device copy); more groups take several launches.
constexpr int kLaunchGroups = 256;

struct KernelArgs {
  const float* x;     // encode input  [C, rows, G * block]
  float* y;           // decode output [C, rows, G * block]
  uint8_t* data;      // encoded rows (encode: written; decode: read)
  int* status;        // encode: set to 1 when a group holds NaN / inf
  float2* partial;    // encode: [C * gb * tiles] (min, max) of each unit; min NaN: bad
  int64_t row_bytes;  // stride of `data` rows
  int64_t rows, block, groups;
  uint32_t n, words;  // values and 8-value words per group
  int g0, gb;         // this launch: groups [g0, g0 + gb)
  int64_t units;      // C * gb * tiles
  uint32_t tiles, words_per_tile;
  int vec;            // 16-byte loads / stores (layout and alignment allow them)
  uint8_t bits[kLaunchGroups];
  int64_t offset[kLaunchGroups];  // payload byte offset in the row
};

struct Unit {
  int64_t c;
  int gl;  // group within the launch
  uint32_t tile, begin, end;  // words [begin, end)
  __device__ const float* src(const KernelArgs& a) const {
    return a.x + c * a.rows * a.groups * a.block + (a.g0 + gl) * a.block;
  }
  __device__ float* dst(const KernelArgs& a) const {
    return a.y + c * a.rows * a.groups * a.block + (a.g0 + gl) * a.block;
  }
};

__device__ __forceinline__ Unit unit_at(const KernelArgs& a, int64_t u) {
  Unit t;
  const int64_t cg = u / a.tiles;
  t.tile = static_cast<uint32_t>(u - cg * a.tiles);
  t.c = cg / a.gb;
  t.gl = static_cast<int>(cg - t.c * a.gb);
  t.begin = t.tile * a.words_per_tile;
  const uint32_t end = t.begin + a.words_per_tile;
  t.end = end < a.words ? end : a.words;
  return t;
}

// The values of word w of a group starting at p (value i at row i / block, column i % block);
// returns how many are real (the last word of a group may be short; the rest are 0).
__device__ __forceinline__ int load_word(const KernelArgs& a, const float* p, uint32_t w,
                                         float (&v)[8]) {
  const uint32_t i0 = w * 8u;
  const int cnt = a.n - i0 < 8u ? static_cast<int>(a.n - i0) : 8;
  const uint32_t blk = static_cast<uint32_t>(a.block);
  const int64_t rs = a.groups * a.block;
  if (a.vec && cnt == 8) {
    const uint32_t r = i0 / blk, j = i0 - r * blk;
    const float4* q = reinterpret_cast<const float4*>(p + r * rs + j);
    const float4 lo = q[0], hi = q[1];
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
    v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
    return 8;
  }
  for (int k = 0; k < 8; ++k) {
    if (k < cnt) {
      const uint32_t i = i0 + k, r = i / blk, j = i - r * blk;
      v[k] = p[r * rs + j];
    } else {
      v[k] = 0.0f;
    }
  }
  return cnt;
}

__device__ __forceinline__ void store_word(const KernelArgs& a, float* p, uint32_t w, int cnt,
                                           const float (&v)[8]) {
  const uint32_t i0 = w * 8u;
  const uint32_t blk = static_cast<uint32_t>(a.block);
  const int64_t rs = a.groups * a.block;
  if (a.vec && cnt == 8) {
    const uint32_t r = i0 / blk, j = i0 - r * blk;
    float4* q = reinterpret_cast<float4*>(p + r * rs + j);
    q[0] = float4{v[0], v[1], v[2], v[3]};
    q[1] = float4{v[4], v[5], v[6], v[7]};
    return;
  }
  for (int k = 0; k < cnt; ++k) {
    const uint32_t i = i0 + k, r = i / blk, j = i - r * blk;
    p[r * rs + j] = v[k];
  }
}

// Block-wide min / max / or of (mn, mx, bad) through shared memory (a tree: no warp shuffles,
// so the emulation runs it as written). All threads get the result.
template <int kThreads>
__device__ __forceinline__ void block_reduce(float& mn, float& mx, int& bad, float* s_mn,
                                             float* s_mx, int* s_bad) {
  const unsigned tid = LC_TID;
  s_mn[tid] = mn;
  s_mx[tid] = mx;
  s_bad[tid] = bad;
  LC_SYNC();
  for (unsigned half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) {
      const float a = s_mn[tid + half], b = s_mx[tid + half];
      s_mn[tid] = a < s_mn[tid] ? a : s_mn[tid];
      s_mx[tid] = b > s_mx[tid] ? b : s_mx[tid];
      s_bad[tid] |= s_bad[tid + half];
    }
    LC_SYNC();
  }
  mn = s_mn[0];
  mx = s_mx[0];
  bad = s_bad[0];
  LC_SYNC();  // the arrays are reused by the next call
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) lossy_minmax_kernel(KernelArgs a) {
  LC_SHARED float s_mn[kThreads];
  LC_SHARED float s_mx[kThreads];
  LC_SHARED int s_bad[kThreads];
  for (int64_t u = LC_BID; u < a.units; u += LC_GDIM) {
    const Unit t = unit_at(a, u);
    const float* p = t.src(a);
    float mn = INFINITY, mx = -INFINITY;
    int bad = 0;
#pragma unroll 4  // several words' loads in flight per thread
    for (uint32_t w = t.begin + LC_TID; w < t.end; w += kThreads) {
      float v[8];
      const int cnt = load_word(a, p, w, v);
      for (int k = 0; k < cnt; ++k) {
        bad |= finite(v[k]) ? 0 : 1;
        mn = v[k] < mn ? v[k] : mn;
        mx = v[k] > mx ? v[k] : mx;
      }
    }
    block_reduce<kThreads>(mn, mx, bad, s_mn, s_mx, s_bad);
    if (LC_TID == 0) a.partial[u] = float2{bad ? NAN : mn, mx};
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) lossy_pack_kernel(KernelArgs a) {
  LC_SHARED float s_mn[kThreads];
  LC_SHARED float s_mx[kThreads];
  LC_SHARED int s_bad[kThreads];
  LC_SHARED uint8_t s_a[kThreads / 32][32 * 8];
  LC_SHARED uint8_t s_b[kThreads / 32][32 * 8];
  const unsigned tid = LC_TID, lane = tid % 32, warp = tid / 32;
  for (int64_t u = LC_BID; u < a.units; u += LC_GDIM) {
    const Unit t = unit_at(a, u);
    // the group's extremes from the partials of all its tiles
    const int64_t first = u - t.tile;
    float mn = INFINITY, mx = -INFINITY;
    int bad = 0;
    for (uint32_t k = tid; k < a.tiles; k += kThreads) {
      const float2 pm = a.partial[first + k];
      if (pm.x != pm.x) {
        bad = 1;
      } else {
        mn = pm.x < mn ? pm.x : mn;
        mx = pm.y > mx ? pm.y : mx;
      }
    }
    block_reduce<kThreads>(mn, mx, bad, s_mn, s_mx, s_bad);
    bad |= (finite(mn) && finite(mx)) ? 0 : 1;
    const int bits = a.bits[t.gl];
    const Quant q = make_quant(mn, mx, bits);
    uint8_t* row = a.data + t.c * a.row_bytes;
    if (t.tile == 0 && tid == 0) {
      const float hdr[2] = {bad ? NAN : mn, bad ? NAN : mx};
      const uint8_t* hb = reinterpret_cast<const uint8_t*>(hdr);
      uint8_t* dst = row + kHeaderBytes * (a.g0 + t.gl);
      for (int k = 0; k < kHeaderBytes; ++k) dst[k] = hb[k];
      if (bad) *a.status = 1;
    }
    const int na = bytes_a(bits), nb = bytes_b(bits);
    uint8_t* ra = row + a.offset[t.gl];
    uint8_t* rb = ra + 8 * static_cast<int64_t>(a.words);
    const float* p = t.src(a);
    // warp-uniform loop: every lane reaches the __syncwarp()s
    for (uint32_t base = t.begin; base < t.end; base += kThreads) {
      const uint32_t w = base + tid;
      uint32_t codes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (w < t.end && !bad) {
        float v[8];
        const int cnt = load_word(a, p, w, v);
        for (int k = 0; k < cnt; ++k) codes[k] = quantize(v[k], q);
      }
      if (w < t.end) {
        const uint64_t pa = pack8(codes, na, 0);
        for (int k = 0; k < na; ++k) s_a[warp][lane * na + k] = static_cast<uint8_t>(pa >> (8 * k));
        if (nb > 0) {
          const uint64_t pb = pack8(codes, nb, 8);
          for (int k = 0; k < nb; ++k) {
            s_b[warp][lane * nb + k] = static_cast<uint8_t>(pb >> (8 * k));
          }
        }
      }
      LC_SYNCWARP();
      const uint32_t w0 = base + warp * 32;
      const int nw = w0 >= t.end ? 0 : (t.end - w0 < 32u ? static_cast<int>(t.end - w0) : 32);
      for (int k = lane; k < nw * na; k += 32) ra[static_cast<int64_t>(w0) * na + k] = s_a[warp][k];
      for (int k = lane; k < nw * nb; k += 32) rb[static_cast<int64_t>(w0) * nb + k] = s_b[warp][k];
      LC_SYNCWARP();
    }
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) lossy_unpack_kernel(KernelArgs a) {
  LC_SHARED float s_hdr[2];
  LC_SHARED uint8_t s_a[kThreads / 32][32 * 8];
  LC_SHARED uint8_t s_b[kThreads / 32][32 * 8];
  const unsigned tid = LC_TID, lane = tid % 32, warp = tid / 32;
  for (int64_t u = LC_BID; u < a.units; u += LC_GDIM) {
    const Unit t = unit_at(a, u);
    const uint8_t* row = a.data + t.c * a.row_bytes;
    if (tid == 0) {
      uint8_t hb[kHeaderBytes];
      const uint8_t* src = row + kHeaderBytes * (a.g0 + t.gl);
      for (int k = 0; k < kHeaderBytes; ++k) hb[k] = src[k];
      float hdr[2];
      memcpy(hdr, hb, sizeof(hdr));
      s_hdr[0] = hdr[0];
      s_hdr[1] = hdr[1];
    }
    LC_SYNC();
    const int bits = a.bits[t.gl];
    const Quant q = make_quant(s_hdr[0], s_hdr[1], bits);
    const int na = bytes_a(bits), nb = bytes_b(bits);
    const uint8_t* ra = row + a.offset[t.gl];
    const uint8_t* rb = ra + 8 * static_cast<int64_t>(a.words);
    float* p = t.dst(a);
    for (uint32_t base = t.begin; base < t.end; base += kThreads) {
      const uint32_t w0 = base + warp * 32;
      const int nw = w0 >= t.end ? 0 : (t.end - w0 < 32u ? static_cast<int>(t.end - w0) : 32);
      for (int k = lane; k < nw * na; k += 32) s_a[warp][k] = ra[static_cast<int64_t>(w0) * na + k];
      for (int k = lane; k < nw * nb; k += 32) s_b[warp][k] = rb[static_cast<int64_t>(w0) * nb + k];
      LC_SYNCWARP();
      const uint32_t w = base + tid;
      if (w < t.end) {
        uint64_t pa = 0, pb = 0;
        for (int k = 0; k < na; ++k) {
          pa |= static_cast<uint64_t>(s_a[warp][lane * na + k]) << (8 * k);
        }
        for (int k = 0; k < nb; ++k) {
          pb |= static_cast<uint64_t>(s_b[warp][lane * nb + k]) << (8 * k);
        }
        const uint32_t ma = (1u << na) - 1u, mb = (1u << nb) - 1u;
        const uint32_t i0 = w * 8u;
        const int cnt = a.n - i0 < 8u ? static_cast<int>(a.n - i0) : 8;
        float v[8];
        for (int k = 0; k < 8; ++k) {
          const uint32_t code = static_cast<uint32_t>((pa >> (na * k)) & ma) |
                                (static_cast<uint32_t>((pb >> (nb * k)) & mb) << 8);
          v[k] = dequantize(code, q);
        }
        store_word(a, p, w, cnt, v);
      }
      LC_SYNCWARP();
    }
    LC_SYNC();  // s_hdr is rewritten for the next unit
  }
}

// Fills the fields every launch of one op call shares.
inline KernelArgs base_args(const Geometry& geo, const Plan& plan) {
  KernelArgs a{};
  a.rows = geo.rows;
  a.block = geo.block;
  a.groups = geo.groups;
  a.n = static_cast<uint32_t>(plan.n);
  a.words = static_cast<uint32_t>(plan.words);
  return a;
}

// Groups [g0, g0 + gb) of one launch: widths and payload offsets as kernel parameters.
inline void set_groups(KernelArgs& a, const std::vector<int64_t>& bits, const Plan& plan,
                       int64_t g0) {
  a.g0 = static_cast<int>(g0);
  a.gb = static_cast<int>(std::min<int64_t>(kLaunchGroups, plan.groups - g0));
  for (int k = 0; k < a.gb; ++k) {
    a.bits[k] = static_cast<uint8_t>(bits[static_cast<size_t>(g0 + k)]);
    a.offset[k] = plan.offset[static_cast<size_t>(g0 + k)];
  }
}

// Vectorised value access: every full word of 8 values is one aligned pair of 16-byte accesses.
inline int vec_ok(const Geometry& geo, const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (geo.block % 8 == 0 || (geo.rows == 1 && geo.block % 4 == 0));
}

// Units and tiles for C chunks of gb groups of `words` words: about `target_blocks` units in
// all (at least 256 words, one per thread, in a tile), so a few large groups still fill the GPU.
inline void plan_tiles(KernelArgs& a, int64_t chunks, int64_t target_blocks, int threads) {
  const int64_t cg = chunks * a.gb;
  const int64_t max_tiles = (static_cast<int64_t>(a.words) + threads - 1) / threads;
  int64_t tiles = (target_blocks + cg - 1) / cg;
  tiles = tiles < 1 ? 1 : (tiles > max_tiles ? max_tiles : tiles);
  const int64_t wpt = (static_cast<int64_t>(a.words) + tiles - 1) / tiles;
  a.words_per_tile = static_cast<uint32_t>(wpt);
  a.tiles = static_cast<uint32_t>((a.words + wpt - 1) / wpt);
  a.units = cg * a.tiles;
}

}  // namespace lossy
}  // namespace torchrec_tt
