// Last-core pass of the segmented two-factor backward (included by
// embedding_bag_cuda_two_factor.cuh inside namespace two_factor, after grad_kernel).
//
// Why: in the prefix-sorted pass every distinct row adds P[a]^T gsum to dG_last[s] with R * q_last
// float atomics, and on Zipf ids the rows of a table share only ~sqrt(N) last-core slices, so the
// atomics pile up on the same L2 lines (ncu, v5: the backward L2-bound at 83%). Here the rows are
// re-sorted by (table, s) (a 2-pass radix sort of ~15-bit keys), so a warp sums the rows of one
// slice in registers and flushes once per slice and chunk:
//   dG_last[s][r][c] += sum over rows (a, s) of sum_m P[a][m][r] gsum[m][c]
// with gsum the row's summed gradient that grad_kernel left in RowHandoff::rowbuf.
// Measured on the H200 (docs/benchmarks.md, "v6"): slower than the atomics in every Kaggle-7 case,
// so it runs only with TORCHREC_TT_BWD_SEGMENTED=1.

#pragma once

// One warp per chunk of kChunk rows in (table, s) order; lane <-> ranks r = lane + 32 i.
template <typename index_t, int RPL, int QM, int QLM>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
last_core_grad_kernel(const Params P, const int32_t* __restrict__ skey2,
                      const int32_t* __restrict__ spos2, const int32_t* __restrict__ svals,
                      const index_t* __restrict__ idx, const float* __restrict__ rowbuf,
                      int stride, int sbits, int sentinel, int64_t n) {
  constexpr int kDPL = (QM * QLM + 31) / 32;
  __shared__ __align__(16) float gbuf[kWarpsPerBlock][kMaxD];
  const int lane = threadIdx.x & 31;
  float* gs = gbuf[threadIdx.x >> 5];
  const int smask = (1 << sbits) - 1;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t chunk = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; chunk < chunks;
       chunk += (int64_t(gridDim.x) * blockDim.x) >> 5) {
    const int64_t begin = chunk * kChunk;
    const int cnt = static_cast<int>(min(begin + kChunk, n) - begin);
    if (skey2[begin] >= sentinel) continue;  // row starts sort first: the rest is padding
    // Lane i loads row begin + i: its key, position and prefix (one round trip for the chunk).
    int my_key = sentinel;
    int64_t my_pos = 0, my_a = 0;
    if (lane < cnt) {
      my_key = skey2[begin + lane];
      if (my_key < sentinel) {
        my_pos = spos2[begin + lane];
        const Table& MT = P.tables[my_key >> sbits];
        const int64_t v = static_cast<int64_t>(idx[svals[my_pos]]);
        my_a = div_rows(v, MT.pl, MT.N <= INT32_MAX);
      }
    }
    const int prev_key = __shfl_up_sync(0xffffffffu, my_key, 1);
    const unsigned seg_mask =
        __ballot_sync(0xffffffffu, my_key < sentinel && (lane == 0 || my_key != prev_key));
    float h[RPL][QLM];
#pragma unroll
    for (int i = 0; i < RPL; ++i)
#pragma unroll
      for (int c = 0; c < QLM; ++c) h[i][c] = 0.f;
    int cur_key = -1;
    const Table* T = nullptr;
    auto flush = [&]() {
      const int64_t s = cur_key & smask;
#pragma unroll
      for (int i = 0; i < RPL; ++i) {
        const int r = lane + 32 * i;
        if (r < T->R) atomic_add_regs<QLM>(T->dG + (s * T->R + r) * T->ql, h[i], T->ql);
#pragma unroll
        for (int c = 0; c < QLM; ++c) h[i][c] = 0.f;
      }
    };
    for (int i = 0; i < cnt; ++i) {
      const int key = __shfl_sync(0xffffffffu, my_key, i);
      if (key >= sentinel) break;
      if ((seg_mask >> i) & 1u) {
        if (cur_key >= 0) flush();
        cur_key = key;
        T = &P.tables[key >> sbits];
      }
      const int64_t pos = __shfl_sync(0xffffffffu, my_pos, i);
      const int64_t a = __shfl_sync(0xffffffffu, my_a, i);
      const int ql = T->ql, Q = T->Q, R = T->R;
      __syncwarp();
#pragma unroll
      for (int k = 0; k < kDPL; ++k) {
        const int d = lane + 32 * k;
        if (d < T->D) gs[d] = __ldg(rowbuf + pos * stride + d);
      }
      __syncwarp();
      const float* src = T->P + a * Q * R;
#pragma unroll
      for (int ii = 0; ii < RPL; ++ii) {
        const int r = lane + 32 * ii;
        if (r >= R) continue;
#pragma unroll
        for (int m = 0; m < QM; ++m) {
          if (m < Q) {
            const float p = __ldg(src + m * R + r);
            if (ql == QLM) {  // broadcast 16-byte reads of the row sum
#pragma unroll
              for (int c = 0; c < QLM; c += 4) {
                const float4 g4 = *reinterpret_cast<const float4*>(gs + m * QLM + c);
                h[ii][c] += p * g4.x;
                h[ii][c + 1] += p * g4.y;
                h[ii][c + 2] += p * g4.z;
                h[ii][c + 3] += p * g4.w;
              }
            } else {
#pragma unroll
              for (int c = 0; c < QLM; ++c) {
                if (c < ql) h[ii][c] += p * gs[m * ql + c];
              }
            }
          }
        }
      }
    }
    if (cur_key >= 0) flush();
  }
}
