// Fused TT-convolution kernels (included by conv_cuda.cu; also compiled on the CPU by the
// emulator in tools/conv_emu/, which defines TT_CONV_EMULATE and supplies the device primitives).
//
// One thread block computes an output tile (TH x TW pixels, all K channels) of one image, in
// NHWC (channels-last) layout, keeping both rank intermediates in shared memory:
//   stage 1  T1[P x r1] = X_patch[P x C] . A[C x r1]    (P = input patch incl. the halo, 1x1 conv)
//   stage 2  T2[M x r2] = sum_taps T1[gather(tap)] . B_tap[r1 x r2]   (KHxKW conv, implicit im2col)
//   stage 3  Y [M x K ] = T2 . Cm[r2 x K] + bias       (1x1 conv), staged in smem, 16-byte stores
// All three are warp-level tensor-core MMAs (mma.sync m16n8k8 tf32 / m16n8k16 bf16, f16) with
// fp32 accumulation. X chunks stream through a 2- or 3-stage cp.async pipeline. The weights
// are pre-packed by tt_conv_pack_kernel into the per-lane fragment order of the MMA's B operand,
// so each lane fetches one 8-byte word pair per fragment (L1/L2-resident, shared by all blocks).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k8 / m16n8k16"), in units of 32-bit
// "k-words" (one tf32, or two adjacent 16-bit elements along k), with g = lane/4, t = lane%4:
//   A (16 x 8 words):  reg r -> row g + 8*(r%2), k-word t + 4*(r/2)
//   B (8 words x 8):   reg r -> k-word t + 4*r, column g
//   C/D (16 x 8 fp32): reg r -> row g + 8*(r/2), column 2t + r%2
// which is the same for tf32 m16n8k8 and 16-bit m16n8k16, so one code path serves all dtypes.
#pragma once

#ifdef TT_CONV_EMULATE
#include "emu_runtime.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#endif

namespace torchrec_tt {
namespace ttconv {

// Dtype tags: the kernels move bytes and only need the element size, the MMA flavour and the
// float -> storage conversions.
struct TagF32 { static constexpr int kBytes = 4, kKind = 0; };  // fp32 storage, tf32 math
struct TagBF16 { static constexpr int kBytes = 2, kKind = 1; };
struct TagF16 { static constexpr int kBytes = 2, kKind = 2; };

// A block has kWarpsM x WN warps: kWarpsM split the rows (pixels) of every stage, WN split the
// columns (ranks in stages 1-2, output channels in stage 3), so small grids still get enough
// warps per SM to hide latency (WN is a template parameter, 2 or 4).
constexpr int kWarpsM = 4;
constexpr int kChunkBytes = 128;  // stage-1 channel chunk per patch row (4 k-steps)
constexpr int kPad = 16;          // smem row padding: rows land 4 banks apart (conflict-free A loads)
constexpr int kMT1 = 2;           // stage-1 m-tiles (16 patch rows) per warp per pass
constexpr int kRowsPerPass = kWarpsM * kMT1 * 16;  // patch rows per stage-1 pass (128)
constexpr int kOutChans = 64;     // output channels per stage-3 pass (8 n-tiles)
__host__ __device__ constexpr int threads_for(int wn) { return kWarpsM * wn * 32; }

struct FusedParams {
  const unsigned char* x;  // NHWC input  [N, H, W, C]
  unsigned char* y;        // NHWC output [N, Ho, Wo, K]
  const uint2* w1;         // packed [c_ksteps][RP/8][32]
  const uint2* w2;         // packed [KH*KW][RP k-steps][RP/8][32]
  const uint2* w3;         // packed [RP k-steps][nt3][32]
  const float* bias;       // [K] or nullptr
  int N, H, W, C, Ho, Wo, K;
  int KH, KW, sh, sw, ph, pw, dh, dw;
  int TH, TW, PH, PW;      // output tile, input patch
  int stages;              // cp.async pipeline depth (2 to 4)
  int tiles_h, tiles_w;
  int c_ksteps;            // ceil(C * bytes / 32)
  int nt3;                 // ceil(K / 8)
};

// Shared-memory layout of one block (bytes), for the host and the kernel alike.
// Each pipeline stage buffer holds xbuf_rows patch rows of one channel chunk followed by the
// matching packed stage-1 weights (4 k-steps x RP/8 n-tiles x 32 lanes x 8 bytes), so that the
// stage-1 B fragments come from shared memory, loaded by the same cp.async pipeline as X.
struct SmemLayout {
  int P, Pp, xrow, t1row, t2row, yrow, xbuf_rows, w1chunk, xbuf, region0, t1_off, t2_off, total;
};

// stages: depth of the cp.async pipeline over channel chunks (2 to 4).
__host__ __device__ inline SmemLayout smem_layout(int PH, int PW, int M, int RP, int bytes,
                                                  int stages) {
  SmemLayout s;
  s.P = PH * PW;
  s.Pp = (s.P + 15) / 16 * 16;
  s.xrow = kChunkBytes + kPad;
  s.t1row = RP * bytes + kPad;
  s.t2row = RP * bytes + kPad;
  s.yrow = kOutChans * bytes + kPad;
  s.xbuf_rows = s.Pp < kRowsPerPass ? s.Pp : kRowsPerPass;
  s.w1chunk = 4 * (RP / 8) * 32 * 8;
  s.xbuf = s.xbuf_rows * s.xrow + s.w1chunk;
  const int xbytes = stages * s.xbuf;
  const int ybytes = M * s.yrow;
  s.region0 = xbytes > ybytes ? xbytes : ybytes;
  s.t1_off = s.region0;
  s.t2_off = s.t1_off + s.Pp * s.t1row;
  s.total = s.t2_off + M * s.t2row;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Device primitives (the emulator supplies its own versions of these).
#ifndef TT_CONV_EMULATE

__device__ __forceinline__ uint32_t tf32_bits(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ uint16_t bf16_bits(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ uint16_t f16_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }

template <typename Tag>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint2 b);

template <>
__device__ __forceinline__ void mma<TagF32>(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}
template <>
__device__ __forceinline__ void mma<TagBF16>(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}
template <>
__device__ __forceinline__ void mma<TagF16>(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}

// 16-byte global -> shared copy; src_bytes == 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ uint2 load_weights(const uint2* p) { return __ldg(p); }
__device__ __forceinline__ uint4 lds128(const unsigned char* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void stg128(unsigned char* p, uint4 v) {
  *reinterpret_cast<uint4*>(p) = v;
}
#define TT_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

#endif  // !TT_CONV_EMULATE

// Storage conversions. Operands kept in smem for a later MMA are rounded to tf32 (fp32 mode);
// the final output is not.
template <typename Tag>
__device__ __forceinline__ void store_pair(unsigned char* row, int col, float v0, float v1,
                                           bool operand);
template <>
__device__ __forceinline__ void store_pair<TagF32>(unsigned char* row, int col, float v0,
                                                   float v1, bool operand) {
  uint32_t* p = reinterpret_cast<uint32_t*>(row + col * 4);
  if (operand) {
    p[0] = tf32_bits(v0);
    p[1] = tf32_bits(v1);
  } else {
    reinterpret_cast<float*>(p)[0] = v0;
    reinterpret_cast<float*>(p)[1] = v1;
  }
}
template <>
__device__ __forceinline__ void store_pair<TagBF16>(unsigned char* row, int col, float v0,
                                                    float v1, bool) {
  *reinterpret_cast<uint32_t*>(row + col * 2) =
      static_cast<uint32_t>(bf16_bits(v0)) | (static_cast<uint32_t>(bf16_bits(v1)) << 16);
}
template <>
__device__ __forceinline__ void store_pair<TagF16>(unsigned char* row, int col, float v0,
                                                   float v1, bool) {
  *reinterpret_cast<uint32_t*>(row + col * 2) =
      static_cast<uint32_t>(f16_bits(v0)) | (static_cast<uint32_t>(f16_bits(v1)) << 16);
}

// A fragment (16 rows x one 32-byte k-step) from two smem row pointers (rows g and g+8), each
// already offset to the k-step.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const unsigned char* row_g,
                                       const unsigned char* row_g8, int t) {
  const uint32_t* r0 = reinterpret_cast<const uint32_t*>(row_g);
  const uint32_t* r8 = reinterpret_cast<const uint32_t*>(row_g8);
  a[0] = r0[t];
  a[1] = r8[t];
  a[2] = r0[t + 4];
  a[3] = r8[t + 4];
}

// ---------------------------------------------------------------------------------------------
// The fused kernel. RP: ranks padded to 16/32/64; MT2: output m-tiles (16 pixels) per warp row,
// so a tile holds M = 64 * MT2 pixels; WN: warps splitting the columns (RP/8 must divide by WN).
template <typename Tag, int RP, int MT2, int WN>
__global__ void __launch_bounds__(threads_for(WN))
    tt_conv_fused_kernel(const FusedParams p) {
  constexpr int S = Tag::kBytes;
  constexpr int NT = threads_for(WN);
  constexpr int RT = RP / 8;             // n-tiles over a rank
  constexpr int RTW = RT / WN;           // ... per warp
  static_assert(RT % WN == 0, "WN must divide the rank's n-tiles");
  constexpr int OTW = 8 / WN;            // stage-3 n-tiles per warp per 64-channel group
  constexpr int RKS = RP * S / 32;       // k-steps over a rank
  constexpr int M = 64 * MT2;
  TT_DYN_SMEM(smem);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;

  int b = blockIdx.x;
  const int tw_idx = b % p.tiles_w;
  b /= p.tiles_w;
  const int th_idx = b % p.tiles_h;
  const int n = b / p.tiles_h;
  const int oh0 = th_idx * p.TH, ow0 = tw_idx * p.TW;
  const int ih0 = oh0 * p.sh - p.ph, iw0 = ow0 * p.sw - p.pw;

  const SmemLayout L = smem_layout(p.PH, p.PW, M, RP, S, p.stages);
  const int nst = p.stages;  // buffer b starts at smem + b * L.xbuf
  unsigned char* t1s = smem + L.t1_off;
  unsigned char* t2s = smem + L.t2_off;
  unsigned char* ys = smem;  // reuses the X buffers once stage 1 is done

  // ---- stage 1: T1 = X_patch . A, streamed over channel chunks, in passes of 128 patch rows.
  const int nchunks = (p.c_ksteps + 3) / 4;
  const int npasses = (L.Pp + kRowsPerPass - 1) / kRowsPerPass;
  const int niters = nchunks * npasses;
  const size_t row_bytes = static_cast<size_t>(p.C) * S;
  const int cbytes = p.C * S;

  auto load_chunk = [&](int it, unsigned char* buf) {
    const int pass = it / nchunks, ch = it - pass * nchunks;
    const int row0 = pass * kRowsPerPass;
    constexpr int kVecs = kChunkBytes / 16;
    for (int idx = tid; idx < L.xbuf_rows * kVecs; idx += NT) {
      const int r = idx / kVecs, v = idx - r * kVecs;
      const int prow = row0 + r;
      const int pi = prow / p.PW, pj = prow - pi * p.PW;
      const int ih = ih0 + pi, iw = iw0 + pj;
      const int cb = ch * kChunkBytes + v * 16;
      const bool valid = prow < L.P && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W && cb < cbytes;
      const unsigned char* src =
          valid ? p.x + (static_cast<size_t>(n * p.H + ih) * p.W + iw) * row_bytes + cb : p.x;
      cp_async16(buf + r * L.xrow + v * 16, src, valid);
    }
    // The chunk's packed weights: k-steps ch*4 .. ch*4+3 are contiguous in w1.
    constexpr int kWVecs = 4 * RT * 32 * 8 / 16;
    const int wvalid = ((p.c_ksteps - ch * 4 < 4 ? p.c_ksteps - ch * 4 : 4) * RT * 32 * 8) / 16;
    const unsigned char* wsrc =
        reinterpret_cast<const unsigned char*>(p.w1) + static_cast<size_t>(ch) * 4 * RT * 32 * 8;
    unsigned char* wdst = buf + L.xbuf_rows * L.xrow;
    for (int idx = tid; idx < kWVecs; idx += NT) {
      const bool valid = idx < wvalid;
      cp_async16(wdst + idx * 16, valid ? wsrc + idx * 16 : wsrc, valid);
    }
  };

  float acc1[kMT1][RTW][4];
  // Multistage pipeline: chunks it+1 .. it+nst-1 are in flight while chunk it is multiplied.
  for (int st = 0; st < nst - 1; ++st) {
    if (st < niters) load_chunk(st, smem + st * L.xbuf);
    cp_async_commit();
  }
  for (int it = 0; it < niters; ++it) {
    const int pass = it / nchunks, ch = it - pass * nchunks;
    if (ch == 0) {
#pragma unroll
      for (int i = 0; i < kMT1; ++i)
#pragma unroll
        for (int j = 0; j < RTW; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc1[i][j][r] = 0.f;
    }
    // Chunk `it` is group `it`; the nst-2 groups committed after it may still be in flight.
    if (nst == 4) {
      cp_async_wait<2>();
    } else if (nst == 3) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    block_sync();  // chunk `it` visible to all; everyone is done with chunk it-1's buffer
    {
      const int nxt = it + nst - 1;
      if (nxt < niters) load_chunk(nxt, smem + (nxt % nst) * L.xbuf);
      cp_async_commit();
    }
    const unsigned char* cur = smem + (it % nst) * L.xbuf;
    const uint2* wsm = reinterpret_cast<const uint2*>(cur + L.xbuf_rows * L.xrow) + lane;
    const int row0 = pass * kRowsPerPass;
    const int nks = p.c_ksteps - ch * 4 < 4 ? p.c_ksteps - ch * 4 : 4;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      if (ks < nks) {
        uint2 bw[RTW];
#pragma unroll
        for (int j = 0; j < RTW; ++j) bw[j] = wsm[(ks * RT + wn * RTW + j) * 32];
        uint32_t a[kMT1][4];
#pragma unroll
        for (int i = 0; i < kMT1; ++i) {
          const int lr = (wm + kWarpsM * i) * 16;  // local row of this m-tile
          if (row0 + lr < L.Pp) {
            load_a(a[i], cur + (lr + g) * L.xrow + ks * 32, cur + (lr + g + 8) * L.xrow + ks * 32,
                   t);
          }
        }
#pragma unroll
        for (int j = 0; j < RTW; ++j) {
#pragma unroll
          for (int i = 0; i < kMT1; ++i) {
            if (row0 + (wm + kWarpsM * i) * 16 < L.Pp) mma<Tag>(acc1[i][j], a[i], bw[j]);
          }
        }
      }
    }
    if (ch == nchunks - 1) {
#pragma unroll
      for (int i = 0; i < kMT1; ++i) {
        const int row = row0 + (wm + kWarpsM * i) * 16 + g;
        if (row0 + (wm + kWarpsM * i) * 16 < L.Pp) {
#pragma unroll
          for (int j = 0; j < RTW; ++j) {
            const int col = (wn * RTW + j) * 8 + 2 * t;
            store_pair<Tag>(t1s + row * L.t1row, col, acc1[i][j][0], acc1[i][j][1], true);
            store_pair<Tag>(t1s + (row + 8) * L.t1row, col, acc1[i][j][2], acc1[i][j][3], true);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  block_sync();

  // ---- stage 2: T2 = sum over taps of T1[gathered rows] . B_tap (implicit im2col from smem).
  int base0[MT2], base8[MT2];
#pragma unroll
  for (int i = 0; i < MT2; ++i) {
    const int q0 = (wm + kWarpsM * i) * 16 + g, q8 = q0 + 8;
    const int qi0 = q0 / p.TW, qj0 = q0 - qi0 * p.TW;
    const int qi8 = q8 / p.TW, qj8 = q8 - qi8 * p.TW;
    base0[i] = qi0 * p.sh * p.PW + qj0 * p.sw;
    base8[i] = qi8 * p.sh * p.PW + qj8 * p.sw;
  }
  float acc2[MT2][RTW][4];
#pragma unroll
  for (int i = 0; i < MT2; ++i)
#pragma unroll
    for (int j = 0; j < RTW; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc2[i][j][r] = 0.f;
  // Stage 3's B fragments for the next 64-channel group are loaded one group ahead (from L2),
  // so their latency overlaps this group's MMAs and stores; the first group's during stage 2.
  constexpr bool kPrefetch3 = RKS * OTW <= 16;
  const int ngroups = (p.nt3 + 7) / 8;
  uint2 b3[kPrefetch3 ? RKS : 1][OTW];
  auto load_b3 = [&](int grp, uint2 (&dst)[kPrefetch3 ? RKS : 1][OTW]) {
#pragma unroll
    for (int ks = 0; ks < (kPrefetch3 ? RKS : 1); ++ks)
#pragma unroll
      for (int j = 0; j < OTW; ++j) {
        const int nt = grp * 8 + wn * OTW + j;
        dst[ks][j] = nt < p.nt3
                         ? load_weights(p.w3 + (static_cast<size_t>(ks) * p.nt3 + nt) * 32 + lane)
                         : uint2{0u, 0u};
      }
  };
  if (kPrefetch3) load_b3(0, b3);
  for (int kh = 0; kh < p.KH; ++kh) {
    for (int kw = 0; kw < p.KW; ++kw) {
      const int toff = kh * p.dh * p.PW + kw * p.dw;
      const uint2* wtap =
          p.w2 + static_cast<size_t>(kh * p.KW + kw) * RKS * RT * 32 + wn * RTW * 32 + lane;
#pragma unroll
      for (int ks = 0; ks < RKS; ++ks) {
        uint2 bw[RTW];
#pragma unroll
        for (int j = 0; j < RTW; ++j) bw[j] = load_weights(wtap + (ks * RT + j) * 32);
        uint32_t a[MT2][4];
#pragma unroll
        for (int i = 0; i < MT2; ++i) {
          load_a(a[i], t1s + (base0[i] + toff) * L.t1row + ks * 32,
                 t1s + (base8[i] + toff) * L.t1row + ks * 32, t);
        }
#pragma unroll
        for (int j = 0; j < RTW; ++j) {
#pragma unroll
          for (int i = 0; i < MT2; ++i) mma<Tag>(acc2[i][j], a[i], bw[j]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MT2; ++i) {
    const int row = (wm + kWarpsM * i) * 16 + g;
#pragma unroll
    for (int j = 0; j < RTW; ++j) {
      const int col = (wn * RTW + j) * 8 + 2 * t;
      store_pair<Tag>(t2s + row * L.t2row, col, acc2[i][j][0], acc2[i][j][1], true);
      store_pair<Tag>(t2s + (row + 8) * L.t2row, col, acc2[i][j][2], acc2[i][j][3], true);
    }
  }
  block_sync();

  // ---- stage 3: Y = T2 . Cm + bias, 64 output channels per pass, staged for 16-byte stores.
  constexpr int kOutVecs = kOutChans * S / 16;  // 16-byte vectors per staged row
  for (int grp = 0; grp < ngroups; ++grp) {
    float acc3[MT2][OTW][4];
#pragma unroll
    for (int i = 0; i < MT2; ++i)
#pragma unroll
      for (int j = 0; j < OTW; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc3[i][j][r] = 0.f;
#pragma unroll
    for (int ks = 0; ks < RKS; ++ks) {
      uint2 bw[OTW];
#pragma unroll
      for (int j = 0; j < OTW; ++j) {
        const int nt = grp * 8 + wn * OTW + j;
        if (kPrefetch3) {
          bw[j] = b3[kPrefetch3 ? ks : 0][j];
        } else {
          bw[j] = nt < p.nt3
                      ? load_weights(p.w3 + (static_cast<size_t>(ks) * p.nt3 + nt) * 32 + lane)
                      : uint2{0u, 0u};
        }
      }
      uint32_t a[MT2][4];
#pragma unroll
      for (int i = 0; i < MT2; ++i) {
        const int row = (wm + kWarpsM * i) * 16 + g;
        load_a(a[i], t2s + row * L.t2row + ks * 32, t2s + (row + 8) * L.t2row + ks * 32, t);
      }
#pragma unroll
      for (int j = 0; j < OTW; ++j) {
        if (grp * 8 + wn * OTW + j < p.nt3) {
#pragma unroll
          for (int i = 0; i < MT2; ++i) mma<Tag>(acc3[i][j], a[i], bw[j]);
        }
      }
    }
    if (kPrefetch3 && grp + 1 < ngroups) load_b3(grp + 1, b3);
#pragma unroll
    for (int i = 0; i < MT2; ++i) {
      const int row = (wm + kWarpsM * i) * 16 + g;
#pragma unroll
      for (int j = 0; j < OTW; ++j) {
        const int col = (wn * OTW + j) * 8 + 2 * t;
        const int c = grp * kOutChans + col;
        float b0 = 0.f, b1 = 0.f;
        if (p.bias != nullptr && c < p.K) {
          b0 = p.bias[c];
          b1 = p.bias[c + 1];  // K is a multiple of the vector width, so c + 1 < K too
        }
        store_pair<Tag>(ys + row * L.yrow, col, acc3[i][j][0] + b0, acc3[i][j][1] + b1, false);
        store_pair<Tag>(ys + (row + 8) * L.yrow, col, acc3[i][j][2] + b0, acc3[i][j][3] + b1, false);
      }
    }
    block_sync();
    for (int idx = tid; idx < M * kOutVecs; idx += NT) {
      const int row = idx / kOutVecs, v = idx - row * kOutVecs;
      const int qi = row / p.TW, qj = row - qi * p.TW;
      const int oh = oh0 + qi, ow = ow0 + qj;
      const int cb = grp * kOutChans * S + v * 16;
      if (oh < p.Ho && ow < p.Wo && cb < p.K * S) {
        stg128(p.y + (static_cast<size_t>(n * p.Ho + oh) * p.Wo + ow) * p.K * S + cb,
               lds128(ys + row * L.yrow + v * 16));
      }
    }
    block_sync();
  }
}

// ---------------------------------------------------------------------------------------------
// Weight packing: writes dst[((tap * ksteps + ks) * ntiles + nt) * 32 + lane] = the B fragment
// (two k-words) of lane `lane` for k-step ks and n-tile nt, where the logical B matrix is
//   B[k][nn] = src[k * sk + nn * sn + tap offset],  zero for k >= kd or nn >= nd,
// and the tap offset is kh * skh + kw * skw with (kh, kw) optionally flipped (for the
// transposed convolution of the input gradient).
struct PackJob {
  const unsigned char* src;
  uint2* dst;
  int kd, nd, ksteps, ntiles, taps, KH, KW, flip;
  long long sk, sn, skh, skw;
};

template <typename Tag>
__device__ __forceinline__ uint32_t pack_word(const PackJob& j, long long tap_off, int k0, int nn) {
  if (Tag::kBytes == 4) {
    if (k0 >= j.kd || nn >= j.nd) return 0u;
    const float v = reinterpret_cast<const float*>(j.src)[k0 * j.sk + nn * j.sn + tap_off];
    return tf32_bits(v);
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(j.src);
    const uint32_t lo = (k0 < j.kd && nn < j.nd) ? s[k0 * j.sk + nn * j.sn + tap_off] : 0u;
    const uint32_t hi = (k0 + 1 < j.kd && nn < j.nd) ? s[(k0 + 1) * j.sk + nn * j.sn + tap_off] : 0u;
    return lo | (hi << 16);
  }
}

template <typename Tag>
__global__ void tt_conv_pack_kernel(const PackJob j0, const PackJob j1, const PackJob j2) {
  const PackJob& j = blockIdx.y == 0 ? j0 : (blockIdx.y == 1 ? j1 : j2);
  const long long total = static_cast<long long>(j.taps) * j.ksteps * j.ntiles * 32;
  constexpr int kElemsPerWord = 4 / Tag::kBytes;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(idx % 32);
    long long rest = idx / 32;
    const int nt = static_cast<int>(rest % j.ntiles);
    rest /= j.ntiles;
    const int ks = static_cast<int>(rest % j.ksteps);
    const int tap = static_cast<int>(rest / j.ksteps);
    int kh = tap / j.KW, kw = tap - (tap / j.KW) * j.KW;
    if (j.flip) {
      kh = j.KH - 1 - kh;
      kw = j.KW - 1 - kw;
    }
    const long long tap_off = kh * j.skh + kw * j.skw;
    const int g = lane / 4, t = lane % 4;
    const int nn = nt * 8 + g;
    uint2 out;
    out.x = pack_word<Tag>(j, tap_off, (ks * 8 + t) * kElemsPerWord, nn);
    out.y = pack_word<Tag>(j, tap_off, (ks * 8 + t + 4) * kElemsPerWord, nn);
    j.dst[idx] = out;
  }
}


// ---------------------------------------------------------------------------------------------
// Host-side planning, shared by conv_cuda.cu and the emulator.

// Geometry of one fused launch: "in" channels C go through ranks (r1, r2) to "out" channels K.
struct FusedGeom {
  int N, C, H, W, K, r1, r2, KH, KW, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

struct FusedPlan {
  bool ok = false;
  const char* why = "";
  int RP = 0, MT2 = 0, TH = 0, TW = 0, PH = 0, PW = 0, tiles_h = 0, tiles_w = 0, smem = 0;
  int stages = 2;
  int WN = 2;  // warps across the columns: the block has threads_for(WN) threads
  long long blocks = 0;
};

// Picks a tile for the fused kernel, or says why it cannot run (the caller then falls back to
// the composition of cuDNN convolutions). force_th/force_tw/force_stages/force_wn (0 = automatic)
// pin the tile, the pipeline depth and the column split of the warps.
__host__ inline FusedPlan plan_fused(const FusedGeom& g, int bytes, int max_smem, int num_sms,
                                     int force_th = 0, int force_tw = 0, int force_stages = 0,
                                     int force_wn = 0) {
  FusedPlan plan;
  const int r = g.r1 > g.r2 ? g.r1 : g.r2;
  if (r > 64) {
    plan.why = "ranks above 64";
    return plan;
  }
  if ((g.C * bytes) % 16 != 0 || (g.K * bytes) % 16 != 0) {
    plan.why = "channel counts not a multiple of 16 bytes";
    return plan;
  }
  plan.RP = r <= 16 ? 16 : (r <= 32 ? 32 : 64);
  static const int kTiles[][2] = {{8, 8},  {4, 16}, {16, 4}, {2, 32}, {32, 2}, {1, 64},
                                  {8, 16}, {16, 8}, {4, 32}, {32, 4}, {2, 64}};
  const long long cpad = (g.C + 15) / 16 * 16, kpad = (g.K + 7) / 8 * 8;
  double best = -1;
  for (const auto& tile : kTiles) {
    const int th = tile[0], tw = tile[1], m = th * tw;
    if (force_th > 0 && (th != force_th || tw != force_tw)) continue;
    // (v1 kept 16-bit data on 64-pixel tiles; with the v2 warp split the cost model's choice is
    // as fast or faster at every WRN shape: docs/benchmarks.md, v2 sweep.)
    const int ph = (th - 1) * g.sh + (g.KH - 1) * g.dh + 1;
    const int pw = (tw - 1) * g.sw + (g.KW - 1) * g.dw + 1;
    const long long tiles_h = (g.Ho + th - 1) / th, tiles_w = (g.Wo + tw - 1) / tw;
    const long long blocks = static_cast<long long>(g.N) * tiles_h * tiles_w;
    // A deeper pipeline when the grid is too small to hide load latency with more blocks (four
    // stages measured no faster than three at 640@8x8: docs/benchmarks.md, tile sweep v2).
    int stages = force_stages > 0 ? force_stages : (blocks <= 2LL * num_sms ? 3 : 2);
    SmemLayout L = smem_layout(ph, pw, m, plan.RP, bytes, stages);
    while (L.total > max_smem && stages > 2 && force_stages == 0) {
      --stages;
      L = smem_layout(ph, pw, m, plan.RP, bytes, stages);
    }
    if (L.total > max_smem) continue;
    if (blocks > 0x7fffffffLL) continue;
    // Tensor-core work per tile (padded shapes), plus the halo's extra loads, per block.
    double cost = static_cast<double>(blocks) *
                  (static_cast<double>(L.Pp) * cpad * plan.RP +
                   static_cast<double>(m) * g.KH * g.KW * plan.RP * plan.RP +
                   static_cast<double>(m) * plan.RP * kpad);
    // Too few blocks leave SMs idle: a mild penalty below two waves of blocks.
    const double want = 2.0 * num_sms;
    if (blocks < want) cost *= 1.0 + 0.5 * (want - blocks) / want;
    if (best < 0 || cost < best) {
      best = cost;
      plan.ok = true;
      plan.MT2 = m / 64;
      plan.TH = th;
      plan.TW = tw;
      plan.PH = ph;
      plan.PW = pw;
      plan.tiles_h = static_cast<int>(tiles_h);
      plan.tiles_w = static_cast<int>(tiles_w);
      plan.smem = L.total;
      plan.stages = stages;
      plan.blocks = blocks;
    }
  }
  if (!plan.ok) {
    plan.why = force_th > 0 ? "forced tile does not fit" : "no tile fits in shared memory";
    return plan;
  }
  // 16 warps when the grid leaves one block per SM (e.g. 8x8 images) and the rank has the
  // n-tiles to split four ways; else 8 warps, which lets two or three blocks share an SM.
  if (force_wn == 2 || (force_wn == 4 && plan.RP >= 32)) {
    plan.WN = force_wn;
  } else {
    plan.WN = plan.RP >= 32 && plan.blocks <= num_sms ? 4 : 2;
  }
  return plan;
}

__host__ inline FusedParams make_params(const FusedGeom& g, const FusedPlan& plan, int bytes,
                                        const void* x, void* y, const uint2* w1, const uint2* w2,
                                        const uint2* w3, const float* bias) {
  FusedParams p;
  p.x = static_cast<const unsigned char*>(x);
  p.y = static_cast<unsigned char*>(y);
  p.w1 = w1;
  p.w2 = w2;
  p.w3 = w3;
  p.bias = bias;
  p.N = g.N; p.H = g.H; p.W = g.W; p.C = g.C; p.Ho = g.Ho; p.Wo = g.Wo; p.K = g.K;
  p.KH = g.KH; p.KW = g.KW; p.sh = g.sh; p.sw = g.sw; p.ph = g.ph; p.pw = g.pw;
  p.dh = g.dh; p.dw = g.dw;
  p.TH = plan.TH; p.TW = plan.TW; p.PH = plan.PH; p.PW = plan.PW; p.stages = plan.stages;
  p.tiles_h = plan.tiles_h; p.tiles_w = plan.tiles_w;
  p.c_ksteps = (g.C * bytes + 31) / 32;
  p.nt3 = (g.K + 7) / 8;
  return p;
}

// Sizes (in uint2 words) of the three packed weight blocks.
struct PackSizes {
  long long w1, w2, w3;
};
__host__ inline PackSizes pack_sizes(const FusedGeom& g, int RP, int bytes) {
  const long long rks = RP * bytes / 32, rt = RP / 8;
  return {static_cast<long long>((g.C * bytes + 31) / 32) * rt * 32,
          static_cast<long long>(g.KH) * g.KW * rks * rt * 32,
          rks * ((g.K + 7) / 8) * 32};
}

// Pack jobs for the forward (transposed = false: in = input channels C, out = K) or for the
// input gradient (transposed = true: the geometry's "C" is the conv's K and "K" is its C; the
// kernel taps are flipped). core0 [r1, C0], core1 [r2, r1, KH, KW], core2 [K0, r2] are the
// contiguous cores of the convolution itself (C0, K0 its own channel counts).
__host__ inline void make_pack_jobs(PackJob (&jobs)[3], bool transposed, const void* core0,
                                    const void* core1, const void* core2, int C0, int K0, int r1,
                                    int r2, int KH, int KW, int RP, int bytes, uint2* dst) {
  const long long taps = static_cast<long long>(KH) * KW;
  const int rks = RP * bytes / 32, rt = RP / 8;
  const int cin = transposed ? K0 : C0, cout = transposed ? C0 : K0;
  const int ra = transposed ? r2 : r1, rb = transposed ? r1 : r2;
  PackJob& j1 = jobs[0];
  PackJob& j2 = jobs[1];
  PackJob& j3 = jobs[2];
  // Stage 1: B[k = input channel][n = first rank].
  j1.src = static_cast<const unsigned char*>(transposed ? core2 : core0);
  j1.kd = cin; j1.nd = ra; j1.ksteps = (cin * bytes + 31) / 32; j1.ntiles = rt; j1.taps = 1;
  j1.KH = 1; j1.KW = 1; j1.flip = 0; j1.skh = 0; j1.skw = 0;
  j1.sk = transposed ? r2 : 1;   // core2[k, b] = k * r2 + b ; core0[a, c] = a * C0 + c
  j1.sn = transposed ? 1 : C0;
  // Stage 2: B_tap[k = first rank][n = second rank] from core1[b, a, kh, kw].
  j2.src = static_cast<const unsigned char*>(core1);
  j2.kd = ra; j2.nd = rb; j2.ksteps = rks; j2.ntiles = rt; j2.taps = static_cast<int>(taps);
  j2.KH = KH; j2.KW = KW; j2.flip = transposed ? 1 : 0; j2.skh = KW; j2.skw = 1;
  j2.sk = transposed ? static_cast<long long>(r1) * taps : taps;  // forward: k = a; igrad: k = b
  j2.sn = transposed ? taps : static_cast<long long>(r1) * taps;
  // Stage 3: B[k = second rank][n = output channel].
  j3.src = static_cast<const unsigned char*>(transposed ? core0 : core2);
  j3.kd = rb; j3.nd = cout; j3.ksteps = rks; j3.ntiles = (cout + 7) / 8; j3.taps = 1;
  j3.KH = 1; j3.KW = 1; j3.flip = 0; j3.skh = 0; j3.skw = 0;
  j3.sk = transposed ? C0 : 1;   // core0[a, c] = a * C0 + c ; core2[k, b] = k * r2 + b
  j3.sn = transposed ? 1 : r2;
  FusedGeom gg{};
  gg.C = cin; gg.K = cout; gg.KH = KH; gg.KW = KW;
  const PackSizes sz = pack_sizes(gg, RP, bytes);
  j1.dst = dst;
  j2.dst = dst + sz.w1;
  j3.dst = dst + sz.w1 + sz.w2;
}

}  // namespace ttconv
}  // namespace torchrec_tt
