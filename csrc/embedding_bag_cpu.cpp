// CPU kernels of the table-batched TT embedding bag (forward and dense-gradient backward).
//
// Work is done on the sorted unique indices of each table. Sorted order makes rows that share
// the digits (i_1..i_{K-1}) contiguous, so the prefix product G_1[i_1]...G_{K-1}[i_{K-1}] is
// computed once per group (and each shorter prefix once per its own group). The last
// contraction, row = P[Q, R] @ G_K[i_K][R, q_K], is done as R element-wise FMAs of length D
// over "tiled" copies (P repeated over q_K, G_K slices repeated over Q): q_K is often 4, too
// short for the inner loop of a plain GEMM to vectorise, D is not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>

#include "checks.h"
#include "embedding_bag_common.h"
#include "ops.h"

namespace torchrec_tt {
namespace {

// Above this many elements the tiled copy of a last core is built per row instead of once.
constexpr int64_t kMaxTiledElements = int64_t{1} << 24;

// Checks offsets (start at 0, non-decreasing, end at len(indices)); returns them as int64.
at::Tensor checked_offsets(const char* op, const BatchInfo& info, const at::Tensor& offsets,
                           int64_t num_indices) {
  auto off = offsets.to(at::kLong).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (const auto f : c10::irange(info.F)) {
    for (int64_t bag = f * info.B; bag < (f + 1) * info.B; ++bag) {
      TORCH_CHECK(o[bag + 1] >= o[bag], op, ": offsets decrease at position ", bag + 1, " (",
                  o[bag], " -> ", o[bag + 1], "), in feature ", f, " of ",
                  table_label(info.tables[info.feature_table[f]]));
    }
  }
  TORCH_CHECK(o[info.F * info.B] == num_indices, op, ": offsets must end at len(indices) = ",
              num_indices, ", got ", o[info.F * info.B]);
  return off;
}

// Sorted unique indices of one table, and for every lookup of the table its position in them
// (written into `uid`, indexed by the lookup's position in `indices`).
template <typename index_t>
std::vector<int64_t> dedup_table(const char* op, const BatchInfo& info, int64_t t,
                                 const index_t* idx, const int64_t* off, BoundsCheckMode bounds,
                                 bool* warned, int64_t* uid) {
  const TableInfo& ti = info.tables[t];
  std::vector<std::pair<int64_t, int64_t>> ranges;  // [begin, end) in `indices`
  size_t count = 0;
  for (const auto f : c10::irange(info.F)) {
    if (info.feature_table[f] != t) {
      continue;
    }
    const int64_t b = off[f * info.B], e = off[(f + 1) * info.B];
    for (int64_t j = b; j < e; ++j) {
      const int64_t v = static_cast<int64_t>(idx[j]);
      if (v >= 0 && v < ti.N) {
        continue;
      }
      TORCH_CHECK(bounds != BoundsCheckMode::FATAL, op, ": ", table_label(ti), " (feature ", f,
                  "): index ", v, " at position ", j, " is out of range [0, ", ti.N, ")");
      if (bounds == BoundsCheckMode::WARNING && !*warned) {
        TORCH_WARN(op, ": ", table_label(ti), " (feature ", f, "): index ", v, " at position ", j,
                   " is out of range [0, ", ti.N, "); out-of-range lookups contribute zero ",
                   "(further ones in this call are not reported)");
        *warned = true;
      }
    }
    ranges.emplace_back(b, e);
    count += static_cast<size_t>(e - b);
  }
  std::vector<int64_t> uniq;
  uniq.reserve(count);
  for (const auto& [b, e] : ranges) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t v = static_cast<int64_t>(idx[j]);
      if (v >= 0 && v < ti.N) {
        uniq.push_back(v);
      }
    }
  }
  std::sort(uniq.begin(), uniq.end());
  uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
  for (const auto& [b, e] : ranges) {
    at::parallel_for(b, e, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t v = static_cast<int64_t>(idx[j]);
        // -1: an out-of-range lookup (WARNING / IGNORE), which contributes nothing.
        uid[j] = (v >= 0 && v < ti.N)
                     ? std::lower_bound(uniq.begin(), uniq.end(), v) - uniq.begin()
                     : -1;
      }
    });
  }
  return uniq;
}

// C[M, N] = A[M, Kd] @ B[Kd, N], all row-major; the inner loop runs over N (contiguous).
template <typename scalar_t>
void gemm_nn(int64_t M, int64_t Kd, int64_t N, const scalar_t* A, const scalar_t* B,
             scalar_t* C) {
  std::fill(C, C + M * N, scalar_t(0));
  for (int64_t m = 0; m < M; ++m) {
    scalar_t* c = C + m * N;
    for (int64_t k = 0; k < Kd; ++k) {
      const scalar_t a = A[m * Kd + k];
      const scalar_t* b = B + k * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        c[n] += a * b[n];
      }
    }
  }
}

// C[Kd, N] += A[M, Kd]^T @ B[M, N].
template <typename scalar_t>
void gemm_tn_acc(int64_t M, int64_t Kd, int64_t N, const scalar_t* A, const scalar_t* B,
                 scalar_t* C) {
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* b = B + m * N;
    for (int64_t k = 0; k < Kd; ++k) {
      const scalar_t a = A[m * Kd + k];
      scalar_t* c = C + k * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        c[n] += a * b[n];
      }
    }
  }
}

// C[M, Kd] = A[M, N] @ B[Kd, N]^T (dot products over contiguous rows).
template <typename scalar_t>
void gemm_nt(int64_t M, int64_t N, int64_t Kd, const scalar_t* A, const scalar_t* B,
             scalar_t* C) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < Kd; ++k) {
      scalar_t s = 0;
      const scalar_t* a = A + m * N;
      const scalar_t* b = B + k * N;
#pragma omp simd reduction(+ : s)
      for (int64_t n = 0; n < N; ++n) {
        s += a[n] * b[n];
      }
      C[m * Kd + k] = s;
    }
  }
}

// Per-table view of the cores plus the tiled copy of the last core:
// tiled[i][b][m*q_K + j] = G_K[i][b][j] for m < Q[K-2], i.e. each slice repeated to length D.
template <typename scalar_t>
struct TableCores {
  const TableInfo* ti;
  std::array<const scalar_t*, kMaxCores> core{};
  std::vector<scalar_t> tiled;  // empty when too large: tiles are then built per row

  TableCores(const TableInfo& info, const std::vector<at::Tensor>& contiguous_cores) : ti(&info) {
    for (const auto k : c10::irange(info.K)) {
      core[k] = contiguous_cores[info.first_core + k].data_ptr<scalar_t>();
    }
    const int64_t pK = info.p[info.K - 1];
    if (pK * info.R * info.D <= kMaxTiledElements) {
      tiled.resize(pK * info.R * info.D);
      at::parallel_for(0, pK, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          tile_slice(i, tiled.data() + i * info.R * info.D);
        }
      });
    }
  }

  void tile_slice(int64_t i, scalar_t* out) const {
    const int64_t qK = ti->q[ti->K - 1], Qp = ti->Q[ti->K - 2];
    const scalar_t* g = core[ti->K - 1] + i * ti->R * qK;
    for (int64_t b = 0; b < ti->R; ++b) {
      for (int64_t m = 0; m < Qp; ++m) {
        std::copy(g + b * qK, g + (b + 1) * qK, out + b * ti->D + m * qK);
      }
    }
  }

  // The tiled slice of G_K[i], from the precomputed copy or built into `scratch` (R*D).
  const scalar_t* tiled_slice(int64_t i, scalar_t* scratch) const {
    if (!tiled.empty()) {
      return tiled.data() + i * ti->R * ti->D;
    }
    tile_slice(i, scratch);
    return scratch;
  }
};

// Cached prefix products of one thread: level l holds P_l = G_0[i_0] ... G_l[i_l] as
// [Q[l], r[l+1]] for the group key `key[l]`; `pexp` is the tiled transpose of the deepest level:
// pexp[b][m*q_K + j] = P_{K-2}[m][b].
template <typename scalar_t>
struct PrefixCache {
  const TableCores<scalar_t>* tc;
  std::array<int64_t, kMaxCores> key{};
  std::array<int64_t, kMaxCores> digit{};
  std::array<std::vector<scalar_t>, kMaxCores> P;
  std::vector<scalar_t> pexp;
  int64_t valid = 0;  // levels [0, valid) hold the current row's prefixes

  explicit PrefixCache(const TableCores<scalar_t>& cores) : tc(&cores) {
    const TableInfo& ti = *cores.ti;
    for (int64_t l = 0; l + 1 < ti.K; ++l) {
      P[l].resize(ti.Q[l] * ti.r[l + 1]);
    }
    pexp.resize(ti.R * ti.D);
  }

  // Key of the deepest prefix group of row i (rows with equal keys share P_{K-2}).
  int64_t group_key(int64_t i) const {
    return i / tc->ti->stride[tc->ti->K - 2];
  }

  // Makes the cache hold the prefixes of row i; returns true when P_{K-2} changed.
  bool update(int64_t i) {
    const TableInfo& ti = *tc->ti;
    bool changed = false;
    for (int64_t l = 0; l + 1 < ti.K; ++l) {
      const int64_t k = i / ti.stride[l];
      if (l < valid && key[l] == k) {
        continue;
      }
      valid = l;  // deeper levels are stale from here on
      key[l] = k;
      digit[l] = k % ti.p[l];
      const scalar_t* g = tc->core[l] + digit[l] * ti.r[l] * ti.q[l] * ti.r[l + 1];
      if (l == 0) {
        std::copy(g, g + ti.q[0] * ti.r[1], P[0].begin());
      } else {
        gemm_nn<scalar_t>(ti.Q[l - 1], ti.r[l], ti.q[l] * ti.r[l + 1], P[l - 1].data(), g,
                          P[l].data());
      }
      valid = l + 1;
      changed = true;
    }
    if (changed) {
      const int64_t qK = ti.q[ti.K - 1], Qp = ti.Q[ti.K - 2];
      const scalar_t* Pd = P[ti.K - 2].data();
      for (int64_t b = 0; b < ti.R; ++b) {
        for (int64_t m = 0; m < Qp; ++m) {
          std::fill_n(pexp.data() + b * ti.D + m * qK, qK, Pd[m * ti.R + b]);
        }
      }
    }
    return changed;
  }
};

// row[d] = sum_b pexp[b][d] * tiled[b][d]
template <typename scalar_t>
inline void last_contraction(int64_t R, int64_t D, const scalar_t* pexp, const scalar_t* tiled,
                             scalar_t* row) {
  std::fill(row, row + D, scalar_t(0));
  for (int64_t b = 0; b < R; ++b) {
    const scalar_t* x = pexp + b * D;
    const scalar_t* y = tiled + b * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      row[d] += x[d] * y[d];
    }
  }
}

// Rows [U, D] of one table's sorted unique indices.
template <typename scalar_t>
void compute_rows(const TableCores<scalar_t>& tc, const std::vector<int64_t>& uniq,
                  scalar_t* rows) {
  const TableInfo& ti = *tc.ti;
  const auto U = static_cast<int64_t>(uniq.size());
  at::parallel_for(0, U, 256, [&](int64_t lo, int64_t hi) {
    PrefixCache<scalar_t> cache(tc);
    std::vector<scalar_t> scratch(tc.tiled.empty() ? ti.R * ti.D : 0);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t i = uniq[u];
      cache.update(i);
      const scalar_t* g = tc.tiled_slice(i % ti.p[ti.K - 1], scratch.data());
      last_contraction(ti.R, ti.D, cache.pexp.data(), g, rows + u * ti.D);
    }
  });
}

struct Dedup {
  at::Tensor offsets;                       // int64, checked
  std::vector<int64_t> uid;                 // unique position of every lookup
  std::vector<std::vector<int64_t>> uniq;   // per table, sorted
};

Dedup dedup_all(const char* op, const BatchInfo& info, const at::Tensor& indices,
                const at::Tensor& offsets, BoundsCheckMode bounds) {
  Dedup d;
  bool warned = false;
  d.offsets = checked_offsets(op, info, offsets, indices.numel());
  d.uid.resize(indices.numel());
  const int64_t* off = d.offsets.data_ptr<int64_t>();
  auto idx = indices.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "tt_dedup", [&] {
    for (const auto t : c10::irange(static_cast<int64_t>(info.tables.size()))) {
      d.uniq.push_back(dedup_table<index_t>(op, info, t, idx.data_ptr<index_t>(), off,
                                            bounds, &warned, d.uid.data()));
    }
  });
  return d;
}

inline double bag_scale(int64_t pooling, int64_t len) {
  return (pooling == static_cast<int64_t>(PoolingMode::MEAN) && len > 0)
             ? 1.0 / static_cast<double>(len)
             : 1.0;
}

template <typename scalar_t>
std::vector<std::vector<scalar_t>> all_rows(const BatchInfo& info, const Dedup& d,
                                            const std::vector<at::Tensor>& cores) {
  std::vector<std::vector<scalar_t>> rows(info.tables.size());
  for (const auto t : c10::irange(info.tables.size())) {
    const TableInfo& ti = info.tables[t];
    rows[t].resize(d.uniq[t].size() * ti.D);
    TableCores<scalar_t> tc(ti, cores);
    compute_rows<scalar_t>(tc, d.uniq[t], rows[t].data());
  }
  return rows;
}

template <typename scalar_t>
at::Tensor forward_impl(const BatchInfo& info, const std::vector<at::Tensor>& cores,
                        const at::Tensor& indices, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& weights, BoundsCheckMode bounds) {
  const char* op = "torchrec_tt::tt_embedding_bag";
  Dedup d = dedup_all(op, info, indices, offsets, bounds);
  auto rows = all_rows<scalar_t>(info, d, cores);
  auto out = at::zeros({info.B, info.total_D}, indices.options().dtype(info.dtype));
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* off = d.offsets.data_ptr<int64_t>();
  at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, info.F * info.B, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t bag = lo; bag < hi; ++bag) {
      const int64_t f = bag / info.B, b = bag % info.B;
      const int64_t t = info.feature_table[f];
      const int64_t D = info.tables[t].D;
      scalar_t* dst = o + b * info.total_D + info.feature_col[f];
      const scalar_t scale = static_cast<scalar_t>(bag_scale(info.tables[t].pooling, off[bag + 1] - off[bag]));
      for (int64_t j = off[bag]; j < off[bag + 1]; ++j) {
        if (d.uid[j] < 0) {
          continue;
        }
        const scalar_t c = wp ? wp[j] * scale : scale;
        const scalar_t* src = rows[t].data() + d.uid[j] * D;
#pragma omp simd
        for (int64_t x = 0; x < D; ++x) {
          dst[x] += c * src[x];
        }
      }
    }
  });
  return out;
}

// Gradient of one table's cores from the gradients of its unique rows.
template <typename scalar_t>
void table_core_grads(const TableCores<scalar_t>& tc, const std::vector<int64_t>& uniq,
                      const scalar_t* drows, std::vector<at::Tensor>& grads) {
  const TableInfo& ti = *tc.ti;
  const auto U = static_cast<int64_t>(uniq.size());
  const int64_t D = ti.D, R = ti.R, K = ti.K;
  const int64_t qK = ti.q[K - 1], Qp = ti.Q[K - 2];
  // Deterministic reduction: fixed chunks, each with its own gradient buffer, summed in order.
  const int64_t nchunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (U + 255) / 256));
  std::vector<std::array<std::vector<scalar_t>, kMaxCores>> partial(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t clo, int64_t chi) {
    for (int64_t c = clo; c < chi; ++c) {
      auto& g = partial[c];
      for (const auto k : c10::irange(K)) {
        g[k].assign(ti.p[k] * ti.r[k] * ti.q[k] * ti.r[k + 1], scalar_t(0));
      }
      PrefixCache<scalar_t> cache(tc);
      std::vector<scalar_t> scratch(tc.tiled.empty() ? R * D : 0);
      std::vector<scalar_t> dpexp(R * D, scalar_t(0));
      std::array<std::vector<scalar_t>, kMaxCores> dP;
      for (int64_t l = 0; l + 1 < K; ++l) {
        dP[l].resize(ti.Q[l] * ti.r[l + 1]);
      }
      bool have_group = false;
      // Backpropagates the group's accumulated dpexp through the cached prefix chain.
      auto flush = [&]() {
        if (!have_group) {
          return;
        }
        scalar_t* top = dP[K - 2].data();
        for (int64_t m = 0; m < Qp; ++m) {
          for (int64_t b = 0; b < R; ++b) {
            const scalar_t* x = dpexp.data() + b * D + m * qK;
            scalar_t s = 0;
            for (int64_t j = 0; j < qK; ++j) {
              s += x[j];
            }
            top[m * R + b] = s;
          }
        }
        std::fill(dpexp.begin(), dpexp.end(), scalar_t(0));
        for (int64_t l = K - 2; l >= 1; --l) {
          const int64_t cols = ti.q[l] * ti.r[l + 1];
          const int64_t slice = ti.r[l] * cols;
          // dG_l[i_l] ([r_l, q_l r_{l+1}]) += P_{l-1}^T @ dP_l; dP_{l-1} = dP_l @ G_l[i_l]^T.
          gemm_tn_acc<scalar_t>(ti.Q[l - 1], ti.r[l], cols, cache.P[l - 1].data(), dP[l].data(),
                                g[l].data() + cache.digit[l] * slice);
          gemm_nt<scalar_t>(ti.Q[l - 1], cols, ti.r[l], dP[l].data(),
                            tc.core[l] + cache.digit[l] * slice, dP[l - 1].data());
        }
        scalar_t* g0 = g[0].data() + cache.digit[0] * ti.q[0] * ti.r[1];
        for (int64_t x = 0; x < ti.q[0] * ti.r[1]; ++x) {
          g0[x] += dP[0][x];
        }
      };
      const int64_t lo = c * U / nchunks, hi = (c + 1) * U / nchunks;
      std::vector<scalar_t> tmp(D);
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t i = uniq[u];
        if (!have_group || cache.group_key(i) != cache.key[K - 2]) {
          flush();
          cache.update(i);
          have_group = true;
        }
        const int64_t iK = i % ti.p[K - 1];
        const scalar_t* gt = tc.tiled_slice(iK, scratch.data());
        const scalar_t* dr = drows + u * D;
        scalar_t* gK = g[K - 1].data() + iK * R * qK;
        for (int64_t b = 0; b < R; ++b) {
          const scalar_t* pe = cache.pexp.data() + b * D;
          const scalar_t* ge = gt + b * D;
          scalar_t* dpe = dpexp.data() + b * D;
#pragma omp simd
          for (int64_t x = 0; x < D; ++x) {
            tmp[x] = pe[x] * dr[x];
            dpe[x] += ge[x] * dr[x];
          }
          // dG_K[i_K][b][j] += sum_m P[m][b] * drow[m][j]
          for (int64_t m = 0; m < Qp; ++m) {
            for (int64_t j = 0; j < qK; ++j) {
              gK[b * qK + j] += tmp[m * qK + j];
            }
          }
        }
      }
      flush();
    }
  });
  for (const auto k : c10::irange(K)) {
    scalar_t* dst = grads[ti.first_core + k].data_ptr<scalar_t>();
    const int64_t n = grads[ti.first_core + k].numel();
    for (const auto c : c10::irange(nchunks)) {
      const scalar_t* src = partial[c][k].data();
#pragma omp simd
      for (int64_t x = 0; x < n; ++x) {
        dst[x] += src[x];
      }
    }
  }
}

template <typename scalar_t>
std::tuple<std::vector<at::Tensor>, at::Tensor> backward_impl(
    const BatchInfo& info, const at::Tensor& grad_output, const std::vector<at::Tensor>& cores,
    const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& weights, bool weights_grad, BoundsCheckMode bounds) {
  const char* op = "torchrec_tt::tt_embedding_bag_backward";
  Dedup d = dedup_all(op, info, indices, offsets, bounds);
  const int64_t* off = d.offsets.data_ptr<int64_t>();
  auto gout = grad_output.contiguous();
  const scalar_t* dy = gout.data_ptr<scalar_t>();
  at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
  const int64_t n = indices.numel();

  // Bag of every lookup, and the lookups of each unique row (CSR by unique position).
  std::vector<int64_t> bag_of(n);
  at::parallel_for(0, info.F * info.B, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t bag = lo; bag < hi; ++bag) {
      std::fill(bag_of.begin() + off[bag], bag_of.begin() + off[bag + 1], bag);
    }
  });

  std::vector<at::Tensor> grads;
  for (const auto& c : cores) {
    grads.push_back(at::zeros_like(c, at::MemoryFormat::Contiguous));
  }
  at::Tensor wgrad = weights_grad ? at::zeros({n}, gout.options()) : at::empty({0}, gout.options());
  scalar_t* wg = weights_grad ? wgrad.data_ptr<scalar_t>() : nullptr;

  for (const auto t : c10::irange(static_cast<int64_t>(info.tables.size()))) {
    const TableInfo& ti = info.tables[t];
    const auto U = static_cast<int64_t>(d.uniq[t].size());
    if (U == 0) {
      continue;
    }
    std::vector<int64_t> start(U + 1, 0);
    std::vector<int64_t> pos;
    for (const auto f : c10::irange(info.F)) {
      if (info.feature_table[f] != t) {
        continue;
      }
      for (int64_t j = off[f * info.B]; j < off[(f + 1) * info.B]; ++j) {
        if (d.uid[j] >= 0) {
          ++start[d.uid[j] + 1];
        }
      }
    }
    std::partial_sum(start.begin(), start.end(), start.begin());
    pos.resize(start[U]);
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (const auto f : c10::irange(info.F)) {
        if (info.feature_table[f] != t) {
          continue;
        }
        for (int64_t j = off[f * info.B]; j < off[(f + 1) * info.B]; ++j) {
          if (d.uid[j] >= 0) {
            pos[fill[d.uid[j]]++] = j;
          }
        }
      }
    }
    const int64_t D = ti.D;
    // One tiled copy of the last core serves the rows (weight gradients) and the core gradients.
    TableCores<scalar_t> tc(ti, cores);
    std::vector<scalar_t> rows(weights_grad ? U * D : 0);
    if (weights_grad) {
      compute_rows<scalar_t>(tc, d.uniq[t], rows.data());
    }
    std::vector<scalar_t> drows(U * D, scalar_t(0));
    at::parallel_for(0, U, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        scalar_t* dr = drows.data() + u * D;
        for (int64_t k = start[u]; k < start[u + 1]; ++k) {
          const int64_t j = pos[k];
          const int64_t bag = bag_of[j];
          const int64_t f = bag / info.B, b = bag % info.B;
          const scalar_t scale =
              static_cast<scalar_t>(bag_scale(info.tables[t].pooling, off[bag + 1] - off[bag]));
          const scalar_t c = wp ? wp[j] * scale : scale;
          const scalar_t* g = dy + b * info.total_D + info.feature_col[f];
#pragma omp simd
          for (int64_t x = 0; x < D; ++x) {
            dr[x] += c * g[x];
          }
          if (weights_grad) {
            const scalar_t* row = rows.data() + u * D;
            scalar_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t x = 0; x < D; ++x) {
              s += row[x] * g[x];
            }
            wg[j] = s * scale;
          }
        }
      }
    });
    table_core_grads<scalar_t>(tc, d.uniq[t], drows.data(), grads);
  }
  return {grads, wgrad};
}

}  // namespace

at::Tensor tt_embedding_bag_cpu(
    const std::vector<at::Tensor>& cores,
    at::IntArrayRef num_cores,
    at::IntArrayRef p_shapes,
    at::IntArrayRef q_shapes,
    at::IntArrayRef ranks,
    at::IntArrayRef num_rows,
    at::IntArrayRef feature_table_map,
    const std::vector<std::string>& table_names,
    at::IntArrayRef pooling_modes,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t bounds_check_mode,
    int64_t compute_precision,
    bool deterministic) {
  const char* op = "torchrec_tt::tt_embedding_bag";
  const BatchInfo info = parse_and_check(
      op, cores, num_cores, p_shapes, q_shapes, ranks, num_rows, feature_table_map, table_names,
      pooling_modes, indices, offsets, per_sample_weights, bounds_check_mode, compute_precision,
      deterministic);
  // The CPU kernel is deterministic for a fixed thread count, so `deterministic` changes nothing.
  const KernelOptions& o = info.options;
  const auto cc = compute_cores(cores, o);
  return AT_DISPATCH_FLOATING_TYPES(info.dtype, "tt_embedding_bag_cpu", [&] {
    return forward_impl<scalar_t>(info, cc, indices, offsets, per_sample_weights, o.bounds);
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward_cpu(
    const at::Tensor& grad_output,
    const std::vector<at::Tensor>& cores,
    at::IntArrayRef num_cores,
    at::IntArrayRef p_shapes,
    at::IntArrayRef q_shapes,
    at::IntArrayRef ranks,
    at::IntArrayRef num_rows,
    at::IntArrayRef feature_table_map,
    const std::vector<std::string>& table_names,
    at::IntArrayRef pooling_modes,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool per_sample_weights_grad,
    int64_t bounds_check_mode,
    int64_t compute_precision,
    bool deterministic) {
  const char* op = "torchrec_tt::tt_embedding_bag_backward";
  const BatchInfo info =
      parse_and_check(op, cores, num_cores, p_shapes, q_shapes, ranks, num_rows,
                      feature_table_map, table_names, pooling_modes, indices, offsets,
                      per_sample_weights, bounds_check_mode, compute_precision, deterministic);
  check_backward_args(op, info, grad_output, indices, per_sample_weights, per_sample_weights_grad);
  const KernelOptions& o = info.options;
  const auto cc = compute_cores(cores, o);
  return AT_DISPATCH_FLOATING_TYPES(info.dtype, "tt_embedding_bag_backward_cpu", [&] {
    return backward_impl<scalar_t>(info, grad_output, cc, indices, offsets,
                                   per_sample_weights, per_sample_weights_grad, o.bounds);
  });
}

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("tt_embedding_bag", &tt_embedding_bag_cpu);
  m.impl("tt_embedding_bag_backward", &tt_embedding_bag_backward_cpu);
}

}  // namespace torchrec_tt
