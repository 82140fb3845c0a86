// A CPU emulator of the few CUDA features the fused TT-conv kernels use, so that
// csrc/conv_cuda_kernels.cuh can be checked on a machine without a GPU: every CUDA thread of a
// block is a std::thread, __syncthreads is a std::barrier, and each warp-level mma.sync gathers
// the 32 lanes' fragments through a per-warp barrier and computes exactly the lane ownership that
// the PTX ISA documents. cp.async is a synchronous copy (zero-fill when the source size is 0).
// Rounding follows the hardware: tf32 operands drop their low 13 mantissa bits, cvt.rna rounds
// half away from zero, bf16/f16 conversions round to nearest even.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint2 {
  uint32_t x, y;
};
struct uint4 {
  uint32_t x, y, z, w;
};

namespace emu {
struct Idx {
  unsigned x, y, z;
};
struct Frag {
  uint32_t a[4];
  uint2 b;
};
struct Block {
  std::unique_ptr<std::barrier<>> block_bar;
  std::unique_ptr<std::barrier<>> warp_bar[32];
  unsigned char* smem = nullptr;
  Idx bidx{}, bdim{}, gdim{};
  Frag frag[32][32];
};
inline thread_local Block* cur = nullptr;
inline thread_local unsigned cur_tid = 0;
inline long long mma_count = 0;  // not thread-safe; only a rough statistic

// Runs body() once per thread of every block of a gx x gy grid.
template <typename F>
void launch(unsigned gx, unsigned gy, unsigned threads, size_t smem_bytes, F body) {
  std::vector<unsigned char> smem(smem_bytes + 16);
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      Block blk;
      blk.block_bar = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
        blk.warp_bar[w] = std::make_unique<std::barrier<>>(32);
      }
      std::memset(smem.data(), 0xCD, smem.size());  // poison: reads of unwritten smem show up
      blk.smem = smem.data();
      blk.bidx = {bx, by, 0};
      blk.bdim = {threads, 1, 1};
      blk.gdim = {gx, gy, 1};
      std::vector<std::thread> ts;
      ts.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        ts.emplace_back([&blk, t, &body] {
          cur = &blk;
          cur_tid = t;
          body();
        });
      }
      for (auto& th : ts) th.join();
    }
  }
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 1024), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}
inline uint16_t float_to_half_rne(float f) {
  // Exhaustive-enough reference: pick the nearest representable half (ties to even).
  const uint32_t sign = std::signbit(f) ? 0x8000u : 0u;
  const float a = std::fabs(f);
  if (std::isnan(f)) return 0x7e00;
  if (a == 0.f) return static_cast<uint16_t>(sign);
  if (a >= 65520.f) return static_cast<uint16_t>(sign | 0x7c00);
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp_field = e - 1 + 15;
  int shift = exp_field >= 1 ? (e - 11) : -24;  // value of one ulp = 2^shift
  const double q = static_cast<double>(a) / std::ldexp(1.0, shift);
  double r = std::nearbyint(q);  // default rounding mode: ties to even
  uint32_t m = static_cast<uint32_t>(r);
  uint32_t out;
  if (exp_field >= 1) {
    if (m >= 2048) {
      m >>= 1;
      exp_field += 1;
    }
    if (exp_field >= 31) return static_cast<uint16_t>(sign | 0x7c00);
    out = (static_cast<uint32_t>(exp_field) << 10) | (m & 1023);
  } else {
    out = m;  // subnormal (m == 1024 rolls into the smallest normal correctly)
  }
  return static_cast<uint16_t>(sign | out);
}
}  // namespace emu

#define threadIdx (emu::Idx{emu::cur_tid, 0, 0})
#define blockIdx (emu::cur->bidx)
#define blockDim (emu::cur->bdim)
#define gridDim (emu::cur->gdim)
#define TT_DYN_SMEM(name) unsigned char* name = emu::cur->smem

namespace torchrec_tt {
namespace ttconv {

inline uint32_t tf32_bits(float v) {  // cvt.rna.tf32.f32
  uint32_t u = emu::float_to_bits(v);
  u += 0x1000u;
  return u & 0xffffe000u;
}
inline uint16_t bf16_bits(float v) {
  const uint32_t u = emu::float_to_bits(v);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline uint16_t f16_bits(float v) { return emu::float_to_half_rne(v); }

template <int Kind>
inline float operand_elem(uint32_t word, int e) {
  if (Kind == 0) return emu::bits_to_float(word & 0xffffe000u);  // tf32 ignores low bits
  const uint16_t h = static_cast<uint16_t>(e == 0 ? (word & 0xffffu) : (word >> 16));
  if (Kind == 1) return emu::bits_to_float(static_cast<uint32_t>(h) << 16);
  return emu::half_to_float(h);
}

template <typename Tag>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  emu::Block* B = emu::cur;
  const unsigned tid = emu::cur_tid, warp = tid / 32, lane = tid % 32;
  emu::Frag* F = B->frag[warp];
  for (int r = 0; r < 4; ++r) F[lane].a[r] = a[r];
  F[lane].b = b;
  B->warp_bar[warp]->arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  constexpr int epw = Tag::kBytes == 4 ? 1 : 2;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
    double sum = 0;
    for (int kw = 0; kw < 8; ++kw) {
      const uint32_t aw = F[(row % 8) * 4 + kw % 4].a[(row / 8) + 2 * (kw / 4)];
      const uint2 bb = F[col * 4 + kw % 4].b;
      const uint32_t bw = (kw / 4) == 0 ? bb.x : bb.y;
      for (int e = 0; e < epw; ++e) {
        sum += static_cast<double>(operand_elem<Tag::kKind>(aw, e)) *
               operand_elem<Tag::kKind>(bw, e);
      }
    }
    d[r] += static_cast<float>(sum);
  }
  B->warp_bar[warp]->arrive_and_wait();
  if (lane == 0) ++emu::mma_count;
}

inline void cp_async16(void* smem, const void* gmem, bool valid) {
  if (valid) {
    std::memcpy(smem, gmem, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
inline void block_sync() { emu::cur->block_bar->arrive_and_wait(); }
inline uint2 load_weights(const uint2* p) { return *p; }
inline uint4 lds128(const unsigned char* p) {
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void stg128(unsigned char* p, uint4 v) { std::memcpy(p, &v, 16); }

}  // namespace ttconv
}  // namespace torchrec_tt
