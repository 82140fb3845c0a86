// The error-bounded lossy codec of sharding/lossy_codec.py (issue 16) in C++: the per-value
// arithmetic, the bit packing and the row layout, shared by the CPU implementation
// (lossy_codec_cpu.cpp), the CUDA kernels (lossy_codec_kernels.cuh) and their CPU emulation
// (tools/conv_emu/lossy_emu_test.cpp). No ATen here, so the emulation builds without torch.
//
// Wire format (bit-identical to the torch-op reference, encode_groups_reference): a row (one
// chunk) holds G groups of n float32 values. It starts with the G headers (min, max as float32,
// 8 bytes, group order), then the groups' codes ordered by code width and then group index.
// Group g with b = bits[g] takes W = ceil(n / 8) words of 8 codes, W * b bytes:
//   b <= 8: word w is b bytes at w * b, code i of the word at bit b * i (little-endian);
//   b >  8: region A, the low byte of every code (word w: 8 bytes at 8 * w), then region B, the
//           high b - 8 bits packed as above (word w: b - 8 bytes at 8 * W + w * (b - 8)).
// A value x of a group with extremes (mn, mx) is coded as
//   s = 0.5 if mx - mn overflows else 1;  r = mx * s - mn * s
//   q = clamp(round_half_even(((x * s - mn * s) / r) * L), 0, L)   (q = 0 when r == 0)
// with L = 2^b - 1, and decodes to clamp((mn * s + (q * fl(1 / L)) * r) / s, mn, mx), every
// operation rounded once in float32 as the torch ops of the reference do (no FMA contraction).
// Bad groups (a NaN or +-inf among the values) are sent with a NaN header and zero codes; they
// decode to NaN, and the encoder reports them (see lossy_codec_cpu.cpp / lossy_codec_cuda.cu).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__CUDACC__)
#define LC_HD __host__ __device__ __forceinline__
#else
#define LC_HD inline
#endif

namespace torchrec_tt {
namespace lossy {

constexpr int kHeaderBytes = 8;
constexpr int kMaxBits = 16;
constexpr float kFloatMax = 3.402823466e+38f;

// IEEE float32 operations rounded once each. On the device the _rn intrinsics also keep nvcc
// from contracting a * b + c into an FMA (the reference rounds the product first). On the host
// (x86-64 SSE, no -mfma, ISO C++ so -ffp-contract=off) plain operators do the same.
LC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LC_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LC_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LC_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// torch.round (half to even) of x in [0, 2^16): on the host (x + 2^23) - 2^23, exact in
// round-to-nearest-even for 0 <= x < 2^23, which the compiler inlines (nearbyintf is a libm call
// without SSE4.1); on the device rintf is one instruction.
LC_HD float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  constexpr float kShift = 8388608.0f;  // 2^23
  return (x + kShift) - kShift;
#endif
}
// False for NaN and +-inf.
LC_HD bool finite(float x) { return fabsf(x) <= kFloatMax; }

// The per-group constants of the arithmetic above.
struct Quant {
  float mn, mx;      // the group's extremes (the header)
  float s;           // 1, or 0.5 where mx - mn overflows float32
  float lo_s;        // mn * s
  float r;           // mx * s - mn * s
  float levels;      // 2^b - 1
  float inv_levels;  // fl(1 / (2^b - 1)), rounded from double as Python's 1.0 / levels is
};

LC_HD Quant make_quant(float mn, float mx, int bits) {
  Quant q;
  q.mn = mn;
  q.mx = mx;
  const float d = sub_rn(mx, mn);
  q.s = fabsf(d) > kFloatMax ? 0.5f : 1.0f;  // torch.isinf(mx - mn) (false for NaN)
  q.lo_s = mul_rn(mn, q.s);
  q.r = sub_rn(mul_rn(mx, q.s), q.lo_s);
  const unsigned levels = (1u << bits) - 1u;
  q.levels = static_cast<float>(levels);
  q.inv_levels = static_cast<float>(1.0 / static_cast<double>(levels));
  return q;
}

LC_HD uint32_t quantize(float x, const Quant& q) {
  const float xs = mul_rn(x, q.s);
  const float unit = q.r > 0.0f ? div_rn(sub_rn(xs, q.lo_s), q.r) : 0.0f;
  float c = round_even(mul_rn(unit, q.levels));
  c = c > 0.0f ? c : 0.0f;
  c = c < q.levels ? c : q.levels;
  return static_cast<uint32_t>(c);
}

LC_HD float dequantize(uint32_t code, const Quant& q) {
  const float t = mul_rn(mul_rn(static_cast<float>(code), q.inv_levels), q.r);
  float v = div_rn(add_rn(q.lo_s, t), q.s);
  if (v != v) return v;  // a bad group's NaN header: NaN out (torch.maximum propagates NaN)
  v = v < q.mn ? q.mn : v;
  v = v > q.mx ? q.mx : v;
  return v;
}

// 8 codes of nb (1..8) bits -> the nb low bytes of the result, code i at bit nb * i.
LC_HD uint64_t pack8(const uint32_t (&codes)[8], int nb, int shift) {
  uint64_t w = 0;
  const uint32_t mask = (1u << nb) - 1u;
  for (int i = 0; i < 8; ++i) w |= static_cast<uint64_t>((codes[i] >> shift) & mask) << (nb * i);
  return w;
}

// Bytes per word in region A (all codes' low min(b, 8) bits) and region B (the rest).
LC_HD int bytes_a(int bits) { return bits < 8 ? bits : 8; }
LC_HD int bytes_b(int bits) { return bits > 8 ? bits - 8 : 0; }

// Where things are in a row: payload offsets by group, and the encoded size.
struct Plan {
  int64_t groups = 0;
  int64_t n = 0;      // values per group
  int64_t words = 0;  // ceil(n / 8)
  int64_t encoded_bytes = 0;
  std::vector<int64_t> offset;  // byte offset of group g's codes in its row
};

inline Plan make_plan(const int64_t* bits, int64_t groups, int64_t n) {
  Plan p;
  p.groups = groups;
  p.n = n;
  p.words = (n + 7) / 8;
  p.offset.assign(static_cast<size_t>(groups), 0);
  if (n == 0 || groups == 0) return p;
  std::vector<int64_t> order(static_cast<size_t>(groups));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return bits[a] < bits[b]; });
  int64_t at = kHeaderBytes * groups;
  for (const int64_t g : order) {
    p.offset[static_cast<size_t>(g)] = at;
    at += p.words * bits[g];
  }
  p.encoded_bytes = at;
  return p;
}

// Input/output geometry: a chunk is [rows, groups * block]; group g is the column block
// [g * block, (g + 1) * block) over all rows, its value i at row i / block, column i % block.
struct Geometry {
  int64_t rows, block, groups;
  int64_t chunk_stride() const { return rows * groups * block; }
  int64_t row_stride() const { return groups * block; }
};

inline void write_word(uint8_t* a, uint8_t* b, int64_t w, const uint32_t (&codes)[8], int bits) {
  const int na = bytes_a(bits), nb = bytes_b(bits);
  const uint64_t pa = pack8(codes, na, 0);
  for (int k = 0; k < na; ++k) a[w * na + k] = static_cast<uint8_t>(pa >> (8 * k));
  if (nb > 0) {
    const uint64_t pb = pack8(codes, nb, 8);
    for (int k = 0; k < nb; ++k) b[w * nb + k] = static_cast<uint8_t>(pb >> (8 * k));
  }
}

inline void read_word(const uint8_t* a, const uint8_t* b, int64_t w, int bits,
                      uint32_t (&codes)[8]) {
  const int na = bytes_a(bits), nb = bytes_b(bits);
  uint64_t pa = 0, pb = 0;
  for (int k = 0; k < na; ++k) pa |= static_cast<uint64_t>(a[w * na + k]) << (8 * k);
  for (int k = 0; k < nb; ++k) pb |= static_cast<uint64_t>(b[w * nb + k]) << (8 * k);
  const uint32_t ma = (1u << na) - 1u, mb = nb > 0 ? (1u << nb) - 1u : 0u;
  for (int i = 0; i < 8; ++i) {
    codes[i] = static_cast<uint32_t>((pa >> (na * i)) & ma);
    if (nb > 0) codes[i] |= static_cast<uint32_t>((pb >> (nb * i)) & mb) << 8;
  }
}

inline void write_header(uint8_t* row, int64_t g, float mn, float mx) {
  std::memcpy(row + kHeaderBytes * g, &mn, 4);
  std::memcpy(row + kHeaderBytes * g + 4, &mx, 4);
}

// Encodes group g of the chunk at `xc` into `row`; returns false (and writes the NaN header and
// zero codes) when the group holds a NaN or +-inf.
inline bool encode_group_host(const float* xc, const Geometry& geo, int64_t g, int bits,
                              const Plan& plan, uint8_t* row) {
  const int64_t rs = geo.row_stride();
  const float* base = xc + g * geo.block;
  float mn = INFINITY, mx = -INFINITY;
  bool ok = true;
  for (int64_t r = 0; r < geo.rows; ++r) {
    const float* p = base + r * rs;
    for (int64_t j = 0; j < geo.block; ++j) {
      const float v = p[j];
      ok = ok && finite(v);
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
  }
  uint8_t* a = row + plan.offset[static_cast<size_t>(g)];
  uint8_t* b = a + 8 * plan.words;
  if (!ok) {
    write_header(row, g, NAN, NAN);
    std::memset(a, 0, static_cast<size_t>(plan.words * bits));
    return false;
  }
  write_header(row, g, mn, mx);
  const Quant q = make_quant(mn, mx, bits);
  uint32_t codes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int slot = 0;
  int64_t w = 0;
  for (int64_t r = 0; r < geo.rows; ++r) {
    const float* p = base + r * rs;
    for (int64_t j = 0; j < geo.block; ++j) {
      codes[slot++] = quantize(p[j], q);
      if (slot == 8) {
        write_word(a, b, w++, codes, bits);
        slot = 0;
      }
    }
  }
  if (slot > 0) {  // the last word's padding codes are zeros
    for (int i = slot; i < 8; ++i) codes[i] = 0;
    write_word(a, b, w, codes, bits);
  }
  return true;
}

inline void decode_group_host(const uint8_t* row, const Geometry& geo, int64_t g, int bits,
                              const Plan& plan, float* yc) {
  float mn, mx;
  std::memcpy(&mn, row + kHeaderBytes * g, 4);
  std::memcpy(&mx, row + kHeaderBytes * g + 4, 4);
  const Quant q = make_quant(mn, mx, bits);
  const uint8_t* a = row + plan.offset[static_cast<size_t>(g)];
  const uint8_t* b = a + 8 * plan.words;
  const int64_t rs = geo.row_stride();
  float* base = yc + g * geo.block;
  uint32_t codes[8];
  int64_t i = 0;
  for (int64_t r = 0; r < geo.rows; ++r) {
    float* p = base + r * rs;
    for (int64_t j = 0; j < geo.block; ++j, ++i) {
      if (i % 8 == 0) read_word(a, b, i / 8, bits, codes);
      p[j] = dequantize(codes[i % 8], q);
    }
  }
}

}  // namespace lossy
}  // namespace torchrec_tt
