// CUDA kernels of the table-batched TT embedding bag (forward and dense-gradient backward).
//
// Pipeline (no host synchronisation; all sizes the host needs are known from input shapes):
//   1. keys:   every lookup j gets key = (table << 40) | index and its bag; bounds are checked.
//   2. dedup:  sort the keys; unique ids by a scan over "key differs from its predecessor".
//   3. rows:   each block computes the rows of a chunk of consecutive unique keys. Sorted order
//              puts rows with the same (i_1..i_{K-1}) prefix next to each other, so the prefix
//              product is computed once per run within the chunk.
//   4. pool:   one warp per bag sums the (weighted) unique rows of its lookups; per-lookup rows
//              never exist in memory.
// The backward recomputes 1-3, reduces dY onto the unique rows (segment sums over the sorted
// lookups: deterministic), then each block backpropagates a chunk of unique rows through the
// core chain, accumulating the dP of a prefix run before pushing it further down the chain.
// Core gradients are accumulated with atomicAdd (order not deterministic) unless the call asks
// for determinism: then dY is summed per unique row by one warp in sorted order and each core
// slice's gradient by the one block that owns it (det_core_grad_kernel), with no float atomics.
// Out-of-range indices (bounds_check_mode WARNING / IGNORE) get a key that sorts last and no
// unique row, so they read and write nothing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/cub.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdlib>
#include <cstdio>
#include <type_traits>

#include "embedding_bag_common.h"
#include "ops.h"

namespace torchrec_tt {
namespace {

constexpr int kMaxTables = 64;
constexpr int kMaxFeatures = 512;
constexpr int kKeyShift = 40;  // indices must be < 2^40 (checked on the host against N)
constexpr int64_t kKeyMask = (int64_t{1} << kKeyShift) - 1;
constexpr int kThreads = 128;
constexpr int kRowsPerBlock = 8;

__host__ __device__ inline int round_up(int x, int m) {
  return (x + m - 1) / m * m;
}

struct DevTable {
  int64_t N;
  int64_t stride[kMaxCores];   // row i is in level-l prefix group i / stride[l]
  int K, R, D, pooling;
  int p[kMaxCores], q[kMaxCores], r[kMaxCores + 1];
  int Q[kMaxCores];            // rows of the level-l prefix matrix [Q[l], r[l+1]]
  int level_off[kMaxCores];    // offset of level l's buffer in shared memory
  int prefix_floats;           // sum of the level buffers
  int tc;                      // 1: rows go through the tensor-core tile path (K=3, float)
};

// Passed by value (CUDA >= 12.1 allows 32 KB of kernel parameters), so a call needs no
// host-to-device copy of its metadata and stays capturable in a CUDA graph.
template <typename scalar_t>
struct Params {
  DevTable tables[kMaxTables];
  const scalar_t* cores[kMaxTables][kMaxCores];
  scalar_t* grads[kMaxTables][kMaxCores];
  int16_t feature_table[kMaxFeatures];
  int feature_col[kMaxFeatures];
  int T, F;
  int64_t B;
  int total_D;
  int row_stride;  // max D over tables: stride of the unique-row buffers
};

template <typename scalar_t>
Params<scalar_t> make_params(const BatchInfo& info, const std::vector<at::Tensor>& cores,
                             std::vector<at::Tensor>* grads) {
  TORCH_CHECK(static_cast<int>(info.tables.size()) <= kMaxTables,
              "torchrec_tt: the CUDA kernels take at most ", kMaxTables, " tables per call, got ",
              info.tables.size());
  TORCH_CHECK(info.F <= kMaxFeatures, "torchrec_tt: the CUDA kernels take at most ",
              kMaxFeatures, " features per call, got ", info.F);
  Params<scalar_t> P{};
  P.T = static_cast<int>(info.tables.size());
  P.F = static_cast<int>(info.F);
  P.B = info.B;
  P.total_D = static_cast<int>(info.total_D);
  P.row_stride = 1;
  for (int t = 0; t < P.T; ++t) {
    const TableInfo& ti = info.tables[t];
    TORCH_CHECK(ti.N <= kKeyMask, "torchrec_tt: ", table_label(ti), " has ", ti.N,
                " rows; the CUDA kernels support up to 2^40");
    DevTable& d = P.tables[t];
    d.N = ti.N;
    d.K = static_cast<int>(ti.K);
    d.R = static_cast<int>(ti.R);
    d.D = static_cast<int>(ti.D);
    d.pooling = static_cast<int>(ti.pooling);
    int off = 0;
    for (int k = 0; k < d.K; ++k) {
      d.p[k] = static_cast<int>(ti.p[k]);
      d.q[k] = static_cast<int>(ti.q[k]);
      d.r[k] = static_cast<int>(ti.r[k]);
      d.Q[k] = static_cast<int>(ti.Q[k]);
      d.stride[k] = ti.stride[k];
      P.cores[t][k] = cores[ti.first_core + k].data_ptr<scalar_t>();
      if (grads != nullptr) {
        P.grads[t][k] = (*grads)[ti.first_core + k].data_ptr<scalar_t>();
      }
      if (k + 1 < d.K) {
        d.level_off[k] = off;
        off += static_cast<int>(ti.Q[k] * ti.r[k + 1]);
      }
    }
    d.r[d.K] = 1;
    d.prefix_floats = off;
    P.row_stride = std::max(P.row_stride, d.D);
  }
  for (int f = 0; f < P.F; ++f) {
    P.feature_table[f] = static_cast<int16_t>(info.feature_table[f]);
    P.feature_col[f] = static_cast<int>(info.feature_col[f]);
  }
  return P;
}

__device__ __forceinline__ int64_t find_bag(const int64_t* off, int64_t num_bags, int64_t j) {
  // Largest bag with off[bag] <= j (empty bags before it are skipped).
  int64_t lo = 0, hi = num_bags;  // invariant: off[lo] <= j < off[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (off[mid] <= j) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Traps unless the offsets of num_bags bags (B per feature) start at 0, never decrease and end
// at n = len(indices).
__global__ void check_offsets_kernel(const int64_t* off, int64_t num_bags, int64_t B, int64_t n) {
  for (int64_t bag = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bag < num_bags;
       bag += int64_t(gridDim.x) * blockDim.x) {
    const bool bad = off[bag + 1] < off[bag] || (bag == 0 && off[0] != 0) ||
                     (bag == num_bags - 1 && off[num_bags] != n);
    if (bad) {
      printf("torchrec_tt::tt_embedding_bag: offsets must start at 0, not decrease and end at "
             "len(indices)=%lld; violated at bag %lld (feature %lld)\n",
             static_cast<long long>(n), static_cast<long long>(bag),
             static_cast<long long>(bag / B));
      __trap();
    }
  }
}

// Key of an out-of-range lookup under WARNING / IGNORE: sorts after every real key, gets no
// unique row (uid -1) and contributes nothing.
constexpr int64_t kInvalidKey = INT64_MAX;

template <typename scalar_t, typename index_t>
__global__ void keys_kernel(const Params<scalar_t> P, const index_t* __restrict__ idx,
                            const int64_t* __restrict__ off, int64_t n, int bounds,
                            int32_t* __restrict__ warned, int64_t* __restrict__ keys,
                            int32_t* __restrict__ bag_of) {
  const int64_t num_bags = P.F * P.B;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bag = find_bag(off, num_bags, j);
    const int t = P.feature_table[bag / P.B];
    const int64_t v = static_cast<int64_t>(idx[j]);
    bag_of[j] = static_cast<int32_t>(bag);
    if (v < 0 || v >= P.tables[t].N) {
      const bool fatal = bounds == static_cast<int>(BoundsCheckMode::FATAL);
      if (fatal || (bounds == static_cast<int>(BoundsCheckMode::WARNING) &&
                    atomicCAS(warned, 0, 1) == 0)) {
        printf("torchrec_tt::tt_embedding_bag: table %d (feature %lld): index %lld at position "
               "%lld is out of range [0, %lld)%s\n",
               t, static_cast<long long>(bag / P.B), static_cast<long long>(v),
               static_cast<long long>(j), static_cast<long long>(P.tables[t].N),
               fatal ? "" : "; out-of-range lookups contribute zero (further ones in this call "
                            "are not reported)");
      }
      if (fatal) {
        __trap();  // never read or write out of bounds
      }
      keys[j] = kInvalidKey;
      continue;
    }
    keys[j] = (int64_t(t) << kKeyShift) | v;
  }
}

__global__ void unique_kernel(const int64_t* __restrict__ sorted_keys,
                              const int64_t* __restrict__ perm, const int32_t* __restrict__ uid_incl,
                              int64_t n, int64_t* __restrict__ ukey, int64_t* __restrict__ seg_start,
                              int32_t* __restrict__ uid_of, int32_t* __restrict__ num_unique) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int32_t u = uid_incl[j] - 1;
    const bool invalid = sorted_keys[j] == kInvalidKey;  // sorted last
    if (j == 0 || sorted_keys[j] != sorted_keys[j - 1]) {
      ukey[u] = sorted_keys[j];
      seg_start[u] = j;  // for the invalid run: the end of the valid lookups
    }
    uid_of[perm[j]] = invalid ? -1 : u;
    if (j == n - 1) {
      if (!invalid) {
        seg_start[u + 1] = n;
      }
      *num_unique = invalid ? u : u + 1;
    }
  }
}

// Level l of a row's prefix chain, by the whole block: P_0 = G_0[d_0] ([q_0, r_1]) and
// P_l = P_{l-1} [Q_{l-1}, r_l] @ G_l[d_l] [r_l, q_l * r_{l+1}], read as [Q_l, r_{l+1}]. `g` is
// the row's slice G_l[d_l]; `in` is P_{l-1} (unused for l = 0). No synchronisation.
template <typename scalar_t>
__device__ __forceinline__ void prefix_level(const DevTable& T, int l, const scalar_t* g,
                                             const scalar_t* in, scalar_t* out) {
  const int cols = T.q[l] * T.r[l + 1];
  if (l == 0) {
    for (int e = threadIdx.x; e < cols; e += blockDim.x) {
      out[e] = g[e];
    }
    return;
  }
  const int M = T.Q[l - 1], Kd = T.r[l];
  for (int e = threadIdx.x; e < M * cols; e += blockDim.x) {
    const int m = e / cols, c = e - m * cols;
    scalar_t s = 0;
    for (int a = 0; a < Kd; ++a) {
      s += in[m * Kd + a] * g[a * cols + c];
    }
    out[e] = s;
  }
}

// Shared-memory cache of the prefix chain P_0..P_{K-2} of the current row (all threads of the
// block hold identical copies of the bookkeeping, so branches on it are uniform).
template <typename scalar_t>
struct BlockPrefix {
  int64_t key[kMaxCores];
  int digit[kMaxCores];
  int valid;
  int table;

  __device__ void reset() {
    valid = 0;
    table = -1;
  }

  // Brings the cache to row i of table t. Returns true when P_{K-2} changed.
  __device__ bool update(const Params<scalar_t>& P, int t, int64_t i, scalar_t* sm) {
    const DevTable& T = P.tables[t];
    if (t != table) {
      valid = 0;
      table = t;
    }
    bool changed = false;
    for (int l = 0; l + 1 < T.K; ++l) {
      const int64_t k = i / T.stride[l];
      if (l < valid && key[l] == k) {
        continue;
      }
      __syncthreads();  // earlier readers of the level buffers are done
      key[l] = k;
      digit[l] = static_cast<int>(k % T.p[l]);
      const int cols = T.q[l] * T.r[l + 1];
      const scalar_t* g = P.cores[t][l] + int64_t(digit[l]) * T.r[l] * cols;
      prefix_level(T, l, g, l > 0 ? sm + T.level_off[l - 1] : nullptr, sm + T.level_off[l]);
      __syncthreads();
      valid = l + 1;
      changed = true;
    }
    return changed;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const Params<scalar_t> P, const int64_t* __restrict__ ukey,
                const int32_t* __restrict__ num_unique, scalar_t* __restrict__ rows) {
  extern __shared__ unsigned char smem_raw[];
  scalar_t* sm = reinterpret_cast<scalar_t*>(smem_raw);
  const int64_t U = *num_unique;
  for (int64_t u0 = int64_t(blockIdx.x) * kRowsPerBlock; u0 < U;
       u0 += int64_t(gridDim.x) * kRowsPerBlock) {
    BlockPrefix<scalar_t> cache;
    cache.reset();
    const int64_t u1 = min(U, u0 + kRowsPerBlock);
    for (int64_t u = u0; u < u1; ++u) {
      const int t = static_cast<int>(ukey[u] >> kKeyShift);
      if (P.tables[t].tc) {
        continue;  // computed by the tile kernels
      }
      const int64_t i = ukey[u] & kKeyMask;
      cache.update(P, t, i, sm);
      const DevTable& T = P.tables[t];
      const int qK = T.q[T.K - 1], R = T.R;
      const scalar_t* pre = sm + T.level_off[T.K - 2];
      const scalar_t* g = P.cores[t][T.K - 1] + (i % T.p[T.K - 1]) * R * qK;
      for (int d = threadIdx.x; d < T.D; d += blockDim.x) {
        const int m = d / qK, c = d - m * qK;
        scalar_t s = 0;
        for (int b = 0; b < R; ++b) {
          s += pre[m * R + b] * g[b * qK + c];
        }
        rows[u * P.row_stride + d] = s;
      }
    }
    __syncthreads();  // the next chunk overwrites the prefix buffers
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t bag_scale(const DevTable& T, int64_t len) {
  return (T.pooling == static_cast<int>(PoolingMode::MEAN) && len > 0)
             ? scalar_t(1) / static_cast<scalar_t>(len)
             : scalar_t(1);
}

template <typename scalar_t>
__global__ void pool_kernel(const Params<scalar_t> P, const int64_t* __restrict__ off,
                            const int32_t* __restrict__ uid_of, const scalar_t* __restrict__ rows,
                            const scalar_t* __restrict__ w, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t num_bags = P.F * P.B;
  for (int64_t bag = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; bag < num_bags;
       bag += int64_t(gridDim.x) * blockDim.x / 32) {
    const int f = static_cast<int>(bag / P.B);
    const int64_t b = bag - int64_t(f) * P.B;
    const DevTable& T = P.tables[P.feature_table[f]];
    const int64_t lo = off[bag], hi = off[bag + 1];
    const scalar_t scale = bag_scale<scalar_t>(T, hi - lo);
    scalar_t* dst = out + b * P.total_D + P.feature_col[f];
    for (int d = lane; d < T.D; d += 32) {
      scalar_t acc = 0;
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t u = uid_of[j];
        if (u >= 0) {
          acc += (w ? w[j] : scalar_t(1)) * rows[u * P.row_stride + d];
        }
      }
      dst[d] = acc * scale;
    }
  }
}

// dY reduced onto the unique rows: drows[u] += coef * dY[bag, feature] over u's lookups. A warp
// takes 32 consecutive sorted lookups (so a hot row's thousands of lookups are spread over many
// warps) and adds one partial sum per row it meets; drows must start at zero.
template <typename scalar_t>
__global__ void drows_kernel(const Params<scalar_t> P, const int64_t* __restrict__ off,
                             const int64_t* __restrict__ perm, const int32_t* __restrict__ uid_incl,
                             const int32_t* __restrict__ uid_of,
                             const int32_t* __restrict__ bag_of, const scalar_t* __restrict__ w,
                             const scalar_t* __restrict__ dy, int64_t n, scalar_t* __restrict__ drows) {
  const int lane = threadIdx.x & 31;
  const int64_t chunks = (n + 31) / 32;
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; c < chunks;
       c += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t s0 = c * 32, s1 = min(n, s0 + 32);
    for (int d = lane; d < P.row_stride; d += 32) {
      scalar_t acc = 0;
      int64_t u_prev = -1;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t u = uid_incl[s] - 1;
        if (u != u_prev) {
          if (u_prev >= 0) {
            atomicAdd(drows + u_prev * P.row_stride + d, acc);
          }
          acc = 0;
          u_prev = u;
        }
        const int64_t j = perm[s];
        const int64_t bag = bag_of[j];
        const int f = static_cast<int>(bag / P.B);
        const int64_t b = bag - int64_t(f) * P.B;
        const DevTable& T = P.tables[P.feature_table[f]];
        if (d < T.D && uid_of[j] >= 0) {
          const scalar_t coef =
              (w ? w[j] : scalar_t(1)) * bag_scale<scalar_t>(T, off[bag + 1] - off[bag]);
          acc += coef * dy[b * P.total_D + P.feature_col[f] + d];
        }
      }
      if (u_prev >= 0) {
        atomicAdd(drows + u_prev * P.row_stride + d, acc);
      }
    }
  }
}

template <typename scalar_t>
__global__ void weight_grad_kernel(const Params<scalar_t> P, const int64_t* __restrict__ off,
                                   const int32_t* __restrict__ bag_of,
                                   const int32_t* __restrict__ uid_of,
                                   const scalar_t* __restrict__ rows, const scalar_t* __restrict__ dy,
                                   int64_t n, scalar_t* __restrict__ wgrad) {
  const int lane = threadIdx.x & 31;
  for (int64_t j = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; j < n;
       j += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t bag = bag_of[j];
    const int f = static_cast<int>(bag / P.B);
    const int64_t b = bag - int64_t(f) * P.B;
    const DevTable& T = P.tables[P.feature_table[f]];
    const int64_t u = uid_of[j];
    const scalar_t* row = rows + max(u, int64_t{0}) * P.row_stride;
    const scalar_t* g = dy + b * P.total_D + P.feature_col[f];
    scalar_t s = 0;
    for (int d = lane; d < T.D && u >= 0; d += 32) {
      s += row[d] * g[d];
    }
    for (int o = 16; o > 0; o /= 2) {
      s += __shfl_down_sync(0xffffffffu, s, o);
    }
    if (lane == 0) {
      wgrad[j] = s * bag_scale<scalar_t>(T, off[bag + 1] - off[bag]);
    }
  }
}

// Backpropagates the accumulated dP_{K-2} of the cached prefix run down the chain.
template <typename scalar_t>
__device__ void flush_prefix_grad(const Params<scalar_t>& P, const BlockPrefix<scalar_t>& cache,
                                  scalar_t* sm, scalar_t* dsm) {
  const int t = cache.table;
  const DevTable& T = P.tables[t];
  for (int l = T.K - 2; l >= 1; --l) {
    const int cols = T.q[l] * T.r[l + 1];
    const int M = T.Q[l - 1], Kd = T.r[l];
    const scalar_t* Pin = sm + T.level_off[l - 1];
    const scalar_t* dPl = dsm + T.level_off[l];
    scalar_t* dPin = dsm + T.level_off[l - 1];
    const scalar_t* g = P.cores[t][l] + int64_t(cache.digit[l]) * Kd * cols;
    scalar_t* dg = P.grads[t][l] + int64_t(cache.digit[l]) * Kd * cols;
    // dG_l[a][c] += sum_m P_{l-1}[m][a] * dP_l[m][c]
    for (int e = threadIdx.x; e < Kd * cols; e += blockDim.x) {
      const int a = e / cols, c = e - a * cols;
      scalar_t s = 0;
      for (int m = 0; m < M; ++m) {
        s += Pin[m * Kd + a] * dPl[m * cols + c];
      }
      atomicAdd(dg + e, s);
    }
    // dP_{l-1}[m][a] = sum_c dP_l[m][c] * G_l[a][c]
    for (int e = threadIdx.x; e < M * Kd; e += blockDim.x) {
      const int m = e / Kd, a = e - m * Kd;
      scalar_t s = 0;
      for (int c = 0; c < cols; ++c) {
        s += dPl[m * cols + c] * g[a * cols + c];
      }
      dPin[e] = s;
    }
    __syncthreads();
  }
  const int n0 = T.q[0] * T.r[1];
  scalar_t* dg0 = P.grads[t][0] + int64_t(cache.digit[0]) * n0;
  for (int e = threadIdx.x; e < n0; e += blockDim.x) {
    atomicAdd(dg0 + e, dsm[e]);
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    core_grad_kernel(const Params<scalar_t> P, const int64_t* __restrict__ ukey,
                     const int32_t* __restrict__ num_unique, const scalar_t* __restrict__ drows,
                     int max_prefix_floats) {
  extern __shared__ unsigned char smem_raw[];
  scalar_t* sm = reinterpret_cast<scalar_t*>(smem_raw);  // prefix levels
  scalar_t* dsm = sm + max_prefix_floats;                 // their gradients
  const int64_t U = *num_unique;
  for (int64_t u0 = int64_t(blockIdx.x) * kRowsPerBlock; u0 < U;
       u0 += int64_t(gridDim.x) * kRowsPerBlock) {
    BlockPrefix<scalar_t> cache;
    cache.reset();
    bool have_run = false;
    const int64_t u1 = min(U, u0 + kRowsPerBlock);
    for (int64_t u = u0; u < u1; ++u) {
      const int t = static_cast<int>(ukey[u] >> kKeyShift);
      if (P.tables[t].tc) {
        continue;  // handled by the tile kernels
      }
      const int64_t i = ukey[u] & kKeyMask;
      const DevTable& T = P.tables[t];
      const bool same_run = have_run && cache.table == t && cache.valid == T.K - 1 &&
                            cache.key[T.K - 2] == i / T.stride[T.K - 2];
      if (!same_run) {
        if (have_run) {
          flush_prefix_grad(P, cache, sm, dsm);
        }
        cache.update(P, t, i, sm);
        const int top = T.Q[T.K - 2] * T.R;
        for (int e = threadIdx.x; e < top; e += blockDim.x) {
          dsm[T.level_off[T.K - 2] + e] = 0;
        }
        __syncthreads();
        have_run = true;
      }
      const int qK = T.q[T.K - 1], R = T.R, Qp = T.Q[T.K - 2];
      const int64_t iK = i % T.p[T.K - 1];
      const scalar_t* pre = sm + T.level_off[T.K - 2];
      scalar_t* dpre = dsm + T.level_off[T.K - 2];
      const scalar_t* g = P.cores[t][T.K - 1] + iK * R * qK;
      scalar_t* dg = P.grads[t][T.K - 1] + iK * R * qK;
      const scalar_t* dr = drows + u * P.row_stride;
      // dG_K[b][c] += sum_m P[m][b] * drow[m][c]
      for (int e = threadIdx.x; e < R * qK; e += blockDim.x) {
        const int b = e / qK, c = e - b * qK;
        scalar_t s = 0;
        for (int m = 0; m < Qp; ++m) {
          s += pre[m * R + b] * dr[m * qK + c];
        }
        atomicAdd(dg + e, s);
      }
      // dP[m][b] += sum_c drow[m][c] * G_K[b][c]
      for (int e = threadIdx.x; e < Qp * R; e += blockDim.x) {
        const int m = e / R, b = e - m * R;
        scalar_t s = 0;
        for (int c = 0; c < qK; ++c) {
          s += dr[m * qK + c] * g[b * qK + c];
        }
        dpre[e] += s;
      }
      __syncthreads();
    }
    if (have_run) {
      flush_prefix_grad(P, cache, sm, dsm);
    }
  }
}

// ---- Deterministic backward (no floating-point atomics) -------------------------------------

// drows[u] = sum of coef * dY over u's lookups, one warp per unique row walking them in sorted
// (stable) order, so the sum's order is fixed.
template <typename scalar_t>
__global__ void drows_det_kernel(const Params<scalar_t> P, const int64_t* __restrict__ off,
                                 const int64_t* __restrict__ perm,
                                 const int64_t* __restrict__ seg_start,
                                 const int32_t* __restrict__ num_unique,
                                 const int32_t* __restrict__ bag_of, const scalar_t* __restrict__ w,
                                 const scalar_t* __restrict__ dy, scalar_t* __restrict__ drows) {
  const int lane = threadIdx.x & 31;
  const int64_t U = *num_unique;
  for (int64_t u = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; u < U;
       u += int64_t(gridDim.x) * blockDim.x / 32) {
    for (int d = lane; d < P.row_stride; d += 32) {
      scalar_t acc = 0;
      for (int64_t s = seg_start[u]; s < seg_start[u + 1]; ++s) {
        const int64_t j = perm[s];
        const int64_t bag = bag_of[j];
        const int f = static_cast<int>(bag / P.B);
        const int64_t b = bag - int64_t(f) * P.B;
        const DevTable& T = P.tables[P.feature_table[f]];
        if (d < T.D) {
          const scalar_t coef =
              (w ? w[j] : scalar_t(1)) * bag_scale<scalar_t>(T, off[bag + 1] - off[bag]);
          acc += coef * dy[b * P.total_D + P.feature_col[f] + d];
        }
      }
      drows[u * P.row_stride + d] = acc;
    }
  }
}

// Shared-memory buffers of det_core_grad_kernel (element offsets): two ping-pong buffers for the
// left chain L = G_0..G_{k-1} and for the right chain S = G_{k+1}..G_{K-1}, and T1. The slice
// accumulator is the chunk's own partial in global memory: a whole slice (r_k q_k r_{k+1}, e.g.
// 256 KB at R=128, q=4) need not fit in shared memory.
struct DetLayout {
  int left[2], right[2], t1, total;
  int max_slice;  // largest core slice r_k * q_k * r_{k+1}: stride of the partials
};

constexpr int kDetChunk = 32;  // rows per block in the deterministic core-gradient pass

inline DetLayout det_layout(const DevTable* tables, int T) {
  int left = 1, right = 1, t1 = 1, acc = 1;
  for (int t = 0; t < T; ++t) {
    const DevTable& d = tables[t];
    for (int k = 0; k < d.K; ++k) {
      const int qleft = k == 0 ? 1 : d.Q[k - 1];
      const int qright = d.D / (qleft * d.q[k]);
      left = std::max(left, d.Q[k] * d.r[k + 1]);
      right = std::max(right, d.r[k] * qright * d.q[k]);
      t1 = std::max(t1, d.r[k] * d.q[k] * qright);
      acc = std::max(acc, d.r[k] * d.q[k] * d.r[k + 1]);
    }
  }
  DetLayout L{};
  int off = 0;
  for (int x = 0; x < 2; ++x) {
    L.left[x] = off;
    off += round_up(left, 4);
  }
  for (int x = 0; x < 2; ++x) {
    L.right[x] = off;
    off += round_up(right, 4);
  }
  L.t1 = off;
  off += round_up(t1, 4);
  L.total = off;
  L.max_slice = acc;
  return L;
}

// Core gradients of core `level` without atomics, in two passes. Unique rows are grouped by
// (table, digit of core k) and the groups cut into chunks of kDetChunk consecutive rows
// (make_groups). Pass 1: block x sums the contributions of chunk x's rows one after another
// into its own partial slice. Pass 2 (det_reduce_kernel): the partials of each group are summed
// in chunk order into the group's slice G_k[s]. Both orders are fixed, so the result is
// bit-identical run to run, and a hot digit's rows are spread over many blocks. For a row with left chain
// L [Q_left, r_k], right chain S [r_{k+1}, Q_right] and row gradient dR [Q_left, q_k, Q_right]:
//   dG_k[s][a, c, b] += sum_{m, x} L[m, a] * dR[m, c, x] * S[b, x]   (via T1 = L^T dR).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    det_core_grad_kernel(const Params<scalar_t> P, const DetLayout Ls, int level,
                         const int64_t* __restrict__ sorted2, const int64_t* __restrict__ ord,
                         const int64_t* __restrict__ group_start,
                         const int32_t* __restrict__ num_groups, int64_t n,
                         const int64_t* __restrict__ ukey, const scalar_t* __restrict__ drows,
                         int max_slice, scalar_t* __restrict__ partials) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  scalar_t* sm = reinterpret_cast<scalar_t*>(smem_raw);
  const int k = level;
  for (int64_t g = blockIdx.x; g < *num_groups; g += gridDim.x) {
    const int64_t k0 = group_start[g];
    const int64_t key = sorted2[k0];
    const int t = static_cast<int>(key >> kKeyShift);
    const DevTable& T = P.tables[t];
    const int K = T.K, rk = T.r[k], qk = T.q[k], rk1 = T.r[k + 1];
    const int qleft = k == 0 ? 1 : T.Q[k - 1];
    const int qright = T.D / (qleft * qk);
    const int slice = rk * qk * rk1;
    // Only this block touches its partial, and thread x always owns elements x, x + blockDim..,
    // so the read-modify-writes below need no synchronisation and keep a fixed order.
    scalar_t* acc = partials + g * max_slice;
    scalar_t* t1 = sm + Ls.t1;
    for (int e = threadIdx.x; e < slice; e += blockDim.x) {
      acc[e] = 0;
    }
    for (int64_t kk = k0; kk < min(n, k0 + kDetChunk) && sorted2[kk] == key; ++kk) {
      const int64_t u = ord[kk];
      const int64_t i = ukey[u] & kKeyMask;
      // Left chain: [Q_l, r_{l+1}] after level l (nothing when k == 0: L is [1, 1] = 1).
      const scalar_t* L = nullptr;
      for (int l = 0; l < k; ++l) {
        const int cols = T.q[l] * T.r[l + 1];
        const scalar_t* gl = P.cores[t][l] + ((i / T.stride[l]) % T.p[l]) * T.r[l] * cols;
        scalar_t* out = sm + Ls.left[l & 1];
        prefix_level(T, l, gl, L, out);
        __syncthreads();
        L = out;
      }
      // Right chain: [r_l, q_l * ... * q_{K-1}] after level l (nothing when k == K-1).
      const scalar_t* S = nullptr;
      int sq = 1;  // columns of S
      for (int l = K - 1; l > k; --l) {
        const int cols = T.q[l] * T.r[l + 1];
        const scalar_t* gl = P.cores[t][l] + ((i / T.stride[l]) % T.p[l]) * T.r[l] * cols;
        scalar_t* out = sm + Ls.right[l & 1];
        if (l == K - 1) {
          for (int e = threadIdx.x; e < T.r[l] * T.q[l]; e += blockDim.x) {
            out[e] = gl[e];
          }
        } else {
          // out[a, (c, x)] = sum_b G_l[a, c, b] * S[b, x]
          const int rl1 = T.r[l + 1], total = T.r[l] * T.q[l] * sq;
          for (int e = threadIdx.x; e < total; e += blockDim.x) {
            const int a = e / (T.q[l] * sq), rest = e - a * (T.q[l] * sq);
            const int c = rest / sq, x = rest - c * sq;
            scalar_t v = 0;
            for (int b = 0; b < rl1; ++b) {
              v += gl[a * cols + c * rl1 + b] * S[b * sq + x];
            }
            out[e] = v;
          }
        }
        __syncthreads();
        S = out;
        sq *= T.q[l];
      }
      // T1[a, c, x] = sum_m L[m, a] * dR[m, c, x]
      const scalar_t* dr = drows + u * P.row_stride;
      for (int e = threadIdx.x; e < rk * qk * qright; e += blockDim.x) {
        const int a = e / (qk * qright), cx = e - a * (qk * qright);
        scalar_t v = 0;
        for (int m = 0; m < qleft; ++m) {
          v += (L ? L[m * rk + a] : scalar_t(1)) * dr[m * qk * qright + cx];
        }
        t1[e] = v;
      }
      __syncthreads();
      // acc[a, c, b] += sum_x T1[a, c, x] * S[b, x]
      for (int e = threadIdx.x; e < slice; e += blockDim.x) {
        const int ac = e / rk1, b = e - ac * rk1;
        scalar_t v = 0;
        for (int x = 0; x < qright; ++x) {
          v += t1[ac * qright + x] * (S ? S[b * qright + x] : scalar_t(1));
        }
        acc[e] += v;
      }
      __syncthreads();
    }
  }
}

// Pass 2: the first chunk of each group sums its group's partials in chunk order.
template <typename scalar_t>
__global__ void det_reduce_kernel(const Params<scalar_t> P, int level,
                                  const int64_t* __restrict__ sorted2,
                                  const int64_t* __restrict__ chunk_start,
                                  const int32_t* __restrict__ num_chunks, int max_slice,
                                  const scalar_t* __restrict__ partials) {
  const int64_t C = *num_chunks;
  for (int64_t x = blockIdx.x; x < C; x += gridDim.x) {
    const int64_t key = sorted2[chunk_start[x]];
    if (x > 0 && sorted2[chunk_start[x - 1]] == key) {
      continue;  // not the group's first chunk
    }
    const int t = static_cast<int>(key >> kKeyShift);
    const DevTable& T = P.tables[t];
    const int slice = T.r[level] * T.q[level] * T.r[level + 1];
    int64_t end = x + 1;
    while (end < C && sorted2[chunk_start[end]] == key) {
      ++end;
    }
    scalar_t* dst = P.grads[t][level] + (key & kKeyMask) * slice;
    for (int e = threadIdx.x; e < slice; e += blockDim.x) {
      scalar_t v = 0;
      for (int64_t c = x; c < end; ++c) {
        v += partials[c * max_slice + e];
      }
      dst[e] = v;
    }
  }
}

// SM count of the current device, queried once per device (launch configuration is on the
// host's critical path: a step launches ~20 kernels).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kMaxDevices) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  if (cache[device] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device] = sms;
  }
  return cache[device];
}

int grid_for(int64_t work, int per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  const int64_t cap = int64_t(sm_count()) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}


// ---- Tensor-core tile path (3 cores, float32 cores, TF32 arithmetic) ------------------------
//
// Unique rows of a table are sorted by their middle digit i_2 and cut into tiles of up to TILE
// rows sharing G_2[i_2]. For a tile, the prefix products of all rows form one GEMM:
//   C[TILE*q1, q2*R2] = A[TILE*q1, R1] (the rows' G_1[i_1] slices stacked) @ G_2[i_2][R1, q2*R2]
// on tensor cores; row r's prefix P_r = C[r*q1:(r+1)*q1] viewed as [q1*q2, R2] then meets
// G_3[i_3] on CUDA cores (2*D*R2 FLOPs, the small part). The backward runs, per tile,
//   dP (from dY and G_3), dG_2[i_2] += A^T @ dP and dA = dP @ G_2^T as tensor-core GEMMs and
// pushes one R1*q2*R2 partial into dG_2 per tile instead of one per row.

constexpr int kTileThreads = 512;
constexpr int kMaxTile = 32;

struct TileLayout {
  int tile;                    // rows per tile (32 or 16)
  int a, b, c, g3, dr, w2;     // float offsets of the shared-memory buffers
  int floats;                  // total
};

// Shared-memory floats a tile of `tile` rows of table T needs, per buffer.
inline void tile_sizes(const DevTable& T, int tile, int sizes[6]) {
  const int R1p = round_up(T.r[1], 16), N2p = round_up(T.q[1] * T.r[2], 16);
  const int M = tile * T.q[0];
  sizes[0] = M * R1p;                 // A
  sizes[1] = R1p * N2p;               // B (then W1 = dG_2 partial)
  sizes[2] = M * (N2p + 4);           // C (then dP), rows padded by 4 floats (banks)
  sizes[3] = tile * (T.r[2] * T.q[2] + 4);  // the rows' G_3 slices, transposed and padded
  sizes[4] = tile * T.D;              // the rows' dY sums (backward)
  sizes[5] = M * R1p;                 // W2 = dA (backward)
}

// Marks the tables the tile path takes and lays out its shared memory; tile = 0 if none.
template <typename scalar_t>
TileLayout plan_tiles(Params<scalar_t>& P, ComputePrecision prec) {
  TileLayout L{};
  if (!std::is_same<scalar_t, float>::value || prec == ComputePrecision::FP32) {
    return L;  // CUDA-core chain kernels only
  }
  constexpr int kSmemBudget = 200 * 1024 / 4;
  // Rows per tile. At ranks >= 32 a 32-row tile needs ~140 KB of shared memory, one block per
  // SM; 16-row tiles let two blocks overlap their serial phases: measured 3-7% less GPU time per
  // step at R=32 on an H200, while at R=8 and D=16 they cost 15-20% (docs/benchmarks.md, v3.2).
  // TORCHREC_TT_MAX_TILE_ROWS=16/32 overrides, for benchmarks.
  bool wide = false;
  for (int t = 0; t < P.T; ++t) {
    const DevTable& T = P.tables[t];
    wide = wide || (T.K == 3 && T.r[1] >= 32 && T.r[2] >= 32);
  }
  const char* cap_env = std::getenv("TORCHREC_TT_MAX_TILE_ROWS");
  const int cap = cap_env != nullptr ? std::atoi(cap_env) : (wide ? 16 : kMaxTile);
  for (int tile : {kMaxTile, 16}) {
    if (tile > cap && tile != 16) {
      continue;
    }
    int mx[6] = {0, 0, 0, 0, 0, 0};
    bool any = false;
    for (int t = 0; t < P.T; ++t) {
      DevTable& T = P.tables[t];
      if (T.K != 3 || (tile * T.q[0]) % 16 != 0) {
        continue;
      }
      int sz[6];
      tile_sizes(T, tile, sz);
      int total = 0;
      for (int x : sz) {
        total += round_up(x, 32);
      }
      if (total > kSmemBudget) {
        continue;
      }
      any = true;
      for (int x = 0; x < 6; ++x) {
        mx[x] = std::max(mx[x], sz[x]);
      }
    }
    if (!any) {
      continue;
    }
    int off = 0;
    int* fields[6] = {&L.a, &L.b, &L.c, &L.g3, &L.dr, &L.w2};
    for (int x = 0; x < 6; ++x) {
      *fields[x] = off;
      off += round_up(mx[x], 32);  // 128-byte aligned buffers (WMMA needs 32)
    }
    if (off > kSmemBudget) {
      continue;  // the per-buffer maxima of different tables do not fit together
    }
    L.tile = tile;
    L.floats = off;
    for (int t = 0; t < P.T; ++t) {
      DevTable& T = P.tables[t];
      int sz[6];
      tile_sizes(T, tile, sz);
      bool fits = T.K == 3 && (tile * T.q[0]) % 16 == 0;
      for (int x = 0; fits && x < 6; ++x) {
        fits = sz[x] <= mx[x];
      }
      T.tc = fits ? 1 : 0;
    }
    return L;
  }
  return L;
}

// C[M, N] = A[M, Kd] @ B[Kd, N] on TF32 tensor cores; M, N multiples of 16, Kd of 8. LA / LB
// say how A and B are stored (col_major = the transpose is stored row-major).
template <typename LA, typename LB>
__device__ void wmma_gemm(int M, int N, int Kd, const float* A, int lda, const float* B, int ldb,
                          float* C, int ldc) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const int nt_n = N / 16, tiles = (M / 16) * nt_n;
  for (int tix = warp; tix < tiles; tix += nwarps) {
    const int mt = tix / nt_n, nt = tix - mt * nt_n;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < Kd; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> fb;
      const float* pa = std::is_same<LA, wmma::row_major>::value ? A + mt * 16 * lda + kk
                                                                  : A + kk * lda + mt * 16;
      const float* pb = std::is_same<LB, wmma::row_major>::value ? B + kk * ldb + nt * 16
                                                                  : B + nt * 16 * ldb + kk;
      wmma::load_matrix_sync(fa, pa, lda);
      wmma::load_matrix_sync(fb, pb, ldb);
#pragma unroll
      for (int i = 0; i < fa.num_elements; ++i) {
        fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
      }
#pragma unroll
      for (int i = 0; i < fb.num_elements; ++i) {
        fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
      }
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(C + mt * 16 * ldc + nt * 16, acc, ldc, wmma::mem_row_major);
  }
}

// Packs two floats (lo in the low half) into a bf16x2 / f16x2 register.
template <bool kBf16>
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&h);
  }
  return r;
}

// C[M, N] = A[M, Kd] @ B[Kd, N] with bf16 (kBf16) or fp16 operands and float32 accumulation:
// mma.sync m16n8k16, whose fragment layout is documented (PTX ISA), so the operands are read
// straight from the float32 shared-memory tiles and rounded while packing. M multiple of 16,
// N of 8, Kd of 16; LA / LB as in wmma_gemm.
template <bool kBf16, typename LA, typename LB>
__device__ void mma16_gemm(int M, int N, int Kd, const float* A, int lda, const float* B, int ldb,
                           float* C, int ldc) {
  constexpr bool a_row = std::is_same<LA, nvcuda::wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LB, nvcuda::wmma::row_major>::value;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const int grp = lane >> 2, tig = lane & 3;
  const int nt_n = N / 8, tiles = (M / 16) * nt_n;
  auto a_at = [&](int m, int k) { return a_row ? A[m * lda + k] : A[k * lda + m]; };
  auto b_at = [&](int k, int n) { return b_row ? B[k * ldb + n] : B[n * ldb + k]; };
  for (int tix = warp; tix < tiles; tix += nwarps) {
    const int m0 = (tix / nt_n) * 16, n0 = (tix % nt_n) * 8;
    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
    for (int k0 = 0; k0 < Kd; k0 += 16) {
      const int ka = k0 + 2 * tig, r0 = m0 + grp, nb = n0 + grp;
      const uint32_t a0 = pack_half2<kBf16>(a_at(r0, ka), a_at(r0, ka + 1));
      const uint32_t a1 = pack_half2<kBf16>(a_at(r0 + 8, ka), a_at(r0 + 8, ka + 1));
      const uint32_t a2 = pack_half2<kBf16>(a_at(r0, ka + 8), a_at(r0, ka + 9));
      const uint32_t a3 = pack_half2<kBf16>(a_at(r0 + 8, ka + 8), a_at(r0 + 8, ka + 9));
      const uint32_t b0 = pack_half2<kBf16>(b_at(ka, nb), b_at(ka + 1, nb));
      const uint32_t b1 = pack_half2<kBf16>(b_at(ka + 8, nb), b_at(ka + 9, nb));
      if constexpr (kBf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      }
    }
    float* c0 = C + (m0 + grp) * ldc + n0 + 2 * tig;
    c0[0] = d0;
    c0[1] = d1;
    c0[8 * ldc] = d2;
    c0[8 * ldc + 1] = d3;
  }
}

// The tile path's GEMMs in the call's compute precision (uniform branch).
template <typename LA, typename LB>
__device__ __forceinline__ void tile_gemm(int prec, int M, int N, int Kd, const float* A, int lda,
                                          const float* B, int ldb, float* C, int ldc) {
  if (prec == static_cast<int>(ComputePrecision::BF16)) {
    mma16_gemm<true, LA, LB>(M, N, Kd, A, lda, B, ldb, C, ldc);
  } else if (prec == static_cast<int>(ComputePrecision::FP16)) {
    mma16_gemm<false, LA, LB>(M, N, Kd, A, lda, B, ldb, C, ldc);
  } else {
    wmma_gemm<LA, LB>(M, N, Kd, A, lda, B, ldb, C, ldc);
  }
}

// Global -> shared copy with kBatch independent loads in flight per thread: the tile kernels
// run one or two blocks per SM, so one outstanding load per thread would leave them
// latency-bound.
template <int kBatch, typename Load, typename Store>
__device__ __forceinline__ void batched_copy(int total, Load load, Store store) {
  for (int e0 = threadIdx.x; e0 < total; e0 += blockDim.x * kBatch) {
    float v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = e0 + k * blockDim.x;
      v[k] = e < total ? load(e) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = e0 + k * blockDim.x;
      if (e < total) {
        store(e, v[k]);
      }
    }
  }
}

struct TileRows {
  int count;
  int t;
  int64_t i2;
  int64_t u[kMaxTile];
  int64_t i1[kMaxTile];
  int64_t i3[kMaxTile];
};

// Shape of a 3-core table on the tile path. A non-zero template argument fixes that dimension at
// compile time, so index arithmetic becomes shifts and small loops unroll (without that the tile
// kernels are bound by integer division); zero reads it from the table at run time.
template <int kQ1, int kQ2, int kQ3, int kR1, int kR2>
struct TileDims {
  int q1_, q2_, q3_, r1_, r2_;
  __device__ explicit TileDims(const DevTable& T)
      : q1_(T.q[0]), q2_(T.q[1]), q3_(T.q[2]), r1_(T.r[1]), r2_(T.r[2]) {}
  __device__ __forceinline__ int q1() const { return kQ1 ? kQ1 : q1_; }
  __device__ __forceinline__ int q2() const { return kQ2 ? kQ2 : q2_; }
  __device__ __forceinline__ int q3() const { return kQ3 ? kQ3 : q3_; }
  __device__ __forceinline__ int r1() const { return kR1 ? kR1 : r1_; }
  __device__ __forceinline__ int r2() const { return kR2 ? kR2 : r2_; }
  __device__ __forceinline__ int r1p() const { return round_up(r1(), 16); }
  __device__ __forceinline__ int n2p() const { return round_up(q2() * r2(), 16); }
  __device__ __forceinline__ int Q() const { return q1() * q2(); }
  __device__ __forceinline__ int D() const { return q1() * q2() * q3(); }
  __device__ __forceinline__ int g3n() const { return r2() * q3(); }
  // Shared-memory row strides, padded by 4 floats so that rows start in different banks.
  __device__ __forceinline__ int ldc() const { return n2p() + 4; }
  __device__ __forceinline__ int g3s() const { return g3n() + 4; }
  static bool matches(const DevTable& T) {
    return (!kQ1 || T.q[0] == kQ1) && (!kQ2 || T.q[1] == kQ2) && (!kQ3 || T.q[2] == kQ3) &&
           (!kR1 || T.r[1] == kR1) && (!kR2 || T.r[2] == kR2);
  }
};

// Loads A (stacked G_1 slices, zero-padded), B (G_2[i_2], zero-padded), C = A @ B and the rows'
// G_3 slices into shared memory. Returns with the block synchronised.
template <class Dm>
__device__ void load_tile_and_prefix(const Params<float>& P, const TileLayout& L, const Dm& dm,
                                     int prec, TileRows& rows, float* sm) {
  const int q1 = dm.q1(), q2 = dm.q2(), R1 = dm.r1(), R2 = dm.r2();
  const int R1p = dm.r1p(), N2p = dm.n2p(), M = L.tile * q1;
  float* A = sm + L.a;
  float* B = sm + L.b;
  float* G3 = sm + L.g3;
  const float* g1 = P.cores[rows.t][0];
  const float* g2 = P.cores[rows.t][1] + rows.i2 * R1 * q2 * R2;
  const float* g3 = P.cores[rows.t][2];
  const int64_t* i1 = rows.i1;
  const int64_t* i3 = rows.i3;
  const int count = rows.count;
  batched_copy<8>(
      M * R1p,
      [&](int e) {
        const int row = e / R1p, a = e - row * R1p;
        const int r = row / q1, j1 = row - r * q1;
        return (r < count && a < R1) ? g1[i1[r] * q1 * R1 + j1 * R1 + a] : 0.f;
      },
      [&](int e, float v) { A[e] = v; });
  batched_copy<8>(
      R1p * N2p,
      [&](int e) {
        const int a = e / N2p, c = e - a * N2p;
        return (a < R1 && c < q2 * R2) ? g2[a * q2 * R2 + c] : 0.f;
      },
      [&](int e, float v) { B[e] = v; });
  // G_3 slices stored transposed, G3[r * g3s + j3 * R2 + b], so that lanes running over b read
  // consecutive words.
  const int g3n = dm.g3n(), g3s = dm.g3s(), q3 = dm.q3();
  batched_copy<8>(
      count * g3n,
      [&](int e) {
        const int r = e / g3n;
        return g3[i3[r] * g3n + (e - r * g3n)];
      },
      [&](int e, float v) {
        const int r = e / g3n, x = e - r * g3n;
        const int b = x / q3, j3 = x - b * q3;
        G3[r * g3s + j3 * R2 + b] = v;
      });
  __syncthreads();
  tile_gemm<nvcuda::wmma::row_major, nvcuda::wmma::row_major>(prec, M, N2p, R1p, A, R1p, B, N2p,
                                                               sm + L.c, dm.ldc());
  __syncthreads();
}

// Reads tile `tile`'s rows (all sharing table t and digit i_2) into `rows`: one thread per row,
// so the dependent metadata loads of different rows overlap. Called by the whole block; returns
// synchronised.
__device__ void read_tile_rows(const Params<float>& P, const TileLayout& L, const int64_t* sorted2,
                               const int64_t* ord, const int64_t* tile_start, int64_t tile,
                               int64_t n, const int64_t* ukey, TileRows& rows) {
  const int64_t k0 = tile_start[tile];
  const int64_t g = sorted2[k0];
  const int t = static_cast<int>(g >> kKeyShift);
  const int r = threadIdx.x;
  // A group is contiguous in sorted order, so the rows of this tile are a prefix of k0.. .
  const bool mine = r < L.tile && k0 + r < n && sorted2[k0 + r] == g;
  if (mine) {
    const DevTable& T = P.tables[t];
    const int64_t u = ord[k0 + r];
    const int64_t i = ukey[u] & kKeyMask;
    rows.u[r] = u;
    rows.i1[r] = i / T.stride[0];
    rows.i3[r] = i % T.p[2];
  }
  const int count = __syncthreads_count(mine);
  if (threadIdx.x == 0) {
    rows.t = t;
    rows.i2 = g & kKeyMask;
    rows.count = count;
  }
  __syncthreads();
}

template <class Dm>
__global__ void __launch_bounds__(kTileThreads)
    tile_rows_kernel(const Params<float> P, const TileLayout L, const int64_t* __restrict__ sorted2,
                     const int64_t* __restrict__ ord, const int64_t* __restrict__ tile_start,
                     const int32_t* __restrict__ num_tiles, const int64_t* __restrict__ ukey,
                     int64_t n, int prec, float* __restrict__ out_rows) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  __shared__ TileRows rows;
  for (int64_t tile = blockIdx.x; tile < *num_tiles; tile += gridDim.x) {
    read_tile_rows(P, L, sorted2, ord, tile_start, tile, n, ukey, rows);
    const Dm dm(P.tables[rows.t]);
    load_tile_and_prefix(P, L, dm, prec, rows, sm);
    const int q1 = dm.q1(), q2 = dm.q2(), q3 = dm.q3(), R2 = dm.r2();
    const int ldc = dm.ldc(), g3s = dm.g3s(), M = L.tile * q1;
    const float* C = sm + L.c;
    const float* G3 = sm + L.g3;
    // Lanes run over the prefix rows rho = (r, j1) so that their C rows (padded stride) sit in
    // different banks; each output element is (rho, j2, j3).
    for (int e = threadIdx.x; e < M * q2 * q3; e += blockDim.x) {
      const int rho = e % M, rest = e / M;
      const int j3 = rest % q3, j2 = rest / q3;
      const int r = rho / q1, j1 = rho - r * q1;
      if (r >= rows.count) {
        continue;
      }
      const float* pre = C + rho * ldc + j2 * R2;
      const float* g = G3 + r * g3s + j3 * R2;
      float s = 0.f;
#pragma unroll 8
      for (int b = 0; b < R2; ++b) {
        s += pre[b] * g[b];
      }
      const int d = (j1 * q2 + j2) * q3 + j3;
      out_rows[rows.u[r] * P.row_stride + d] = s;
    }
    __syncthreads();
  }
}

template <class Dm>
__global__ void __launch_bounds__(kTileThreads)
    tile_grad_kernel(const Params<float> P, const TileLayout L, const int64_t* __restrict__ sorted2,
                     const int64_t* __restrict__ ord, const int64_t* __restrict__ tile_start,
                     const int32_t* __restrict__ num_tiles, const int64_t* __restrict__ ukey,
                     int64_t n, int prec, const float* __restrict__ drows) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* sm = reinterpret_cast<float*>(smem_raw);
  __shared__ TileRows rows;
  for (int64_t tile = blockIdx.x; tile < *num_tiles; tile += gridDim.x) {
    read_tile_rows(P, L, sorted2, ord, tile_start, tile, n, ukey, rows);
    const int t = rows.t;
    const Dm dm(P.tables[t]);
    load_tile_and_prefix(P, L, dm, prec, rows, sm);
    const int q1 = dm.q1(), q2 = dm.q2(), q3 = dm.q3(), R1 = dm.r1(), R2 = dm.r2(), D = dm.D();
    const int R1p = dm.r1p(), N2p = dm.n2p(), M = L.tile * q1, ldc = dm.ldc(), g3s = dm.g3s();
    float* A = sm + L.a;
    float* B = sm + L.b;
    float* C = sm + L.c;
    const float* G3 = sm + L.g3;
    float* DR = sm + L.dr;
    float* W2 = sm + L.w2;
    const int64_t* us = rows.u;
    const int rs = P.row_stride;
    batched_copy<8>(
        rows.count * D,
        [&](int e) {
          const int r = e / D;
          return drows[us[r] * rs + (e - r * D)];
        },
        [&](int e, float v) { DR[e] = v; });
    __syncthreads();
    // dG_3[i_3][b][j3] += sum_m P_r[m][b] * drow_r[m][j3]
    const int g3n = dm.g3n(), Q = dm.Q();
    for (int e = threadIdx.x; e < rows.count * g3n; e += blockDim.x) {
      const int r = e / g3n, x = e - r * g3n;
      const int b = x / q3, j3 = x - b * q3;
      float s = 0.f;
#pragma unroll 4
      for (int m = 0; m < Q; ++m) {
        const int j1 = m / q2, j2 = m - j1 * q2;
        s += C[(r * q1 + j1) * ldc + j2 * R2 + b] * DR[r * D + m * q3 + j3];
      }
      atomicAdd(P.grads[t][2] + rows.i3[r] * g3n + x, s);
    }
    __syncthreads();
    // dP_r[m][b] = sum_j3 drow_r[m][j3] * G_3[i_3][b][j3], written over C (padding stays 0).
    for (int e = threadIdx.x; e < rows.count * Q * R2; e += blockDim.x) {
      const int r = e / (Q * R2), x = e - r * (Q * R2);
      const int m = x / R2, b = x - m * R2;
      const int j1 = m / q2, j2 = m - j1 * q2;
      float s = 0.f;
#pragma unroll 4
      for (int j3 = 0; j3 < q3; ++j3) {
        s += DR[r * D + m * q3 + j3] * G3[r * g3s + j3 * R2 + b];
      }
      C[(r * q1 + j1) * ldc + j2 * R2 + b] = s;
    }
    __syncthreads();
    // dA = dP @ G_2^T  -> W2 [M, R1p]
    // dP is a gradient: in fp16 it would underflow at realistic loss scales (no loss scaling
    // here), so FP16 runs the two gradient GEMMs in TF32 (same 10-bit mantissa, fp32 range);
    // BF16 keeps fp32's range and stays bf16.
    const int gprec = prec == static_cast<int>(ComputePrecision::FP16)
                          ? static_cast<int>(ComputePrecision::TF32)
                          : prec;
    tile_gemm<nvcuda::wmma::row_major, nvcuda::wmma::col_major>(gprec, M, R1p, N2p, C, ldc, B, N2p,
                                                                W2, R1p);
    __syncthreads();
    // dG_2 partial = A^T @ dP -> over B [R1p, N2p]
    tile_gemm<nvcuda::wmma::col_major, nvcuda::wmma::row_major>(gprec, R1p, N2p, M, A, R1p, C, ldc,
                                                                B, N2p);
    __syncthreads();
    float* dg2 = P.grads[t][1] + rows.i2 * R1 * q2 * R2;
    for (int e = threadIdx.x; e < R1 * q2 * R2; e += blockDim.x) {
      const int a = e / (q2 * R2), c = e - a * (q2 * R2);
      atomicAdd(dg2 + e, B[a * N2p + c]);
    }
    for (int e = threadIdx.x; e < rows.count * q1 * R1; e += blockDim.x) {
      const int r = e / (q1 * R1), x = e - r * (q1 * R1);
      const int j1 = x / R1, a = x - j1 * R1;
      atomicAdd(P.grads[t][0] + rows.i1[r] * q1 * R1 + x, W2[(r * q1 + j1) * R1p + a]);
    }
    __syncthreads();
  }
}

// Runs `launch.template operator()<Dm>()` with the TileDims specialisation that fits every tile
// table of the call (all of them must share the shape), else the run-time-shaped one.
template <class Launch>
void dispatch_tile_dims(const DevTable* tables, int T, Launch&& launch) {
  int first = -1;
  bool same = true;
  for (int t = 0; t < T; ++t) {
    if (!tables[t].tc) {
      continue;
    }
    if (first < 0) {
      first = t;
      continue;
    }
    const DevTable &a = tables[first], &b = tables[t];
    same = same && a.q[0] == b.q[0] && a.q[1] == b.q[1] && a.q[2] == b.q[2] && a.r[1] == b.r[1] &&
           a.r[2] == b.r[2];
  }
  if (first >= 0 && same) {
    const DevTable& s = tables[first];
#define TT_TRY_DIMS(Q1, Q2, Q3, R1, R2)                                     \
  if (TileDims<Q1, Q2, Q3, R1, R2>::matches(s)) {                            \
    launch.template operator()<TileDims<Q1, Q2, Q3, R1, R2>>();              \
    return;                                                                  \
  }
    TT_TRY_DIMS(4, 4, 4, 32, 32)
    TT_TRY_DIMS(4, 4, 4, 16, 16)
    TT_TRY_DIMS(4, 4, 4, 64, 64)
    TT_TRY_DIMS(4, 4, 4, 8, 8)
    TT_TRY_DIMS(2, 2, 4, 32, 32)
    TT_TRY_DIMS(4, 4, 8, 32, 32)
#undef TT_TRY_DIMS
  }
  launch.template operator()<TileDims<0, 0, 0, 0, 0>>();
}

// Group key of unique row u at core `level`: (table << 40) | digit, for the tables a pass takes
// (the tile path's tables when only_tc, else every table with more than `level` cores);
// INT64_MAX (sorted last, ignored) otherwise.
template <typename scalar_t>
__global__ void group_key_kernel(const Params<scalar_t> P, const int64_t* __restrict__ ukey,
                                 const int32_t* __restrict__ num_unique, int64_t n, int level,
                                 bool only_tc, int64_t* __restrict__ key2) {
  const int64_t U = *num_unique;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < n;
       u += int64_t(gridDim.x) * blockDim.x) {
    int64_t k = INT64_MAX;
    if (u < U) {
      const int t = static_cast<int>(ukey[u] >> kKeyShift);
      const DevTable& T = P.tables[t];
      if (only_tc ? T.tc != 0 : T.K > level) {
        k = (int64_t(t) << kKeyShift) | (((ukey[u] & kKeyMask) / T.stride[level]) % T.p[level]);
      }
    }
    key2[u] = k;
  }
}

// Run heads of sorted keys (dedup's unique lookups, make_groups' groups); one launch instead of
// the four ATen ops a shifted compare takes. Ignored keys are INT64_MAX and sort last.
__global__ void head_flag_kernel(const int64_t* __restrict__ sorted, int64_t n,
                                 int32_t* __restrict__ flag) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    flag[k] = (k == 0 || sorted[k] != sorted[k - 1]) ? 1 : 0;
  }
}

__global__ void iota_kernel(int64_t n, int64_t* __restrict__ out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    out[k] = k;
  }
}

// Bits [0, end_bit) that order the keys (table << kKeyShift) | value of a call with T tables.
// Why sorting on those bits only is safe: value < 2^40 - 1 (N <= kKeyMask, checked in
// make_params; group digits are < p) and table <= T - 1 fits in end_bit - kKeyShift bits, so every
// real key is < 2^end_bit - 1 and its low end_bit bits are the key itself, while INT64_MAX
// (invalid / ignored) has all its low end_bit bits set: it still sorts after every real key. The
// sorted output holds the full 64-bit keys, so code comparing them for equality is unaffected.
// Radix passes scale with the bits: <= 47 of them instead of 64.
int key_end_bit(int T) {
  int bits = 1;  // T = 1 would be safe with none; one bit keeps a single rule for every T
  while ((int64_t{1} << bits) < T) {
    ++bits;
  }
  return kKeyShift + bits;
}

// Stable ascending sort of int64 keys on bits [0, end_bit): (sorted keys, int64 permutation:
// sorted position -> input position). cub directly instead of at::sort, which sorts all 64 bits
// and costs ~200 us of host time per call; temp storage comes from the caching allocator, so no
// synchronisation and the call stays capturable in a CUDA graph. Stability matters: a row's
// lookups keep their order (the deterministic dY sums rely on it).
std::pair<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& keys, int end_bit) {
  const int64_t n = keys.numel();
  // 32-bit item counts keep cub on 32-bit offsets; the unique ids are int32 anyway.
  TORCH_CHECK(n <= INT_MAX, "torchrec_tt: the CUDA kernels take at most ", INT_MAX,
              " lookups per call, got ", n);
  auto sorted = at::empty({n}, keys.options());
  auto perm = at::empty({n}, keys.options());
  if (n == 0) {
    return {sorted, perm};  // a null temp pointer would turn the sort into a size query
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto pos = at::empty({n}, keys.options());
  iota_kernel<<<grid_for(n, 256), 256, 0, stream>>>(n, pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int items = static_cast<int>(n);
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, keys.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
      pos.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), items, 0, end_bit, stream));
  auto temp = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                        keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), bytes, keys.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
      pos.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), items, 0, end_bit, stream));
  return {sorted, perm};
}

__global__ void tile_first_kernel(const int32_t* __restrict__ gflag, const int32_t* __restrict__ gid,
                                  int64_t n, int64_t* __restrict__ gfirst) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    if (gflag[k]) {
      gfirst[gid[k] - 1] = k;
    }
  }
}

__global__ void tile_flag_kernel(const int64_t* __restrict__ sorted2, const int32_t* __restrict__ gid,
                                 const int64_t* __restrict__ gfirst, int64_t n, int tile,
                                 int32_t* __restrict__ tflag) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    tflag[k] = (sorted2[k] != INT64_MAX && (k - gfirst[gid[k] - 1]) % tile == 0) ? 1 : 0;
  }
}

__global__ void tile_start_kernel(const int32_t* __restrict__ tflag, const int32_t* __restrict__ tid,
                                  int64_t n, int64_t* __restrict__ tile_start,
                                  int32_t* __restrict__ num_tiles) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    if (tflag[k]) {
      tile_start[tid[k] - 1] = k;
    }
    if (k == n - 1) {
      *num_tiles = tid[k];
    }
  }
}

// Unique rows sorted by a group key (group_key_kernel) and cut into tiles of at most `tile`
// consecutive rows of one group: tile x is ord[tile_start[x] ...] while sorted2 stays equal, up
// to `tile` rows. With a huge `tile` the tiles are the whole groups.
struct Tiles {
  at::Tensor sorted2, ord, tile_start, num_tiles;
};

template <typename scalar_t>
Tiles make_groups(const Params<scalar_t>& P, const at::Tensor& ukey, const at::Tensor& num_unique,
                  int64_t n, int level, bool only_tc, int tile) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto opts = ukey.options();
  const int g = grid_for(n, 256);
  auto key2 = at::empty({n}, opts);
  group_key_kernel<scalar_t><<<g, 256, 0, stream>>>(P, ukey.data_ptr<int64_t>(),
                                                    num_unique.data_ptr<int32_t>(), n, level,
                                                    only_tc, key2.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tiles T;
  std::tie(T.sorted2, T.ord) = sort_pairs(key2, key_end_bit(P.T));
  auto gflag = at::empty({n}, opts.dtype(at::kInt));
  head_flag_kernel<<<g, 256, 0, stream>>>(T.sorted2.data_ptr<int64_t>(), n, gflag.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto gid = at::cumsum(gflag, 0, at::kInt);
  auto gfirst = at::empty({n}, opts);
  tile_first_kernel<<<g, 256, 0, stream>>>(gflag.data_ptr<int32_t>(), gid.data_ptr<int32_t>(), n,
                                           gfirst.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto tflag = at::empty({n}, opts.dtype(at::kInt));
  tile_flag_kernel<<<g, 256, 0, stream>>>(T.sorted2.data_ptr<int64_t>(), gid.data_ptr<int32_t>(),
                                          gfirst.data_ptr<int64_t>(), n, tile,
                                          tflag.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto tid = at::cumsum(tflag, 0, at::kInt);
  T.tile_start = at::empty({n}, opts);
  T.num_tiles = at::empty({1}, opts.dtype(at::kInt));  // written by tile_start_kernel (n > 0)
  tile_start_kernel<<<g, 256, 0, stream>>>(tflag.data_ptr<int32_t>(), tid.data_ptr<int32_t>(), n,
                                           T.tile_start.data_ptr<int64_t>(),
                                           T.num_tiles.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return T;
}

bool any_table(const DevTable* tables, int T, int tc) {
  for (int t = 0; t < T; ++t) {
    if (tables[t].tc == tc) {
      return true;
    }
  }
  return false;
}

struct CudaDedup {
  at::Tensor off;         // int64 offsets
  at::Tensor perm;        // sorted position -> lookup
  at::Tensor ukey;        // unique keys (first num_unique valid)
  at::Tensor seg_start;   // lookups of unique u: perm[seg_start[u] : seg_start[u+1]]
  at::Tensor uid_of;      // lookup -> unique id
  at::Tensor bag_of;      // lookup -> bag
  at::Tensor num_unique;  // int32 [1], on the device
  at::Tensor uid_incl;    // sorted position -> unique id + 1
};

template <typename scalar_t>
CudaDedup dedup(const Params<scalar_t>& P, const at::Tensor& indices, const at::Tensor& offsets,
                BoundsCheckMode bounds) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = indices.numel();
  CudaDedup d;
  d.off = offsets.to(at::kLong).contiguous();
  const int64_t num_bags = P.F * P.B;
  if (num_bags > 0) {
    check_offsets_kernel<<<grid_for(num_bags, 256), 256, 0, stream>>>(d.off.data_ptr<int64_t>(),
                                                                     num_bags, P.B, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto opts = indices.options();
  auto keys = at::empty({n}, opts.dtype(at::kLong));
  d.bag_of = at::empty({n}, opts.dtype(at::kInt));
  auto idx = indices.contiguous();
  auto warned = at::zeros({1}, opts.dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "tt_keys", [&] {
    keys_kernel<scalar_t, index_t><<<grid_for(n, 256), 256, 0, stream>>>(
        P, idx.data_ptr<index_t>(), d.off.data_ptr<int64_t>(), n, static_cast<int>(bounds),
        warned.data_ptr<int32_t>(), keys.data_ptr<int64_t>(), d.bag_of.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Stable, so a row's lookups keep their order (the deterministic dY sums rely on it).
  at::Tensor sorted_keys, perm;
  std::tie(sorted_keys, perm) = sort_pairs(keys, key_end_bit(P.T));
  d.perm = perm;
  auto heads = at::empty({n}, opts.dtype(at::kInt));
  head_flag_kernel<<<grid_for(n, 256), 256, 0, stream>>>(sorted_keys.data_ptr<int64_t>(), n,
                                                         heads.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto uid_incl = at::cumsum(heads, 0, at::kInt);
  d.uid_incl = uid_incl;
  d.ukey = at::empty({n}, opts.dtype(at::kLong));
  d.seg_start = at::empty({n + 1}, opts.dtype(at::kLong));
  d.uid_of = at::empty({n}, opts.dtype(at::kInt));
  d.num_unique = at::empty({1}, opts.dtype(at::kInt));  // written by unique_kernel (n > 0)
  unique_kernel<<<grid_for(n, 256), 256, 0, stream>>>(
      sorted_keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), uid_incl.data_ptr<int32_t>(), n,
      d.ukey.data_ptr<int64_t>(), d.seg_start.data_ptr<int64_t>(), d.uid_of.data_ptr<int32_t>(),
      d.num_unique.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

template <typename scalar_t>
int max_prefix_floats(const Params<scalar_t>& P) {
  int m = 0;
  for (int t = 0; t < P.T; ++t) {
    m = std::max(m, P.tables[t].prefix_floats);
  }
  return m;
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  TORCH_CHECK(bytes <= 200 * 1024, "torchrec_tt: the TT kernels need ", bytes,
              " bytes of shared memory; reduce the ranks or q factors of the largest table");
  // Raise the dynamic limit whenever it could matter: static shared memory counts against the
  // default 48 KB too, so "bytes <= 48 KB" alone is not enough.
  if (bytes > 32 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// Launches the forward tile kernel (out_rows set) or the backward one (drows set) for a shape.
struct TileLaunch {
  const Params<float>& P;
  const TileLayout& L;
  const Tiles& tiles;
  const int64_t* ukey;
  int64_t n;
  float* out_rows;
  const float* drows;
  int prec;
  cudaStream_t stream;

  template <class Dm>
  void operator()() const {
    const int64_t* s2 = tiles.sorted2.data_ptr<int64_t>();
    const int64_t* ord = tiles.ord.data_ptr<int64_t>();
    const int64_t* ts = tiles.tile_start.data_ptr<int64_t>();
    const int32_t* nt = tiles.num_tiles.data_ptr<int32_t>();
    if (out_rows != nullptr) {
      const size_t smem = sizeof(float) * L.dr;  // the forward needs A, B, C and G_3 only
      allow_smem(tile_rows_kernel<Dm>, smem);
      tile_rows_kernel<Dm><<<grid_for(n, 1), kTileThreads, smem, stream>>>(P, L, s2, ord, ts, nt,
                                                                            ukey, n, prec, out_rows);
    } else {
      const size_t smem = sizeof(float) * L.floats;
      allow_smem(tile_grad_kernel<Dm>, smem);
      tile_grad_kernel<Dm><<<grid_for(n, 1), kTileThreads, smem, stream>>>(P, L, s2, ord, ts, nt,
                                                                            ukey, n, prec, drows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Rows [n, row_stride] of the unique keys (first num_unique valid): tile tables through the
// tensor-core tile kernel, the others through the per-row chain kernel.
template <typename scalar_t>
at::Tensor unique_rows(const Params<scalar_t>& P, const TileLayout& L, const CudaDedup& d,
                       const Tiles* tiles, int64_t n, ComputePrecision prec,
                       const at::TensorOptions& opts) {
  at::Tensor rows = at::empty({n, P.row_stride}, opts);
  const int64_t* ukey = d.ukey.data_ptr<int64_t>();
  const int32_t* num_unique = d.num_unique.data_ptr<int32_t>();
  scalar_t* out = rows.data_ptr<scalar_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (any_table(P.tables, P.T, 0)) {
    const size_t smem = sizeof(scalar_t) * max_prefix_floats(P);
    allow_smem(rows_kernel<scalar_t>, smem);
    rows_kernel<scalar_t><<<grid_for(n, kRowsPerBlock), kThreads, smem, stream>>>(P, ukey, num_unique, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (L.tile > 0 && any_table(P.tables, P.T, 1)) {
      TORCH_INTERNAL_ASSERT(tiles != nullptr);
      dispatch_tile_dims(P.tables, P.T, TileLaunch{P, L, *tiles, ukey, n, out, nullptr,
                                                   static_cast<int>(prec), stream});
    }
  }
  return rows;
}

template <typename scalar_t>
std::optional<Tiles> maybe_tiles(const Params<scalar_t>& P, const TileLayout& L, const CudaDedup& d,
                                 int64_t n) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (L.tile > 0 && any_table(P.tables, P.T, 1)) {
      return make_groups(P, d.ukey, d.num_unique, n, /*level=*/1, /*only_tc=*/true, L.tile);
    }
  }
  return std::nullopt;
}

template <typename scalar_t>
void run_tile_grad(const Params<scalar_t>& P, const TileLayout& L, const std::optional<Tiles>& tiles,
                   const CudaDedup& d, int64_t n, ComputePrecision prec, const at::Tensor& drows) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (tiles) {
      dispatch_tile_dims(P.tables, P.T,
                         TileLaunch{P, L, *tiles, d.ukey.data_ptr<int64_t>(), n, nullptr,
                                    drows.data_ptr<float>(), static_cast<int>(prec),
                                    c10::cuda::getCurrentCUDAStream()});
    }
  }
}

// Deterministic core gradients of every table: for each core level, the unique rows grouped by
// that core's digit, one block per group (det_core_grad_kernel).
template <typename scalar_t>
void run_det_core_grads(const Params<scalar_t>& P, const CudaDedup& d, int64_t n,
                        const at::Tensor& drows) {
  const DetLayout Ls = det_layout(P.tables, P.T);
  const size_t smem = sizeof(scalar_t) * Ls.total;
  allow_smem(det_core_grad_kernel<scalar_t>, smem);
  int max_k = 0;
  for (int t = 0; t < P.T; ++t) {
    max_k = std::max(max_k, P.tables[t].K);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int level = 0; level < max_k; ++level) {
    const Tiles chunks = make_groups(P, d.ukey, d.num_unique, n, level, /*only_tc=*/false,
                                     kDetChunk);
    // One partial slice per chunk. Chunks: at most one per kDetChunk rows plus one per group
    // (a digit value of a table), so about max_slice / kDetChunk floats per lookup.
    int64_t digits = 0;
    for (int t = 0; t < P.T; ++t) {
      digits += level < P.tables[t].K ? P.tables[t].p[level] : 0;
    }
    const int64_t max_chunks = std::min(n, (n + kDetChunk - 1) / kDetChunk + digits);
    auto partials = at::empty({max_chunks, Ls.max_slice}, drows.options());
    det_core_grad_kernel<scalar_t><<<grid_for(n, 1), kThreads, smem, stream>>>(
        P, Ls, level, chunks.sorted2.data_ptr<int64_t>(), chunks.ord.data_ptr<int64_t>(),
        chunks.tile_start.data_ptr<int64_t>(), chunks.num_tiles.data_ptr<int32_t>(), n,
        d.ukey.data_ptr<int64_t>(), drows.data_ptr<scalar_t>(), Ls.max_slice,
        partials.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    det_reduce_kernel<scalar_t><<<grid_for(n, 1), 256, 0, stream>>>(
        P, level, chunks.sorted2.data_ptr<int64_t>(), chunks.tile_start.data_ptr<int64_t>(),
        chunks.num_tiles.data_ptr<int32_t>(), Ls.max_slice, partials.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#include "embedding_bag_cuda_two_factor.cuh"

}  // namespace

at::Tensor tt_embedding_bag_cuda(
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
  const BatchInfo info = parse_and_check(op, cores, num_cores, p_shapes, q_shapes, ranks, num_rows,
                                         feature_table_map, table_names, pooling_modes, indices,
                                         offsets, per_sample_weights, bounds_check_mode,
                                         compute_precision, deterministic);
  // The forward has no atomics: `deterministic` changes nothing here.
  const KernelOptions& o = info.options;
  TORCH_CHECK(indices.is_cuda(), op, ": indices must be on a CUDA device, got ", indices.device());
  c10::cuda::CUDAGuard guard(indices.device());
  const std::vector<at::Tensor> cc = compute_cores(cores, o);
  const int64_t n = indices.numel();
  return AT_DISPATCH_FLOATING_TYPES(info.dtype, "tt_embedding_bag_cuda", [&] {
    if (n == 0 || info.B == 0) {
      return at::zeros({info.B, info.total_D}, cc[0].options());
    }
    if (two_factor::applies(info, std::is_same<scalar_t, float>::value)) {
      return two_factor::forward(info, cc, indices, offsets, per_sample_weights);
    }
    // pool_kernel writes every column of every bag (empty bags included).
    auto out = at::empty({info.B, info.total_D}, cc[0].options());
    auto P = make_params<scalar_t>(info, cc, nullptr);
    const TileLayout L = plan_tiles(P, o.precision);
    const CudaDedup d = dedup(P, indices, offsets, o.bounds);
    const auto tiles = maybe_tiles(P, L, d, n);
    auto rows = unique_rows(P, L, d, tiles ? &*tiles : nullptr, n, o.precision, cc[0].options());
    at::Tensor w = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
    pool_kernel<scalar_t><<<grid_for(info.F * info.B * 32, 256), 256, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(
        P, d.off.data_ptr<int64_t>(), d.uid_of.data_ptr<int32_t>(), rows.data_ptr<scalar_t>(),
        w.defined() ? w.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward_cuda(
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
  const BatchInfo info = parse_and_check(op, cores, num_cores, p_shapes, q_shapes, ranks, num_rows,
                                         feature_table_map, table_names, pooling_modes, indices,
                                         offsets, per_sample_weights, bounds_check_mode,
                                         compute_precision, deterministic);
  check_backward_args(op, info, grad_output, indices, per_sample_weights, per_sample_weights_grad);
  const KernelOptions& o = info.options;
  c10::cuda::CUDAGuard guard(indices.device());
  const std::vector<at::Tensor> cc = compute_cores(cores, o);
  if (indices.numel() > 0 && info.B > 0 && two_factor::applies(info, info.dtype == at::kFloat)) {
    return two_factor::backward(info, cc, grad_output, indices, offsets, per_sample_weights,
                                per_sample_weights_grad);
  }
  std::vector<at::Tensor> grads;
  for (const auto& c : cc) {
    grads.push_back(at::zeros_like(c));
  }
  const int64_t n = indices.numel();
  auto opts = grad_output.options();
  at::Tensor wgrad = at::zeros({per_sample_weights_grad ? n : 0}, opts);
  if (n == 0 || info.B == 0) {
    return {grads, wgrad};
  }
  AT_DISPATCH_FLOATING_TYPES(info.dtype, "tt_embedding_bag_backward_cuda", [&] {
    auto P = make_params<scalar_t>(info, cc, &grads);
    const TileLayout L = plan_tiles(P, o.precision);
    const CudaDedup d = dedup(P, indices, offsets, o.bounds);
    const bool need_tiles = !o.deterministic || per_sample_weights_grad;
    const auto tiles = need_tiles ? maybe_tiles(P, L, d, n) : std::nullopt;
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto dy = grad_output.contiguous();
    at::Tensor w = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    // The atomic reduction adds into drows; the deterministic one writes every row it has.
    auto drows = o.deterministic ? at::empty({n, P.row_stride}, opts)
                                 : at::zeros({n, P.row_stride}, opts);
    if (o.deterministic) {
      drows_det_kernel<scalar_t><<<grid_for(n * 32, 256), 256, 0, stream>>>(
          P, d.off.data_ptr<int64_t>(), d.perm.data_ptr<int64_t>(), d.seg_start.data_ptr<int64_t>(),
          d.num_unique.data_ptr<int32_t>(), d.bag_of.data_ptr<int32_t>(), wp,
          dy.data_ptr<scalar_t>(), drows.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      run_det_core_grads(P, d, n, drows);
    } else {
      drows_kernel<scalar_t><<<grid_for((n + 31) / 32 * 32, 256), 256, 0, stream>>>(
          P, d.off.data_ptr<int64_t>(), d.perm.data_ptr<int64_t>(), d.uid_incl.data_ptr<int32_t>(),
          d.uid_of.data_ptr<int32_t>(), d.bag_of.data_ptr<int32_t>(), wp, dy.data_ptr<scalar_t>(),
          n, drows.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (any_table(P.tables, P.T, 0)) {
        const int mp = max_prefix_floats(P);
        const size_t smem = sizeof(scalar_t) * 2 * mp;
        allow_smem(core_grad_kernel<scalar_t>, smem);
        core_grad_kernel<scalar_t><<<grid_for(n, kRowsPerBlock), kThreads, smem, stream>>>(
            P, d.ukey.data_ptr<int64_t>(), d.num_unique.data_ptr<int32_t>(),
            drows.data_ptr<scalar_t>(), mp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      run_tile_grad(P, L, tiles, d, n, o.precision, drows);
    }
    if (per_sample_weights_grad) {
      auto rows = unique_rows(P, L, d, tiles ? &*tiles : nullptr, n, o.precision, opts);
      weight_grad_kernel<scalar_t><<<grid_for(n * 32, 256), 256, 0, stream>>>(
          P, d.off.data_ptr<int64_t>(), d.bag_of.data_ptr<int32_t>(), d.uid_of.data_ptr<int32_t>(),
          rows.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), n, wgrad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grads, wgrad};
}

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("tt_embedding_bag", &tt_embedding_bag_cuda);
  m.impl("tt_embedding_bag_backward", &tt_embedding_bag_backward_cuda);
}

}  // namespace torchrec_tt
