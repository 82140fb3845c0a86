// Checks the lossy comms CUDA kernels (csrc/lossy_codec_kernels.cuh) on the CPU through the
// emulator in emu_runtime.h: runs the encode (minmax + pack) and decode kernels as the host
// wrapper in csrc/lossy_codec_cuda.cu launches them, over many geometries (odd sizes, every code
// width, several tiles per group, grid-stride, more groups than one launch takes, NaN/inf),
// and compares byte for byte with the CPU implementation (csrc/lossy_codec.h), which the Python
// tests compare with the torch-op reference. Build and run: tools/conv_emu/run_lossy.sh
#define LOSSY_EMULATE
#include "../../csrc/lossy_codec_kernels.cuh"

#include <cstdio>
#include <random>
#include <string>

using namespace torchrec_tt::lossy;

namespace {

struct Case {
  int64_t chunks, rows, block, groups;
  std::vector<int64_t> bits;
  int64_t target_blocks;  // the host wrapper passes SMs * 8; small values force few units
  int64_t max_grid;       // grid-stride when below the number of units
  bool misalign;          // input/output one float off 16-byte alignment (scalar path)
  int bad;                // 0 none, 1 NaN, 2 +inf, 3 -inf in one group
  int dist;               // 0 normal, 1 constant groups, 2 huge range, 3 tiny
};

constexpr int kThreads = 64;

template <typename F>
void run_kernel(KernelArgs a, int64_t grid, F kernel) {
  emu::launch(static_cast<unsigned>(grid), 1, kThreads, 0, [&] { kernel(a); });
}

bool check(const Case& k, std::mt19937& rng, std::string& why) {
  const Geometry geo{k.rows, k.block, k.groups};
  const int64_t n = k.rows * k.block;
  const Plan plan = make_plan(k.bits.data(), k.groups, n);
  const int64_t row_bytes = plan.encoded_bytes + 3;  // exercise padding
  const int64_t total = k.chunks * geo.chunk_stride();
  std::vector<float> xbuf(static_cast<size_t>(total + 4));
  float* x = xbuf.data() + (k.misalign ? 1 : 0);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t i = 0; i < total; ++i) {
    const float v = nd(rng);
    x[i] = k.dist == 0 ? v : k.dist == 1 ? 0.37f : k.dist == 2 ? v * 1e38f : v * 1e-40f;
  }
  if (k.dist == 1 && total > 0) x[total - 1] = -2.0f;  // one group not constant
  if (k.bad && total > 0) {
    x[total / 2] = k.bad == 1 ? NAN : (k.bad == 2 ? INFINITY : -INFINITY);
  }
  // CPU implementation
  std::vector<uint8_t> want(static_cast<size_t>(k.chunks * row_bytes), 0);
  bool want_bad = false;
  for (int64_t c = 0; c < k.chunks; ++c) {
    for (int64_t g = 0; g < k.groups; ++g) {
      want_bad |= !encode_group_host(x + c * geo.chunk_stride(), geo, g,
                                     static_cast<int>(k.bits[g]), plan,
                                     want.data() + c * row_bytes);
    }
  }
  // emulated kernels, launched as lossy_encode_cuda does
  std::vector<uint8_t> got(static_cast<size_t>(k.chunks * row_bytes), 0xAB);
  for (int64_t c = 0; c < k.chunks; ++c) {  // the wrapper zero-fills the padding
    for (int64_t b = plan.encoded_bytes; b < row_bytes; ++b) got[c * row_bytes + b] = 0;
  }
  int status = 0;
  KernelArgs a = base_args(geo, plan);
  a.x = x;
  a.data = got.data();
  a.status = &status;
  a.row_bytes = row_bytes;
  a.vec = vec_ok(geo, x);
  std::vector<float2> partial;
  for (int64_t g0 = 0; g0 < k.groups; g0 += kLaunchGroups) {
    set_groups(a, k.bits, plan, g0);
    plan_tiles(a, k.chunks, k.target_blocks, kThreads);
    partial.assign(static_cast<size_t>(a.units), float2{-7.0f, -7.0f});
    a.partial = partial.data();
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(a.units, k.max_grid));
    run_kernel(a, grid, lossy_minmax_kernel<kThreads>);
    run_kernel(a, grid, lossy_pack_kernel<kThreads>);
  }
  if (got != want) {
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i] != want[i]) {
        why = "encoded byte " + std::to_string(i) + ": kernel " + std::to_string(got[i]) +
              ", cpu " + std::to_string(want[i]);
        break;
      }
    }
    return false;
  }
  if ((status != 0) != want_bad) {
    why = "status " + std::to_string(status) + " but cpu bad " + std::to_string(want_bad);
    return false;
  }
  // decode: CPU vs kernel, from the same bytes
  std::vector<float> ycpu(static_cast<size_t>(total)), ybuf(static_cast<size_t>(total + 4), -9.f);
  float* ygot = ybuf.data() + (k.misalign ? 1 : 0);
  for (int64_t c = 0; c < k.chunks; ++c) {
    for (int64_t g = 0; g < k.groups; ++g) {
      decode_group_host(want.data() + c * row_bytes, geo, g, static_cast<int>(k.bits[g]), plan,
                        ycpu.data() + c * geo.chunk_stride());
    }
  }
  a.y = ygot;
  a.vec = vec_ok(geo, ygot);
  for (int64_t g0 = 0; g0 < k.groups; g0 += kLaunchGroups) {
    set_groups(a, k.bits, plan, g0);
    plan_tiles(a, k.chunks, k.target_blocks, kThreads);
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(a.units, k.max_grid));
    run_kernel(a, grid, lossy_unpack_kernel<kThreads>);
  }
  if (std::memcmp(ycpu.data(), ygot, static_cast<size_t>(total) * 4) != 0) {
    for (int64_t i = 0; i < total; ++i) {
      if (std::memcmp(&ycpu[i], &ygot[i], 4) != 0) {
        why = "decoded value " + std::to_string(i) + ": kernel " + std::to_string(ygot[i]) +
              ", cpu " + std::to_string(ycpu[i]);
        break;
      }
    }
    return false;
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  std::vector<int64_t> all_bits;
  for (int b = 1; b <= kMaxBits; ++b) all_bits.push_back(b);
  // every width, core layout (rows 1), n odd, several tiles per group, grid-stride
  cases.push_back({2, 1, 203, 16, all_bits, 40, 7, false, 0, 0});
  // codec layout: rows x (groups x block), block 16 (vector path), widths mixed and unsorted
  cases.push_back({3, 37, 16, 5, {5, 3, 12, 3, 16}, 9, 5, false, 0, 0});
  // block 8, many tiles (one word per thread), grid smaller than units
  cases.push_back({2, 300, 8, 3, {4, 9, 6}, 64, 3, false, 0, 0});
  // scalar paths: block not a multiple of 4, misaligned input
  cases.push_back({2, 21, 3, 4, {1, 2, 8, 11}, 6, 4, false, 0, 0});
  cases.push_back({2, 19, 16, 3, {6, 6, 7}, 6, 4, true, 0, 0});
  // rows 1, n a multiple of 4 but not 8 (vector words then a short last word)
  cases.push_back({1, 1, 1028, 2, {4, 13}, 4, 2, false, 0, 0});
  // one value per group, block 1
  cases.push_back({3, 1, 1, 6, {1, 4, 8, 9, 15, 16}, 8, 8, false, 0, 0});
  // constant groups, huge ranges (mx - mn overflows), subnormals
  cases.push_back({2, 33, 8, 3, {4, 5, 16}, 8, 4, false, 0, 1});
  cases.push_back({2, 33, 8, 3, {4, 5, 16}, 8, 4, false, 0, 2});
  cases.push_back({2, 33, 8, 3, {4, 5, 16}, 8, 4, false, 0, 3});
  // NaN / +inf / -inf in one group
  cases.push_back({2, 40, 16, 3, {4, 6, 10}, 10, 4, false, 1, 0});
  cases.push_back({2, 40, 16, 3, {4, 6, 10}, 10, 4, false, 2, 0});
  cases.push_back({1, 1, 333, 2, {3, 9}, 4, 4, false, 3, 0});
  // more groups than one launch takes
  std::vector<int64_t> many;
  for (int g = 0; g < kLaunchGroups + 13; ++g) many.push_back(1 + (g * 7) % kMaxBits);
  cases.push_back({1, 3, 8, kLaunchGroups + 13, many, 64, 64, false, 0, 0});
  int failed = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    std::string why;
    if (!check(cases[i], rng, why)) {
      std::printf("case %zu FAILED: %s\n", i, why.c_str());
      ++failed;
    }
  }
  std::printf("lossy_emu_test: %zu cases, %d failed\n", cases.size(), failed);
  return failed == 0 ? 0 : 1;
}
