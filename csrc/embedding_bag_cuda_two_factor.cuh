// Two-factor CUDA path of the TT embedding bag (included by embedding_bag_cuda.cu).
//
// A table whose prefix table is small is looked up as a product of two factors:
//   row i = P[i / p_last] ([Q, R]) @ G_last[i % p_last] ([R, q_last]),   Q = D / q_last,
// where P[a] = G_0[a_0] @ ... @ G_{K-2}[a_{K-2}] is the chain of all cores but the last. For 2
// cores P is core 0 itself; for 3 and 4 cores P is built for every prefix at the start of a call
// by one GEMM per level (cuBLAS) and the backward goes back through the same GEMMs. The lookup
// is then 2*D*R FLOPs (a balanced 3-core chain costs 2R(Q'R + D) with Q' = q_0 q_1), and a row
// reads Q*R + R*q_last floats that stay in L2 when the factors are small.
//
// Forward (no sort, no atomics): one warp per bag, each lane owns "units" (m, 4 consecutive
// ranks) of P's [Q, R] slice, so the warp reads P[a] and G_last[s] with 16-byte coalesced loads;
// partial products are summed over the bag's lookups in registers and reduced across the lanes
// of a unit row once per bag.
// Backward: lookups are sorted by (table, prefix) with a stable radix sort on the few key bits
// the prefixes need; a warp walks a chunk of sorted lookups with lane <-> rank r, so
//   dP[a][m][r]      += sum_c g[m][c] G_last[s][r][c]   (kept in registers while the prefix
//                                                         repeats, flushed with one atomic each)
//   dG_last[s][r][c] += sum_m P[a][m][r] g[m][c]
// need no cross-lane reduction; dG_last by one vector atomic per lane and row (a second pass
// over the rows re-sorted by last-core slice, flushing once per slice, was measured slower:
// docs/benchmarks.md "v6"). A warp first stages its lookups' dY in shared memory. Not taken
// under `deterministic` (atomics) or for float64.

#pragma once

namespace two_factor {

constexpr int kChunk = 32;                 // sorted lookups per warp in the backward
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxD = 256;                 // g buffer per warp (Q * q_last <= 32 * 8)
constexpr int64_t kMaxPrefixFloats = int64_t{1} << 23;  // built P per table (32 MB) in auto mode

struct Table {
  int64_t N;
  const float* P;        // [n_prefix, Q, R]
  const float* G;        // last core [p_last, R, q_last]
  float* dP;             // [n_prefix, Q, R], zeroed
  float* dG;             // [p_last, R, q_last], zeroed
  int key_base;          // first backward sort key of the table
  int pl, ql, R, Q, D, pooling;
};

struct Params {
  Table tables[kMaxTables];
  int16_t feature_table[kMaxFeatures];
  int feature_col[kMaxFeatures];
  int F, total_D, num_keys;
  int row_keys;  // keys are (table, row); else (table, prefix) when rows do not fit 31 bits
  int64_t B;
};

// Host-side description of one table of the call (levels are built with ATen GEMMs).
struct HostTable {
  int64_t n_prefix = 0;  // rows of P: prod(p_0..p_{K-2})
  at::Tensor P;          // [n_prefix, Q*R] (core 0 itself for K = 2)
  std::vector<at::Tensor> levels;  // L_0 (core 0 as [p_0 * q_0, r_1]) .. L_{K-2} = P
  std::vector<at::Tensor> gperm;   // G_l as [r_l, p_l * q_l * r_{l+1}] for l = 1..K-2
};

// TORCHREC_TT_TWO_FACTOR: "0" never takes this path, "force" takes it whenever the shapes fit
// the kernels (ignoring the prefix-size limit), anything else (default) takes it for tables
// whose built prefix is at most kMaxPrefixFloats.
inline int mode_from_env() {
  const char* v = std::getenv("TORCHREC_TT_TWO_FACTOR");  // read per call: tests switch it
  if (v == nullptr) return 1;
  const std::string s(v);
  return s == "0" ? 0 : (s == "force" ? 2 : 1);
}

// TORCHREC_TT_RANK_LAYOUT=0 keeps the unit-layout forward for every shape (for A/B runs).
inline bool rank_layout_env() {
  const char* v = std::getenv("TORCHREC_TT_RANK_LAYOUT");
  return v == nullptr || std::string(v) != "0";
}

inline int64_t prefix_rows(const TableInfo& t) {
  int64_t n = 1;
  for (int64_t k = 0; k + 1 < t.K; ++k) n *= t.p[k];
  return n;
}

inline int pow2_at_least(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Template arguments of the kernels for a call (maxima over its tables): forward
// {units per lane, q_last bound}, backward {ranks per lane, Q bound, q_last bound}.
struct KernelConfig {
  int upl = 1, qlm = 4, rpl = 1, qm = 4;
};

inline KernelConfig kernel_config(const BatchInfo& info) {
  KernelConfig k;
  for (const auto& t : info.tables) {
    const int64_t ql = t.q[t.K - 1], Q = t.D / ql, mstep = 32 / std::max<int64_t>(t.R / 4, 1);
    k.upl = std::max(k.upl, pow2_at_least((Q + mstep - 1) / mstep));
    k.qlm = std::max(k.qlm, pow2_at_least(ql));
    k.rpl = std::max(k.rpl, pow2_at_least((t.R + 31) / 32));
    k.qm = std::max(k.qm, pow2_at_least(Q));
  }
  return k;
}

inline bool shape_fits(const TableInfo& t) {
  const int64_t R = t.R;
  return R == 4 || R == 8 || R == 16 || R == 32 || R == 64 || R == 128;
}

// Whether the whole call takes the two-factor path.
inline bool applies(const BatchInfo& info, bool float32) {
  const int mode = mode_from_env();
  if (mode == 0 || !float32 || info.options.deterministic) return false;
  int64_t keys = 0;
  for (const auto& t : info.tables) {
    if (!shape_fits(t)) return false;
    const int64_t n = prefix_rows(t);
    if (mode == 1 && t.K > 2 && n * t.Q[t.K - 2] * t.R > kMaxPrefixFloats) return false;
    keys += (t.N + t.p[t.K - 1] - 1) / t.p[t.K - 1];
  }
  // The instantiated kernels (launch_forward / launch_grad).
  const KernelConfig k = kernel_config(info);
  const bool fwd = k.qlm <= 8 && k.upl * k.qlm <= 32;
  const bool bwd = k.qlm <= 8 && k.rpl * k.qm <= 32;
  return fwd && bwd && keys < (int64_t{1} << 30);
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// 16-byte aligned contiguous copy when needed (the kernels read 4 floats at a time).
inline at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

// P of every table (and, for the backward, the levels it came from). levels[l] is the level-l
// prefix as [rows * M_l, r_{l+1}] with M_l = q_0 ... q_l.
// The level GEMMs: cuBLAS in float32 (which may use TF32 tensor cores where torch allows it:
// compute_precision TF32 allows that rounding), in float64 for compute_precision FP32.
inline at::Tensor level_mm(const at::Tensor& a, const at::Tensor& b, bool exact) {
  return exact ? at::mm(a.to(at::kDouble), b.to(at::kDouble)).to(at::kFloat) : at::mm(a, b);
}

inline bool exact_levels(const BatchInfo& info) {
  return info.options.precision == ComputePrecision::FP32;
}

inline std::vector<HostTable> build_prefixes(const BatchInfo& info,
                                             const std::vector<at::Tensor>& cores) {
  std::vector<HostTable> out(info.tables.size());
  for (size_t ti = 0; ti < info.tables.size(); ++ti) {
    const TableInfo& t = info.tables[ti];
    HostTable& h = out[ti];
    at::Tensor L = aligned(cores[t.first_core]).view({t.p[0] * t.q[0], t.r[1]});
    h.levels.push_back(L);
    int64_t n = t.p[0], M = t.q[0];
    for (int64_t l = 1; l + 1 < t.K; ++l) {
      const int64_t X = t.r[l], S = t.r[l + 1], pl = t.p[l], ql = t.q[l];
      at::Tensor Gp =
          cores[t.first_core + l].view({pl, X, ql * S}).permute({1, 0, 2}).reshape({X, pl * ql * S});
      at::Tensor C = level_mm(L, Gp, exact_levels(info));  // [(a, m), (b, c, s)]
      L = C.view({n, M, pl, ql, S}).permute({0, 2, 1, 3, 4}).reshape({n * pl * M * ql, S});
      h.gperm.push_back(Gp);
      h.levels.push_back(L);
      n *= pl;
      M *= ql;
    }
    h.n_prefix = n;
    h.P = L.view({n, M * t.R});
  }
  return out;
}

// Core gradients of levels 0..K-2 from dP (the gradient of levels.back()), back through the
// level GEMMs; writes grads[first_core + l] for l < K-1 (dP already is core 0's gradient for K=2).
inline void prefix_backward(const TableInfo& t, const HostTable& h, const at::Tensor& dP,
                            bool exact, std::vector<at::Tensor>& grads) {
  at::Tensor dL = dP;  // gradient of levels[l] (l = K-2 first), same layout
  for (int64_t l = t.K - 2; l >= 1; --l) {
    int64_t n = 1, M = 1;
    for (int64_t k = 0; k < l; ++k) {
      n *= t.p[k];
      M *= t.q[k];
    }
    const int64_t X = t.r[l], S = t.r[l + 1], pl = t.p[l], ql = t.q[l];
    at::Tensor dC =
        dL.reshape({n, pl, M, ql, S}).permute({0, 2, 1, 3, 4}).reshape({n * M, pl * ql * S});
    const at::Tensor& Gp = h.gperm[l - 1];
    const at::Tensor& Lprev = h.levels[l - 1];  // [n * M, X]
    at::Tensor dGp = level_mm(Lprev.t(), dC, exact);  // [X, (b, c, s)]
    grads[t.first_core + l].view({pl, X, ql * S}).copy_(dGp.view({X, pl, ql * S}).permute({1, 0, 2}));
    at::Tensor dLprev = level_mm(dC, Gp.t(), exact);  // [n * M, X]
    if (l == 1) {
      grads[t.first_core].view({n * M, X}).copy_(dLprev);
    } else {
      dL = dLprev;
    }
  }
}

inline Params make_params(const BatchInfo& info, const std::vector<HostTable>& hosts,
                          const std::vector<at::Tensor>& cores, float* dP_base,
                          const std::vector<int64_t>& dP_off, std::vector<at::Tensor>* grads) {
  TORCH_CHECK(static_cast<int>(info.tables.size()) <= kMaxTables && info.F <= kMaxFeatures,
              "torchrec_tt: the CUDA kernels take at most ", kMaxTables, " tables and ",
              kMaxFeatures, " features per call");
  Params P{};
  P.F = static_cast<int>(info.F);
  P.B = info.B;
  P.total_D = static_cast<int>(info.total_D);
  int64_t total_rows = 0;
  for (const auto& t : info.tables) total_rows += t.N;
  P.row_keys = total_rows < (int64_t{1} << 30) ? 1 : 0;
  int key = 0;
  for (size_t ti = 0; ti < info.tables.size(); ++ti) {
    const TableInfo& t = info.tables[ti];
    Table& d = P.tables[ti];
    d.N = t.N;
    d.pl = static_cast<int>(t.p[t.K - 1]);
    d.ql = static_cast<int>(t.q[t.K - 1]);
    d.R = static_cast<int>(t.R);
    d.D = static_cast<int>(t.D);
    d.Q = static_cast<int>(t.D / t.q[t.K - 1]);
    d.pooling = static_cast<int>(t.pooling);
    d.P = hosts[ti].P.data_ptr<float>();
    d.G = cores[t.first_core + t.K - 1].data_ptr<float>();
    TORCH_INTERNAL_ASSERT(aligned16(d.P) && aligned16(d.G));
    d.key_base = key;
    key += static_cast<int>(P.row_keys ? t.N : (t.N + d.pl - 1) / d.pl);
    if (grads != nullptr) {
      d.dP = dP_base + dP_off[ti];
      d.dG = (*grads)[t.first_core + t.K - 1].data_ptr<float>();
      TORCH_INTERNAL_ASSERT(aligned16(d.dP) && aligned16(d.dG));
    }
  }
  P.num_keys = key;
  for (int64_t f = 0; f < info.F; ++f) {
    P.feature_table[f] = static_cast<int16_t>(info.feature_table[f]);
    P.feature_col[f] = static_cast<int>(info.feature_col[f]);
  }
  return P;
}

// Bounds check of one lookup, as the tile path does it: FATAL traps, WARNING reports the first
// out-of-range index of the call, IGNORE is silent. Returns whether the lookup is valid.
__device__ __forceinline__ bool check_index(int64_t v, int64_t N, int t, int64_t feature,
                                            int64_t j, int bounds, int32_t* warned, bool report) {
  if (v >= 0 && v < N) return true;
  const bool fatal = bounds == static_cast<int>(BoundsCheckMode::FATAL);
  if (report && (fatal || (bounds == static_cast<int>(BoundsCheckMode::WARNING) &&
                           atomicCAS(warned, 0, 1) == 0))) {
    printf("torchrec_tt::tt_embedding_bag: table %d (feature %lld): index %lld at position %lld "
           "is out of range [0, %lld)%s\n",
           t, static_cast<long long>(feature), static_cast<long long>(v),
           static_cast<long long>(j), static_cast<long long>(N),
           fatal ? "" : "; out-of-range lookups contribute zero (further ones in this call are "
                        "not reported)");
  }
  if (fatal) __trap();
  return false;
}

// a = v / p_last in 32 bits when the table's rows fit (a 64-bit division is ~4x the instructions).
__device__ __forceinline__ int64_t div_rows(int64_t v, int pl, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(v) / static_cast<uint32_t>(pl)) : v / pl;
}

// Unpacks a 16-byte load into four consecutive registers of an unrolled array.
__device__ __forceinline__ void unpack4(float* dst, const float4 v) {
  dst[0] = v.x;
  dst[1] = v.y;
  dst[2] = v.z;
  dst[3] = v.w;
}

// Lookup j of a bag (the first one's index already loaded): whether it is in range, its weight,
// prefix a and last-core row s. Both forward kernels read their bags through this.
struct Lookup {
  float w;
  int64_t a, s;
};

template <typename index_t>
__device__ __forceinline__ bool decode_lookup(const Table& T, int t, int64_t f, int64_t j,
                                              int64_t lo, int64_t v_first,
                                              const index_t* __restrict__ idx,
                                              const float* __restrict__ w, int bounds,
                                              int32_t* warned, bool report, Lookup& out) {
  const int64_t v = j == lo ? v_first : static_cast<int64_t>(idx[j]);
  if (!check_index(v, T.N, t, f, j, bounds, warned, report)) return false;
  out.w = w != nullptr ? w[j] : 1.f;
  out.a = div_rows(v, T.pl, T.N <= INT32_MAX);
  out.s = v - out.a * T.pl;
  return true;
}

// ---- forward ---------------------------------------------------------------------------------

// UPL: units (m, 4-rank chunk) per lane; QLM: bound on q_last. Lane l owns rank chunk
// rq = l % RQ and rows m = l / RQ + k * (32 / RQ), RQ = R / 4 (a power of two <= 32).
template <typename index_t, int UPL, int QLM>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
forward_kernel(const Params P, const index_t* __restrict__ idx, const int64_t* __restrict__ off,
               const float* __restrict__ w, int bounds, int32_t* __restrict__ warned,
               float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t num_bags = P.F * P.B;
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) >> 5;
  int64_t bag = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  // Offsets and first index of the next bag are loaded while this one computes: with one lookup
  // per bag (one-hot features) these two dependent loads would otherwise be most of its latency.
  int64_t lo = 0, hi = 0, v_first = 0;
  auto load_meta = [&](int64_t b, int64_t& l, int64_t& h, int64_t& v) {
    l = off[b];
    h = off[b + 1];
    v = h > l ? static_cast<int64_t>(idx[l]) : 0;
  };
  if (bag < num_bags) load_meta(bag, lo, hi, v_first);
  for (; bag < num_bags; bag += stride) {
    int64_t next_lo = 0, next_hi = 0, next_v = 0;
    if (bag + stride < num_bags) load_meta(bag + stride, next_lo, next_hi, next_v);
    const int64_t f = bag / P.B;
    const int t = P.feature_table[f];
    const Table& T = P.tables[t];
    const int RQ = T.R >> 2, ql = T.ql, Q = T.Q;
    const int rq = lane & (RQ - 1);
    const int m0 = lane / RQ, mstep = 32 / RQ;
    float acc[UPL][QLM];
#pragma unroll
    for (int k = 0; k < UPL; ++k)
#pragma unroll
      for (int c = 0; c < QLM; ++c) acc[k][c] = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      Lookup lk;
      if (!decode_lookup(T, t, f, j, lo, v_first, idx, w, bounds, warned, lane == 0, lk)) continue;
      const float wj = lk.w;
      const int64_t a = lk.a, s = lk.s;
      // G_last[s] rows 4rq .. 4rq+3: 4 * ql consecutive floats.
      float g[4][QLM];
      const float* gp = T.G + (s * T.R + 4 * rq) * ql;
      if (ql == QLM) {  // 4 or 8 floats per rank: 16-byte loads
#pragma unroll
        for (int x = 0; x < 4; ++x) {
#pragma unroll
          for (int c = 0; c < QLM; c += 4) {
            unpack4(g[x] + c, __ldg(reinterpret_cast<const float4*>(gp + x * QLM + c)));
          }
        }
      } else {
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
          for (int c = 0; c < QLM; ++c) g[x][c] = c < ql ? __ldg(gp + x * ql + c) : 0.f;
      }
      const float* pp = T.P + a * Q * T.R + 4 * rq;
#pragma unroll
      for (int k = 0; k < UPL; ++k) {
        const int m = m0 + k * mstep;
        if (m < Q) {
          float4 pv = __ldg(reinterpret_cast<const float4*>(pp + m * T.R));
          pv.x *= wj;
          pv.y *= wj;
          pv.z *= wj;
          pv.w *= wj;
#pragma unroll
          for (int c = 0; c < QLM; ++c) {
            acc[k][c] += pv.x * g[0][c] + pv.y * g[1][c] + pv.z * g[2][c] + pv.w * g[3][c];
          }
        }
      }
    }
    // Sum over the RQ lanes that share a row m (consecutive lanes).
    for (int o = 1; o < RQ; o <<= 1) {
#pragma unroll
      for (int k = 0; k < UPL; ++k)
#pragma unroll
        for (int c = 0; c < QLM; ++c) acc[k][c] += __shfl_xor_sync(0xffffffffu, acc[k][c], o);
    }
    const float scale = (T.pooling == static_cast<int>(PoolingMode::MEAN) && hi > lo)
                            ? 1.f / static_cast<float>(hi - lo)
                            : 1.f;
    float* y = out + (bag - f * P.B) * P.total_D + P.feature_col[f];
#pragma unroll
    for (int k = 0; k < UPL; ++k) {
      const int m = m0 + k * mstep;
#pragma unroll
      for (int c = 0; c < QLM; ++c) {
        if (m < Q && c < ql && (c & (RQ - 1)) == rq) y[m * ql + c] = acc[k][c] * scale;
      }
    }
    // Columns c >= RQ of a row are written by lane rq = c % RQ (every c < ql is covered).
    lo = next_lo;
    hi = next_hi;
    v_first = next_v;
  }
}

// Rank-layout forward for tables with q_last in {4, 8} and 128 <= R * q_last <= 512 (every
// Kaggle-sized 2-core shape). A group of GS lanes (8, 16 or 32) owns a bag, so a warp has 32 / GS
// bags in flight: the kernel is bound by L2 latency, not bandwidth (ncu: L1 26%, L2 25% at
// D=64), and more independent bags per warp is what hides it. The group reads G_last[s]
// ([R, q_last], contiguous) as consecutive float4s, its lane l owning float4 f = l + GS k, i.e.
// rank r = f / CPF and columns 4 (f % CPF) .. +3 (CPF = q_last / 4), and P[a][m][r] as scalars:
// the minimum number of L1 wavefronts per lookup (the unit layout read each G_last line once
// per rank chunk, ~3x the requests). Partial products acc[m][x] are summed over the bag in
// registers; the once-per-bag reduction over the group's lanes of one column chunk is a
// reduce-scatter (halves exchanged per step), so each lane ends with distinct output elements.
template <int N>
__device__ __forceinline__ void reduce_scatter_step(float* v, int mask, bool upper) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float send = upper ? v[i] : v[i + N / 2];
    const float keep = upper ? v[i + N / 2] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
  }
}

inline bool rank_layout_fits(int64_t R, int64_t ql, int64_t Q) {
  return (ql == 4 || ql == 8) && R * ql >= 128 && R * ql <= 512 && Q <= 16;
}

// Reduce-scatter steps for masks GS/2 .. 2 (lanes of one column chunk share bit 0 when CPF = 2).
template <int N, int MASK>
__device__ __forceinline__ void reduce_scatter_down(float* v, int lane, int& base) {
  if constexpr (MASK >= 2) {
    reduce_scatter_step<N>(v, MASK, lane & MASK);
    base += (lane & MASK) ? N / 2 : 0;
    reduce_scatter_down<N / 2, MASK / 2>(v, lane, base);
  }
}

// GS: lanes per bag; KPL: float4s of G_last[s] per lane (R * q_last / (4 GS)); QM: bound on Q
// (a power of two, 4..16). RX, QLX > 0: every table has R = RX, q_last = QLX and Q = QM
// (compile-time loop bounds and offsets; the generic kernel spent most of its 455 instructions
// per lookup at D=64 on address arithmetic and masks: docs/benchmarks.md "v7").
// CR (exact shapes, KPL = 4): lane group g owns the 4 consecutive ranks 4g..4g+3 instead of
// g, g + GS/CPF, ...: the same products and the same cross-lane reduction, but P[a]'s values
// of a row m are one float4 (QM 16-byte loads per lane instead of 4 * QM scalar ones: the
// exact-shape D=64 forward issued 32 scalar P loads per lane and lookup, 20 LDG per lookup).
template <typename index_t, int GS, int KPL, int QM, int RX = 0, int QLX = 0, bool CR = false>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
forward_rank_kernel(const Params P, const index_t* __restrict__ idx,
                    const int64_t* __restrict__ off, const float* __restrict__ w, int bounds,
                    int32_t* __restrict__ warned, float* __restrict__ out) {
  constexpr int NV = QM * 4;              // partial sums per lane: acc[m][x]
  constexpr int GPW = 32 / GS;            // bags per warp
  constexpr int REM = 2 * NV / GS;        // values per lane after the steps of masks GS/2..2
  static_assert(REM >= 1, "reduce-scatter needs QM * 4 >= GS / 2");
  const int lane = threadIdx.x & 31;
  const int sl = lane & (GS - 1);
  const int64_t num_bags = P.F * P.B;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t stride = warps * GPW;
  int64_t bag = ((blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5) * GPW + lane / GS;
  int64_t lo = 0, hi = 0, v_first = 0;
  auto load_meta = [&](int64_t b, int64_t& l, int64_t& h, int64_t& v) {
    if (b < num_bags) {
      l = off[b];
      h = off[b + 1];
      v = h > l ? static_cast<int64_t>(idx[l]) : 0;
    } else {
      l = h = v = 0;
    }
  };
  load_meta(bag, lo, hi, v_first);
  // The loop runs while any group of the warp has a bag (shuffles need the whole warp).
  for (int64_t first = bag - lane / GS; first < num_bags; first += stride, bag += stride) {
    int64_t next_lo = 0, next_hi = 0, next_v = 0;
    load_meta(bag + stride, next_lo, next_hi, next_v);
    const bool active = bag < num_bags;
    const int64_t f = active ? bag / P.B : 0;
    const int t = P.feature_table[f];
    const Table& T = P.tables[t];
    const int R = RX > 0 ? RX : T.R, ql = QLX > 0 ? QLX : T.ql, Q = RX > 0 ? QM : T.Q;
    const int cpf_shift = ql == 8 ? 1 : 0;  // CPF = 1 << cpf_shift float4s per rank row
    const int kpl = (R * ql) / (4 * GS);
    const int cc = sl & ((1 << cpf_shift) - 1);
    float acc[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) acc[i] = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      Lookup lk;
      if (!decode_lookup(T, t, f, j, lo, v_first, idx, w, bounds, warned, sl == 0, lk)) continue;
      const float wj = lk.w;
      const int64_t a = lk.a, s = lk.s;
      const float4* g4 = reinterpret_cast<const float4*>(T.G + s * R * ql);
      const float* pa = T.P + a * Q * R;
      if constexpr (CR) {
        static_assert(RX > 0 && KPL == 4 && (QLX == 4 || QLX == 8), "CR: exact shapes only");
        constexpr int CPF = QLX / 4;  // float4s per rank row of G_last[s]
        static_assert((GS / CPF) * KPL == RX, "CR: the lane groups cover the ranks once");
        const int g = sl / CPF;
        float4 gv[KPL];
#pragma unroll
        for (int k = 0; k < KPL; ++k) {
          gv[k] = __ldg(g4 + (g * KPL + k) * CPF + cc);
          gv[k].x *= wj;
          gv[k].y *= wj;
          gv[k].z *= wj;
          gv[k].w *= wj;
        }
        // Rows of P[a] are RX floats, so row m's ranks 4g..4g+3 are 16-byte aligned.
        const float4* p4 = reinterpret_cast<const float4*>(pa) + g;
#pragma unroll
        for (int m = 0; m < QM; ++m) {
          const float4 pv = __ldg(p4 + m * (RX / 4));
          const float pr[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
          for (int k = 0; k < KPL; ++k) {
            acc[m * 4 + 0] += pr[k] * gv[k].x;
            acc[m * 4 + 1] += pr[k] * gv[k].y;
            acc[m * 4 + 2] += pr[k] * gv[k].z;
            acc[m * 4 + 3] += pr[k] * gv[k].w;
          }
        }
        continue;
      }
#pragma unroll
      for (int k = 0; k < KPL; ++k) {
        if (k < kpl) {
          const int fi = sl + GS * k;
          float4 gv = __ldg(g4 + fi);
          gv.x *= wj;
          gv.y *= wj;
          gv.z *= wj;
          gv.w *= wj;
          const int r = fi >> cpf_shift;
#pragma unroll
          for (int m = 0; m < QM; ++m) {
            const float pv = m < Q ? __ldg(pa + m * R + r) : 0.f;
            acc[m * 4 + 0] += pv * gv.x;
            acc[m * 4 + 1] += pv * gv.y;
            acc[m * 4 + 2] += pv * gv.z;
            acc[m * 4 + 3] += pv * gv.w;
          }
        }
      }
    }
    int base = 0;
    reduce_scatter_down<NV, GS / 2>(acc, lane, base);
    int count = REM;
    bool writer = active;
    if (cpf_shift == 0) {  // lanes l and l ^ 1 hold the same chunk: one more step
      if constexpr (REM >= 2) {
        reduce_scatter_step<REM>(acc, 1, lane & 1);
        base += (lane & 1) ? REM / 2 : 0;
        count = REM / 2;
      } else {
        acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], 1);
        writer = writer && (lane & 1) == 0;
      }
    }
    const float scale = (T.pooling == static_cast<int>(PoolingMode::MEAN) && hi > lo)
                            ? 1.f / static_cast<float>(hi - lo)
                            : 1.f;
    float* y = out + (bag - f * P.B) * P.total_D + P.feature_col[f];
#pragma unroll
    for (int i = 0; i < REM; ++i) {
      const int e = base + i;  // e = m * 4 + x
      const int m = e >> 2;
      if (writer && i < count && m < Q) y[m * ql + cc * 4 + (e & 3)] = acc[i] * scale;
    }
    lo = next_lo;
    hi = next_hi;
    v_first = next_v;
  }
}

// ---- backward --------------------------------------------------------------------------------

template <typename index_t>
__global__ void keys_kernel(const Params P, const index_t* __restrict__ idx,
                            const int64_t* __restrict__ off, int64_t n, int bounds,
                            int32_t* __restrict__ warned, int32_t* __restrict__ keys,
                            int32_t* __restrict__ vals, int32_t* __restrict__ bag_of) {
  const int64_t num_bags = P.F * P.B;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bag = find_bag(off, num_bags, j);
    const int64_t f = bag / P.B;
    const int t = P.feature_table[f];
    const Table& T = P.tables[t];
    const int64_t v = static_cast<int64_t>(idx[j]);
    bag_of[j] = static_cast<int32_t>(bag);
    vals[j] = static_cast<int32_t>(j);
    keys[j] = check_index(v, T.N, t, f, j, bounds, warned, true)
                  ? T.key_base + static_cast<int32_t>(P.row_keys ? v : v / T.pl)
                  : P.num_keys;  // sorts last, processed by nobody
  }
}

// Float atomics of the first n of an N-float register array into n consecutive floats (n % 4
// == 0: 16-byte vector atomics on sm_90, dst then 16-byte aligned). A reference to a fixed-size
// array, unrolled, keeps it in registers (a pointer sent it to the stack frame).
template <int N>
__device__ __forceinline__ void atomic_add_regs(float* dst, const float (&v)[N], int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if ((N & 3) == 0 && (n & 3) == 0) {
#pragma unroll
    for (int c = 0; c < N; c += 4) {
      if (c < n) {
        atomicAdd(reinterpret_cast<float4*>(dst + c), make_float4(v[c], v[c + 1], v[c + 2], v[c + 3]));
      }
    }
    return;
  }
#endif
#pragma unroll
  for (int c = 0; c < N; ++c) {
    if (c < n) atomicAdd(dst + c, v[c]);
  }
}

constexpr int kStageFloats = 1024;  // staged dY / len per warp in the backward (4 KB)

// One warp per chunk of kChunk sorted lookups; lane <-> ranks r = lane + 32 i (i < RPL). Sorted
// order puts the lookups of a row next to each other (row keys; prefix keys when the tables have
// 2^31 rows or more) and the rows of a prefix next to each other. A row's weighted dY is summed
// over its lookups first (registers, lane <-> columns), then contracted once:
//   dP[a] += gsum G_last[s]^T (registers until the prefix changes), dG_last[s] += P[a]^T gsum
// (the latter by one vector atomic per lane and row).
// kStaged: the warp first copies dY / len of `stage` lookups at a time into shared memory with
// all its loads in flight at once (16-byte ones when `vec`: every D and dY's row a multiple of
// 4; lane-parallel metadata, one integer division per copied element instead of 64-bit
// shuffles and a division per lookup), so summing a lookup is a shared load and an FMA. Without it (v6, TORCHREC_TT_BWD_STAGED=0, kept for A/B runs) each lookup is loaded
// one ahead through ~100 instructions of shuffles and 64-bit arithmetic, and ncu showed its
// first use stalling on the load (28% of the stall samples).
template <typename index_t, int RPL, int QM, int QLM, bool kStaged, bool kExact = false>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
grad_kernel(const Params P, const int32_t* __restrict__ skeys, const int32_t* __restrict__ svals,
            const int32_t* __restrict__ bag_of, const index_t* __restrict__ idx,
            const int64_t* __restrict__ off, const float* __restrict__ w,
            const float* __restrict__ dy, int64_t n, float* __restrict__ wgrad, int stage,
            int dpad, bool vec) {
  constexpr int kDPL = (QM * QLM + 31) / 32;  // columns of the row sum per lane (D <= QM * QLM)
  __shared__ __align__(16) float gbuf[kWarpsPerBlock][kMaxD];
  __shared__ __align__(16) float sbuf[kStaged ? kWarpsPerBlock : 1][kStaged ? kStageFloats : 4];
  const int lane = threadIdx.x & 31;
  // kExact: every table has R = 32 RPL, Q = QM, q_last = QLM (compile-time loop bounds and
  // offsets, no masked iterations).
  auto R_ = [](const Table& X) -> int { return kExact ? 32 * RPL : X.R; };
  auto Q_ = [](const Table& X) -> int { return kExact ? QM : X.Q; };
  auto QL_ = [](const Table& X) -> int { return kExact ? QLM : X.ql; };
  float* gs = gbuf[threadIdx.x >> 5];
  float* sdy = sbuf[kStaged ? threadIdx.x >> 5 : 0];
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t chunk = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; chunk < chunks;
       chunk += (int64_t(gridDim.x) * blockDim.x) >> 5) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = min(begin + kChunk, n);
    int cur_t = -1;
    int64_t cur_a = -1, cur_s = 0;
    const Table* T = nullptr;
    float dPacc[RPL][QM], Preg[RPL][QM], gl[RPL][QLM], gsum[kDPL];
#pragma unroll
    for (int k = 0; k < kDPL; ++k) gsum[k] = 0.f;
    // Contracts the summed row gradient of row (cur_a, cur_s) once.
    auto finish_row = [&]() {
      __syncwarp();
#pragma unroll
      for (int k = 0; k < kDPL; ++k) {
        if (lane + 32 * k < T->D) gs[lane + 32 * k] = gsum[k];
        gsum[k] = 0.f;
      }
      __syncwarp();
      const int ql = QL_(*T), Q = Q_(*T), R = R_(*T);
#pragma unroll
      for (int i = 0; i < RPL; ++i) {
        const int r = lane + 32 * i;
        if (r >= R) continue;
        float h[QLM];
#pragma unroll
        for (int c = 0; c < QLM; ++c) h[c] = 0.f;
#pragma unroll
        for (int m = 0; m < QM; ++m) {
          if (m < Q) {
            float gv[QLM];
            if (ql == QLM) {  // broadcast 16-byte reads of the row sum
#pragma unroll
              for (int c = 0; c < QLM; c += 4) {
                unpack4(gv + c, *reinterpret_cast<const float4*>(gs + m * QLM + c));
              }
            } else {
#pragma unroll
              for (int c = 0; c < QLM; ++c) gv[c] = c < ql ? gs[m * ql + c] : 0.f;
            }
            float dp = 0.f;
#pragma unroll
            for (int c = 0; c < QLM; ++c) {
              dp += gv[c] * gl[i][c];
              h[c] += Preg[i][m] * gv[c];
            }
            dPacc[i][m] += dp;
          }
        }
        atomic_add_regs<QLM>(T->dG + (cur_s * R + r) * ql, h, ql);
      }
    };
    auto flush_prefix = [&]() {
      float* dst = T->dP + cur_a * Q_(*T) * R_(*T);
#pragma unroll
      for (int i = 0; i < RPL; ++i) {
        const int r = lane + 32 * i;
#pragma unroll
        for (int m = 0; m < QM; ++m) {
          if (r < R_(*T) && m < Q_(*T)) atomicAdd(dst + m * R_(*T) + r, dPacc[i][m]);
        }
      }
    };
    // Lane i loads the metadata of sorted position begin + i (one round trip for the chunk);
    // iteration i reads it back with shuffles.
    const int cnt = static_cast<int>(end - begin);
    int my_key = P.num_keys, my_t = 0, my_D = 0;
    int64_t my_j = 0, my_bag = 0, my_v = 0, my_dyo = 0;
    float my_w = 1.f, my_inv = 1.f;
    if (lane < cnt) {
      my_key = skeys[begin + lane];
      if (my_key < P.num_keys) {
        my_j = svals[begin + lane];
        my_bag = bag_of[my_j];
        my_v = static_cast<int64_t>(idx[my_j]);
        my_w = w != nullptr ? w[my_j] : 1.f;
        const int64_t f = my_bag / P.B;
        my_t = P.feature_table[f];
        my_D = P.tables[my_t].D;
        my_dyo = (my_bag - f * P.B) * P.total_D + P.feature_col[f];
        if (P.tables[my_t].pooling == static_cast<int>(PoolingMode::MEAN)) {
          my_inv = 1.f / static_cast<float>(off[my_bag + 1] - off[my_bag]);
        }
      }
    }
    // Row and prefix starts of the chunk (bit i: lookup i starts one). Loading each row's
    // factors one row ahead was measured not faster (more registers): docs/benchmarks.md "v5".
    int64_t my_a = 0;
    if (my_key < P.num_keys) {
      const Table& MT = P.tables[my_t];
      my_a = div_rows(my_v, MT.pl, MT.N <= INT32_MAX);
    }
    const int prev_t = __shfl_up_sync(0xffffffffu, my_t, 1);
    const int64_t prev_v = __shfl_up_sync(0xffffffffu, my_v, 1);
    const int64_t prev_a = __shfl_up_sync(0xffffffffu, my_a, 1);
    const bool valid = my_key < P.num_keys;
    const bool new_row = valid && (lane == 0 || my_t != prev_t || my_v != prev_v);
    const bool new_prefix = valid && (lane == 0 || my_t != prev_t || my_a != prev_a);
    const unsigned row_mask = __ballot_sync(0xffffffffu, new_row);
    const unsigned prefix_mask = __ballot_sync(0xffffffffu, new_prefix);
    // Out-of-range lookups sort last: the valid ones are a prefix of the chunk.
    const int nvalid = __popc(__ballot_sync(0xffffffffu, valid));
    auto load_P = [&](int src_lane, float (&dst)[RPL][QM]) {
      const int st = __shfl_sync(0xffffffffu, my_t, src_lane);
      const int64_t sa = __shfl_sync(0xffffffffu, my_a, src_lane);
      const Table& ST = P.tables[st];
      const float* src = ST.P + sa * Q_(ST) * R_(ST);
#pragma unroll
      for (int ii = 0; ii < RPL; ++ii) {
        const int r = lane + 32 * ii;
#pragma unroll
        for (int m = 0; m < QM; ++m) {
          dst[ii][m] = (r < R_(ST) && m < Q_(ST)) ? __ldg(src + m * R_(ST) + r) : 0.f;
        }
      }
    };
    auto load_G = [&](const Table& ST, int64_t ss, float (&dst)[RPL][QLM]) {
#pragma unroll
      for (int ii = 0; ii < RPL; ++ii) {
        const int r = lane + 32 * ii;
        const float* gp = ST.G + (ss * R_(ST) + r) * QL_(ST);
        if (QL_(ST) == QLM && r < R_(ST)) {  // 16-byte loads: a quarter of the L1 requests
#pragma unroll
          for (int c = 0; c < QLM; c += 4) {
            unpack4(dst[ii] + c, __ldg(reinterpret_cast<const float4*>(gp + c)));
          }
        } else {
#pragma unroll
          for (int c = 0; c < QLM; ++c) {
            dst[ii][c] = (r < R_(ST) && c < QL_(ST)) ? __ldg(gp + c) : 0.f;
          }
        }
      }
    };
    // Starts row i's contraction state (the previous row and prefix are finished first).
    auto start_row = [&](int i) {
      if (cur_t >= 0) finish_row();
      const int t = __shfl_sync(0xffffffffu, my_t, i);
      const int64_t v = __shfl_sync(0xffffffffu, my_v, i);
      if ((prefix_mask >> i) & 1u) {  // a new prefix
        if (cur_t >= 0) flush_prefix();
#pragma unroll
        for (int ii = 0; ii < RPL; ++ii)
#pragma unroll
          for (int m = 0; m < QM; ++m) dPacc[ii][m] = 0.f;
        load_P(i, Preg);
        cur_a = __shfl_sync(0xffffffffu, my_a, i);
      }
      T = &P.tables[t];
      cur_t = t;
      cur_s = v - cur_a * T->pl;
      load_G(*T, cur_s, gl);
    };
    // dw_j = <dY_j / len, row>, row = P[a] G_last[s]; g: lookup i's dY / len, lane <-> columns
    // read through the shared buffer `buf` (D floats).
    auto weight_grad = [&](int i, const float* buf) {
      float part = 0.f;
#pragma unroll
      for (int ii = 0; ii < RPL; ++ii) {
        if (lane + 32 * ii >= R_(*T)) continue;
#pragma unroll
        for (int m = 0; m < QM; ++m) {
          if (m < Q_(*T)) {
#pragma unroll
            for (int c = 0; c < QLM; ++c) {
              if (c < QL_(*T)) part += Preg[ii][m] * gl[ii][c] * buf[m * QL_(*T) + c];
            }
          }
        }
      }
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      const int64_t j = __shfl_sync(0xffffffffu, my_j, i);
      if (lane == 0) wgrad[j] = part;
    };
    if constexpr (kStaged) {
      for (int i0 = 0; i0 < nvalid; i0 += stage) {
        const int ns = min(stage, nvalid - i0);
        __syncwarp();  // the previous stage is read
        // Element e = li * units + u is unit u (a float4, or a float when `vec` is false) of
        // staged lookup li; every lane runs the same iterations so the shuffles see the warp.
        const int units = vec ? dpad >> 2 : dpad, total = ns * units;
        for (int base = 0; base < total; base += 32) {
          const int e = base + lane;
          const int li = min(e / units, ns - 1), u = e - li * units;
          const int64_t o = __shfl_sync(0xffffffffu, my_dyo, i0 + li);
          const int Dl = __shfl_sync(0xffffffffu, my_D, i0 + li);
          const float inv = __shfl_sync(0xffffffffu, my_inv, i0 + li);
          if (e < total) {
            if (vec) {
              float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
              if (4 * u < Dl) v = __ldg(reinterpret_cast<const float4*>(dy + o) + u);
              reinterpret_cast<float4*>(sdy)[e] =
                  make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
            } else {
              sdy[e] = u < Dl ? __ldg(dy + o + u) * inv : 0.f;
            }
          }
        }
        __syncwarp();
        for (int i = i0; i < i0 + ns; ++i) {
          if ((row_mask >> i) & 1u) start_row(i);
          const float* row = sdy + (i - i0) * dpad;
          const float wj = w != nullptr ? __shfl_sync(0xffffffffu, my_w, i) : 1.f;
#pragma unroll
          for (int k = 0; k < kDPL; ++k) {
            const int d = lane + 32 * k;
            if (d < dpad) gsum[k] += wj * row[d];
          }
          if (wgrad != nullptr) weight_grad(i, row);
        }
      }
    } else {
      // dY / len of lookup i, lane <-> columns d = lane + 32 k (issued one lookup ahead).
      auto load_dy = [&](int i, float* out) {
        const int64_t bag = __shfl_sync(0xffffffffu, my_bag, i);
        const int t = __shfl_sync(0xffffffffu, my_t, i);
        const float inv = __shfl_sync(0xffffffffu, my_inv, i);
        const int64_t f = bag / P.B;
        const float* dyr = dy + (bag - f * P.B) * P.total_D + P.feature_col[f];
        const int D = P.tables[t].D;
#pragma unroll
        for (int k = 0; k < kDPL; ++k) {
          const int d = lane + 32 * k;
          out[k] = d < D ? __ldg(dyr + d) * inv : 0.f;
        }
      };
      float dyl[kDPL] = {}, dyl_next[kDPL] = {};
      if (nvalid > 0) load_dy(0, dyl);
      for (int i = 0; i < nvalid; ++i) {
        if (i + 1 < nvalid) load_dy(i + 1, dyl_next);
        const float wj = __shfl_sync(0xffffffffu, my_w, i);
        if ((row_mask >> i) & 1u) start_row(i);
#pragma unroll
        for (int k = 0; k < kDPL; ++k) gsum[k] += wj * dyl[k];
        if (wgrad != nullptr) {
          __syncwarp();
#pragma unroll
          for (int k = 0; k < kDPL; ++k) {
            if (lane + 32 * k < T->D) gs[lane + 32 * k] = dyl[k];
          }
          __syncwarp();
          weight_grad(i, gs);
        }
#pragma unroll
        for (int k = 0; k < kDPL; ++k) dyl[k] = dyl_next[k];
      }
    }
    if (cur_t >= 0) {
      finish_row();
      flush_prefix();
    }
  }
}
// ---- dispatch --------------------------------------------------------------------------------

// TORCHREC_TT_BWD_STAGED=0: the v6 per-lookup loop of the backward (for A/B runs; only for the
// shapes of the Kaggle-sized benchmark, one rank per lane (R <= 32) and Q <= 8, else the staged
// kernel runs).
inline bool staged_backward_env() {
  const char* e = std::getenv("TORCHREC_TT_BWD_STAGED");
  return e == nullptr || std::string(e) != "0";
}

// TORCHREC_TT_FWD_STRIDED_RANKS=1: the exact-shape D=64 forward with v7's strided rank layout
// (for A/B runs against the consecutive-rank one; D=16 always runs the strided one).
inline bool strided_rank_forward_env() {
  const char* e = std::getenv("TORCHREC_TT_FWD_STRIDED_RANKS");
  return e != nullptr && std::string(e) == "1";
}

// The Kaggle-sized shapes (R = 32 and, for every table of the call, q_last = Q = 4 or 8, i.e.
// D = 16 or 64) run kernels compiled for that exact shape; TORCHREC_TT_EXACT_SHAPES=0 runs the
// generic ones (for A/B runs). Returns the common q_last, or 0 when the call has no such shape.
inline int exact_shape(const BatchInfo& info) {
  const char* e = std::getenv("TORCHREC_TT_EXACT_SHAPES");
  if (e != nullptr && std::string(e) == "0") return 0;
  int ql0 = 0;
  for (const auto& t : info.tables) {
    const int64_t ql = t.q[t.K - 1], Q = t.D / ql;
    if (t.R != 32 || ql != Q || (ql != 4 && ql != 8) || (ql0 != 0 && ql != ql0)) return 0;
    ql0 = static_cast<int>(ql);
  }
  return ql0;
}

template <typename index_t>
void launch_forward(const Params& P, const BatchInfo& info, const index_t* idx, const int64_t* off,
                    const float* w, int bounds, int32_t* warned, float* out, cudaStream_t stream) {
  const int64_t bags = info.F * info.B;
  const int grid = grid_for(bags * 32, kWarpsPerBlock * 32);
  if (rank_layout_env()) {
    bool rank_layout = true;
    int nf = 32, qm = 4;  // float4s of a G_last slice, Q bound (maxima over the tables)
    for (const auto& t : info.tables) {
      const int64_t ql = t.q[t.K - 1], Q = t.D / ql;
      rank_layout = rank_layout && rank_layout_fits(t.R, ql, Q);
      nf = std::max(nf, pow2_at_least(t.R * ql / 4));
      qm = std::max(qm, pow2_at_least(Q));
    }
    if (rank_layout) {
      // Lanes per bag: up to 4 float4s per lane (8 lanes at D=16, 16 at D=64), 2 when Q is 16
      // (registers); TORCHREC_TT_FWD_LANES_PER_BAG overrides it for A/B runs.
      int gs = std::max(8, nf / (qm >= 16 ? 2 : 4));
      if (const char* e = std::getenv("TORCHREC_TT_FWD_LANES_PER_BAG")) gs = std::atoi(e);
      auto launch = [&](auto kernel, int g) {
        kernel<<<grid_for(bags * g, kWarpsPerBlock * 32), kWarpsPerBlock * 32, 0, stream>>>(
            P, idx, off, w, bounds, warned, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      auto try_lanes = [&](int g) -> bool {
#define TT_TWO_FACTOR_RANK_FWD(G, K, QMAX)                                                     \
  if (g == G && nf == G * K && qm == QMAX) {                                                   \
    launch(forward_rank_kernel<index_t, G, K, QMAX>, G);                                       \
    return true;                                                                               \
  }
        TT_TWO_FACTOR_RANK_FWD(8, 4, 4)
        TT_TWO_FACTOR_RANK_FWD(16, 2, 4) TT_TWO_FACTOR_RANK_FWD(16, 2, 8)
        TT_TWO_FACTOR_RANK_FWD(16, 2, 16) TT_TWO_FACTOR_RANK_FWD(16, 4, 4)
        TT_TWO_FACTOR_RANK_FWD(16, 4, 8) TT_TWO_FACTOR_RANK_FWD(16, 4, 16)
        TT_TWO_FACTOR_RANK_FWD(32, 1, 4) TT_TWO_FACTOR_RANK_FWD(32, 1, 8)
        TT_TWO_FACTOR_RANK_FWD(32, 1, 16) TT_TWO_FACTOR_RANK_FWD(32, 2, 4)
        TT_TWO_FACTOR_RANK_FWD(32, 2, 8) TT_TWO_FACTOR_RANK_FWD(32, 2, 16)
        TT_TWO_FACTOR_RANK_FWD(32, 4, 4) TT_TWO_FACTOR_RANK_FWD(32, 4, 8)
        TT_TWO_FACTOR_RANK_FWD(32, 4, 16)
#undef TT_TWO_FACTOR_RANK_FWD
        return false;
      };
      const int ex = exact_shape(info);
      // Consecutive ranks at D=64 only: there they cut the forward's warp instructions by 6% and
      // its loads by 59% (ncu); at D=16 one run measured them slower (0.349 vs 0.316 ms at
      // B=65,536), within run-to-run variation (docs/benchmarks.md "v8").
      if (ex == 4 && gs == 8) return launch(forward_rank_kernel<index_t, 8, 4, 4, 32, 4>, 8);
      if (ex == 8 && gs == 16) {
        if (strided_rank_forward_env()) {
          return launch(forward_rank_kernel<index_t, 16, 4, 8, 32, 8>, 16);
        }
        return launch(forward_rank_kernel<index_t, 16, 4, 8, 32, 8, true>, 16);
      }
      // One bag per warp covers every shape that fits (nf in {32, 64, 128}, qm in {4, 8, 16}).
      if (try_lanes(gs) || try_lanes(32)) return;
    }
  }
  const KernelConfig kc = kernel_config(info);
  const int upl = kc.upl, qlm = kc.qlm;
#define TT_TWO_FACTOR_FWD(U, QL)                                                               \
  if (upl == U && qlm == QL) {                                                                 \
    forward_kernel<index_t, U, QL><<<grid, kWarpsPerBlock * 32, 0, stream>>>(P, idx, off, w,   \
                                                                             bounds, warned, out); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                            \
    return;                                                                                    \
  }
  TT_TWO_FACTOR_FWD(1, 4) TT_TWO_FACTOR_FWD(2, 4) TT_TWO_FACTOR_FWD(4, 4) TT_TWO_FACTOR_FWD(8, 4)
  TT_TWO_FACTOR_FWD(1, 8) TT_TWO_FACTOR_FWD(2, 8) TT_TWO_FACTOR_FWD(4, 8)
#undef TT_TWO_FACTOR_FWD
  TORCH_INTERNAL_ASSERT(false, "two-factor forward: no kernel for units ", upl, " q_last ", qlm);
}

template <typename index_t>
void launch_grad(const Params& P, const BatchInfo& info, const int32_t* skeys, const int32_t* svals,
                 const int32_t* bag_of, const index_t* idx, const int64_t* off, const float* w,
                 const float* dy, int64_t n, float* wgrad, cudaStream_t stream) {
  const KernelConfig kc = kernel_config(info);
  const int rpl = kc.rpl, qlm = kc.qlm;
  // Q bound 4 is instantiated for one rank per lane only (the Kaggle-sized D=16 shapes).
  const int qm = rpl == 1 ? kc.qm : std::max(kc.qm, 8);
  const int grid = grid_for((n + kChunk - 1) / kChunk * 32, kWarpsPerBlock * 32);
  // Staged lookups: a multiple of 4 floats each, as many as fill the warp's buffer (<= a chunk).
  int dpad = 4;
  bool vec = info.total_D % 4 == 0 && aligned16(dy);
  for (const auto& t : info.tables) {
    dpad = std::max(dpad, static_cast<int>((t.D + 3) / 4 * 4));
    vec = vec && t.D % 4 == 0;
  }
  const int stage = std::min(kChunk, kStageFloats / dpad);
  auto launch = [&](auto kernel) {
    kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(P, skeys, svals, bag_of, idx, off, w, dy, n,
                                                     wgrad, stage, dpad, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const int ex = staged_backward_env() ? exact_shape(info) : 0;
  if (ex == 4) return launch(grad_kernel<index_t, 1, 4, 4, true, true>);
  if (ex == 8) return launch(grad_kernel<index_t, 1, 8, 8, true, true>);
  if (!staged_backward_env() && rpl == 1 && qm <= 8) {
    if (qlm == 4) return launch(grad_kernel<index_t, 1, 8, 4, false>);
    if (qlm == 8) return launch(grad_kernel<index_t, 1, 8, 8, false>);
  }
#define TT_TWO_FACTOR_GRAD(RP, QMAX, QL)                                                       \
  if (rpl == RP && qm == QMAX && qlm == QL) return launch(grad_kernel<index_t, RP, QMAX, QL, true>);
  TT_TWO_FACTOR_GRAD(1, 4, 4) TT_TWO_FACTOR_GRAD(1, 4, 8)
  TT_TWO_FACTOR_GRAD(1, 8, 4) TT_TWO_FACTOR_GRAD(1, 16, 4) TT_TWO_FACTOR_GRAD(1, 32, 4)
  TT_TWO_FACTOR_GRAD(2, 8, 4) TT_TWO_FACTOR_GRAD(2, 16, 4) TT_TWO_FACTOR_GRAD(4, 8, 4)
  TT_TWO_FACTOR_GRAD(1, 8, 8) TT_TWO_FACTOR_GRAD(1, 16, 8) TT_TWO_FACTOR_GRAD(1, 32, 8)
  TT_TWO_FACTOR_GRAD(2, 8, 8) TT_TWO_FACTOR_GRAD(2, 16, 8) TT_TWO_FACTOR_GRAD(4, 8, 8)
#undef TT_TWO_FACTOR_GRAD
  TORCH_INTERNAL_ASSERT(false, "two-factor backward: no kernel for ranks/lane ", rpl, " Q ", qm);
}

inline int key_bits(int num_keys) {
  int b = 1;
  while ((int64_t{1} << b) <= num_keys) ++b;
  return b;
}

// The lookups sorted by (table, row) key (stable; out-of-range ones last, keyed num_keys),
// with each lookup's bag: what the backward and the distinct-row forward walk.
struct SortedLookups {
  at::Tensor skeys, svals, bag_of;  // int32 [n]: sorted keys, lookup at each sorted position
};

template <typename index_t>
SortedLookups sort_lookups(const Params& P, const BatchInfo& info, const index_t* idx,
                           const int64_t* off, int64_t n, const at::TensorOptions& iopts,
                           cudaStream_t stream) {
  TORCH_CHECK(n < (int64_t{1} << 31), "torchrec_tt: at most 2^31 - 1 lookups per call, got ", n);
  auto keys = at::empty({n}, iopts), vals = at::empty({n}, iopts);
  SortedLookups S{at::empty({n}, iopts), at::empty({n}, iopts), at::empty({n}, iopts)};
  auto warned = at::zeros({1}, iopts);
  keys_kernel<index_t><<<grid_for(n, 256), 256, 0, stream>>>(
      P, idx, off, n, static_cast<int>(info.options.bounds), warned.data_ptr<int32_t>(),
      keys.data_ptr<int32_t>(), vals.data_ptr<int32_t>(), S.bag_of.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int bits = key_bits(P.num_keys);
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys.data_ptr<int32_t>(), S.skeys.data_ptr<int32_t>(),
      vals.data_ptr<int32_t>(), S.svals.data_ptr<int32_t>(), static_cast<int>(n), 0, bits, stream));
  auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, iopts.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys.data_ptr<int32_t>(), S.skeys.data_ptr<int32_t>(),
      vals.data_ptr<int32_t>(), S.svals.data_ptr<int32_t>(), static_cast<int>(n), 0, bits, stream));
  return S;
}

inline at::Tensor forward(const BatchInfo& info, const std::vector<at::Tensor>& cc,
                          const at::Tensor& indices, const at::Tensor& offsets,
                          const std::optional<at::Tensor>& per_sample_weights) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> cores;
  for (const auto& c : cc) cores.push_back(aligned(c));
  const auto hosts = build_prefixes(info, cores);
  const Params P = make_params(info, hosts, cores, nullptr, {}, nullptr);
  const int64_t n = indices.numel();
  auto out = at::empty({info.B, info.total_D}, cores[0].options());
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t bags = info.F * info.B;
  check_offsets_kernel<<<grid_for(bags, 256), 256, 0, stream>>>(off.data_ptr<int64_t>(), bags,
                                                                info.B, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto warned = at::zeros({1}, indices.options().dtype(at::kInt));
  at::Tensor w = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  const at::Tensor idx = indices.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "tt_two_factor_forward", [&] {
    launch_forward<index_t>(P, info, idx.data_ptr<index_t>(), off.data_ptr<int64_t>(),
                            w.defined() ? w.data_ptr<float>() : nullptr,
                            static_cast<int>(info.options.bounds), warned.data_ptr<int32_t>(),
                            out.data_ptr<float>(), stream);
  });
  return out;
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor> backward(
    const BatchInfo& info, const std::vector<at::Tensor>& cc, const at::Tensor& grad_output,
    const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights, bool per_sample_weights_grad) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> cores;
  for (const auto& c : cc) cores.push_back(aligned(c));
  const auto hosts = build_prefixes(info, cores);
  // One zeroed buffer holds every core gradient and the dP of the tables with K > 2 (dP of a
  // 2-core table is core 0's gradient); each piece starts on a 16-byte boundary.
  auto pad4 = [](int64_t x) { return (x + 3) / 4 * 4; };
  std::vector<int64_t> grad_off(cores.size()), dP_off(info.tables.size());
  int64_t total = 0;
  for (size_t k = 0; k < cores.size(); ++k) {
    grad_off[k] = total;
    total += pad4(cores[k].numel());
  }
  for (size_t ti = 0; ti < info.tables.size(); ++ti) {
    const TableInfo& t = info.tables[ti];
    if (t.K == 2) {
      dP_off[ti] = grad_off[t.first_core];
    } else {
      dP_off[ti] = total;
      total += pad4(hosts[ti].P.numel());
    }
  }
  at::Tensor buf = at::zeros({total}, cores[0].options());
  std::vector<at::Tensor> grads;
  for (size_t k = 0; k < cores.size(); ++k) {
    grads.push_back(buf.narrow(0, grad_off[k], cores[k].numel()).view(cores[k].sizes()));
  }
  const int64_t n = indices.numel();
  at::Tensor wgrad = at::zeros({per_sample_weights_grad ? n : 0}, grad_output.options());
  const Params P = make_params(info, hosts, cores, buf.data_ptr<float>(), dP_off, &grads);
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t bags = info.F * info.B;
  check_offsets_kernel<<<grid_for(bags, 256), 256, 0, stream>>>(off.data_ptr<int64_t>(), bags,
                                                                info.B, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor w = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "tt_two_factor_backward", [&] {
    const SortedLookups S = sort_lookups<index_t>(P, info, idx.data_ptr<index_t>(),
                                                  off.data_ptr<int64_t>(), n,
                                                  indices.options().dtype(at::kInt), stream);
    launch_grad<index_t>(P, info, S.skeys.data_ptr<int32_t>(), S.svals.data_ptr<int32_t>(),
                         S.bag_of.data_ptr<int32_t>(), idx.data_ptr<index_t>(),
                         off.data_ptr<int64_t>(), w.defined() ? w.data_ptr<float>() : nullptr,
                         dy.data_ptr<float>(), n,
                         per_sample_weights_grad ? wgrad.data_ptr<float>() : nullptr, stream);
  });
  for (size_t ti = 0; ti < info.tables.size(); ++ti) {
    const TableInfo& t = info.tables[ti];
    if (t.K > 2) {
      prefix_backward(t, hosts[ti], buf.narrow(0, dP_off[ti], hosts[ti].P.numel()),
                      exact_levels(info), grads);
    }
  }
  return {grads, wgrad};
}

}  // namespace two_factor
