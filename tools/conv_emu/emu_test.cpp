// Checks the fused TT-conv CUDA kernels (csrc/conv_cuda_kernels.cuh) on the CPU through the
// emulator in emu_runtime.h: packs random cores with tt_conv_pack_kernel, runs
// tt_conv_fused_kernel for the forward and for the (stride-1) input gradient, and compares with
// a float64 reference computed from the same rounded inputs. Build and run: tools/conv_emu/run.sh
#define TT_CONV_EMULATE
#include "../../csrc/conv_cuda_kernels.cuh"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

using namespace torchrec_tt::ttconv;

struct Problem {
  int N, C, H, W, K, r1, r2, KH, KW, sh, sw, ph, pw, dh, dw;
  bool bias;
  int force_th, force_tw;
  int force_stages = 0;  // cp.async pipeline depth (0: the planner's choice)
  int force_wn = 0;      // warps across the columns, 2 or 4 (0: the planner's choice)
};

template <typename Tag>
struct Host {
  static constexpr int S = Tag::kBytes;
  // Stores v in the tag's storage format at dst; returns the value actually stored.
  static double put(unsigned char* dst, float v) {
    if (S == 4) {
      std::memcpy(dst, &v, 4);
      return v;
    }
    const uint16_t h = Tag::kKind == 1 ? bf16_bits(v) : f16_bits(v);
    std::memcpy(dst, &h, 2);
    return get(dst);
  }
  static double get(const unsigned char* src) {
    if (S == 4) {
      float f;
      std::memcpy(&f, src, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, src, 2);
    return Tag::kKind == 1 ? emu::bits_to_float(static_cast<uint32_t>(h) << 16)
                           : emu::half_to_float(h);
  }
};

template <typename Tag>
void run_fused(const FusedPlan& plan, const FusedParams& prm) {
  const auto body = [&] {
#define TT_CASE(RP_, MT_, WN_)                                \
  if (plan.RP == RP_ && plan.MT2 == MT_ && plan.WN == WN_) {  \
    tt_conv_fused_kernel<Tag, RP_, MT_, WN_>(prm);            \
    return;                                                   \
  }
    TT_CASE(16, 1, 2) TT_CASE(16, 2, 2)
    TT_CASE(32, 1, 2) TT_CASE(32, 2, 2) TT_CASE(32, 1, 4) TT_CASE(32, 2, 4)
    TT_CASE(64, 1, 2) TT_CASE(64, 2, 2) TT_CASE(64, 1, 4) TT_CASE(64, 2, 4)
#undef TT_CASE
    std::abort();
  };
  emu::launch(static_cast<unsigned>(plan.blocks), 1, threads_for(plan.WN), plan.smem, body);
}

struct Result {
  double rel_err;
  bool all_written;
};

// One fused launch on geometry g with packed weights from the given jobs; x/ref in NHWC.
template <typename Tag>
Result run_one(const FusedGeom& g, const Problem& pr, bool transposed,
               const std::vector<unsigned char>& xbytes, const std::vector<double>& ref,
               const std::vector<unsigned char>& c0, const std::vector<unsigned char>& c1,
               const std::vector<unsigned char>& c2, const std::vector<float>& bias, int C0,
               int K0, FusedPlan* plan_out) {
  constexpr int S = Tag::kBytes;
  const FusedPlan plan =
      plan_fused(g, S, 227 * 1024, 132, pr.force_th, pr.force_tw, pr.force_stages, pr.force_wn);
  *plan_out = plan;
  if (!plan.ok) {
    std::printf("  plan failed: %s\n", plan.why);
    std::exit(2);
  }
  const PackSizes sz = pack_sizes(g, plan.RP, S);
  std::vector<uint2> packed(sz.w1 + sz.w2 + sz.w3, uint2{0xdeadbeef, 0xdeadbeef});
  PackJob jobs[3];
  make_pack_jobs(jobs, transposed, c0.data(), c1.data(), c2.data(), C0, K0, pr.r1, pr.r2, pr.KH,
                 pr.KW, plan.RP, S, packed.data());
  emu::launch(2, 3, 128, 0, [&] { tt_conv_pack_kernel<Tag>(jobs[0], jobs[1], jobs[2]); });
  for (const auto& w : packed) {
    if (w.x == 0xdeadbeef && w.y == 0xdeadbeef) {
      std::printf("  packed weights not fully written\n");
      std::exit(3);
    }
  }
  const size_t ny = static_cast<size_t>(g.N) * g.Ho * g.Wo * g.K;
  std::vector<unsigned char> y(ny * S, 0xFF);  // NaN pattern in every dtype
  const FusedParams prm =
      make_params(g, plan, S, xbytes.data(), y.data(), packed.data(), packed.data() + sz.w1,
                  packed.data() + sz.w1 + sz.w2, transposed || !pr.bias ? nullptr : bias.data());
  run_fused<Tag>(plan, prm);
  double num = 0, den = 0;
  bool written = true;
  for (size_t i = 0; i < ny; ++i) {
    const double v = Host<Tag>::get(&y[i * S]);
    if (!std::isfinite(v)) written = false;
    num += (v - ref[i]) * (v - ref[i]);
    den += ref[i] * ref[i];
  }
  return {std::sqrt(num / (den > 0 ? den : 1)), written};
}

template <typename Tag>
bool check(const Problem& pr, unsigned seed, double tol) {
  constexpr int S = Tag::kBytes;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int Ho = (pr.H + 2 * pr.ph - pr.dh * (pr.KH - 1) - 1) / pr.sh + 1;
  const int Wo = (pr.W + 2 * pr.pw - pr.dw * (pr.KW - 1) - 1) / pr.sw + 1;
  const int taps = pr.KH * pr.KW;
  auto fill = [&](std::vector<unsigned char>& bytes, std::vector<double>& vals, size_t n,
                  float scale) {
    bytes.assign(n * S, 0);
    vals.resize(n);
    for (size_t i = 0; i < n; ++i) vals[i] = Host<Tag>::put(&bytes[i * S], nd(rng) * scale);
  };
  std::vector<unsigned char> xb, c0b, c1b, c2b, gob;
  std::vector<double> x, c0, c1, c2, go;
  fill(xb, x, static_cast<size_t>(pr.N) * pr.H * pr.W * pr.C, 1.f);
  fill(c0b, c0, static_cast<size_t>(pr.r1) * pr.C, 1.f / std::sqrt(static_cast<float>(pr.C)));
  fill(c1b, c1, static_cast<size_t>(pr.r2) * pr.r1 * taps,
       1.f / std::sqrt(static_cast<float>(pr.r1 * taps)));
  fill(c2b, c2, static_cast<size_t>(pr.K) * pr.r2, 1.f / std::sqrt(static_cast<float>(pr.r2)));
  std::vector<float> bias(pr.K);
  for (auto& b : bias) b = nd(rng);
  // Dense weight W[k][c][i][j] in double.
  std::vector<double> Wd(static_cast<size_t>(pr.K) * pr.C * taps, 0.0);
  for (int k = 0; k < pr.K; ++k)
    for (int c = 0; c < pr.C; ++c)
      for (int tp = 0; tp < taps; ++tp) {
        double s = 0;
        for (int b = 0; b < pr.r2; ++b)
          for (int a = 0; a < pr.r1; ++a)
            s += c2[k * pr.r2 + b] * c1[(static_cast<size_t>(b) * pr.r1 + a) * taps + tp] *
                 c0[static_cast<size_t>(a) * pr.C + c];
        Wd[(static_cast<size_t>(k) * pr.C + c) * taps + tp] = s;
      }
  // Forward reference, NHWC.
  std::vector<double> yref(static_cast<size_t>(pr.N) * Ho * Wo * pr.K, 0.0);
  for (int n = 0; n < pr.N; ++n)
    for (int oh = 0; oh < Ho; ++oh)
      for (int ow = 0; ow < Wo; ++ow)
        for (int k = 0; k < pr.K; ++k) {
          double s = pr.bias ? bias[k] : 0.0;
          for (int i = 0; i < pr.KH; ++i)
            for (int j = 0; j < pr.KW; ++j) {
              const int ih = oh * pr.sh - pr.ph + i * pr.dh, iw = ow * pr.sw - pr.pw + j * pr.dw;
              if (ih < 0 || ih >= pr.H || iw < 0 || iw >= pr.W) continue;
              for (int c = 0; c < pr.C; ++c)
                s += x[((static_cast<size_t>(n) * pr.H + ih) * pr.W + iw) * pr.C + c] *
                     Wd[(static_cast<size_t>(k) * pr.C + c) * taps + i * pr.KW + j];
            }
          yref[((static_cast<size_t>(n) * Ho + oh) * Wo + ow) * pr.K + k] = s;
        }
  FusedGeom g{pr.N, pr.C, pr.H, pr.W, pr.K, pr.r1, pr.r2, pr.KH, pr.KW, pr.sh, pr.sw,
              pr.ph, pr.pw, pr.dh, pr.dw, Ho, Wo};
  FusedPlan plan;
  const Result fwd = run_one<Tag>(g, pr, false, xb, yref, c0b, c1b, c2b, bias, pr.C, pr.K, &plan);
  const char* name = Tag::kKind == 0 ? "tf32" : (Tag::kKind == 1 ? "bf16" : "f16");
  bool ok = fwd.all_written && fwd.rel_err < tol;
  std::printf("%-4s fwd  N%d C%d %dx%d K%d r(%d,%d) k%dx%d s%d,%d p%d,%d d%d,%d tile %dx%d RP%d "
              "WN%d P%dx%d st%d: rel_err %.2e %s%s\n",
              name, pr.N, pr.C, pr.H, pr.W, pr.K, pr.r1, pr.r2, pr.KH, pr.KW, pr.sh, pr.sw, pr.ph,
              pr.pw, pr.dh, pr.dw, plan.TH, plan.TW, plan.RP, plan.WN, plan.PH, plan.PW, plan.stages,
              fwd.rel_err,
              fwd.all_written ? "" : "UNWRITTEN ", ok ? "ok" : "FAIL");
  // Input gradient (stride 1 and padding <= dilation * (kernel - 1) only, as in conv_cuda.cu).
  if (pr.sh == 1 && pr.sw == 1 && pr.ph <= pr.dh * (pr.KH - 1) && pr.pw <= pr.dw * (pr.KW - 1)) {
    fill(gob, go, static_cast<size_t>(pr.N) * Ho * Wo * pr.K, 1.f);
    std::vector<double> gref(static_cast<size_t>(pr.N) * pr.H * pr.W * pr.C, 0.0);
    for (int n = 0; n < pr.N; ++n)
      for (int oh = 0; oh < Ho; ++oh)
        for (int ow = 0; ow < Wo; ++ow)
          for (int i = 0; i < pr.KH; ++i)
            for (int j = 0; j < pr.KW; ++j) {
              const int ih = oh - pr.ph + i * pr.dh, iw = ow - pr.pw + j * pr.dw;
              if (ih < 0 || ih >= pr.H || iw < 0 || iw >= pr.W) continue;
              for (int c = 0; c < pr.C; ++c) {
                double s = 0;
                for (int k = 0; k < pr.K; ++k)
                  s += go[((static_cast<size_t>(n) * Ho + oh) * Wo + ow) * pr.K + k] *
                       Wd[(static_cast<size_t>(k) * pr.C + c) * taps + i * pr.KW + j];
                gref[((static_cast<size_t>(n) * pr.H + ih) * pr.W + iw) * pr.C + c] += s;
              }
            }
    FusedGeom gt{pr.N, pr.K, Ho, Wo, pr.C, pr.r2, pr.r1, pr.KH, pr.KW, 1, 1,
                 pr.dh * (pr.KH - 1) - pr.ph, pr.dw * (pr.KW - 1) - pr.pw, pr.dh, pr.dw,
                 pr.H, pr.W};
    Problem prt = pr;
    prt.force_th = prt.force_tw = 0;  // the input gradient's own planner choice
    const Result bwd = run_one<Tag>(gt, prt, true, gob, gref, c0b, c1b, c2b, bias, pr.C, pr.K, &plan);
    const bool okb = bwd.all_written && bwd.rel_err < tol;
    std::printf("%-4s igrad tile %dx%d RP%d WN%d st%d: rel_err %.2e %s%s\n", name, plan.TH,
                plan.TW, plan.RP, plan.WN, plan.stages, bwd.rel_err, bwd.all_written ? "" : "UNWRITTEN ", okb ? "ok" : "FAIL");
    ok = ok && okb;
  }
  std::fflush(stdout);
  return ok;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  // N, C, H, W, K, r1, r2, KH, KW, sh, sw, ph, pw, dh, dw, bias, force tile
  std::vector<Problem> problems = {
      {1, 16, 8, 8, 16, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1, true, 8, 8},
      {2, 40, 9, 11, 24, 5, 13, 3, 3, 1, 1, 1, 1, 1, 1, true, 0, 0},
      {1, 72, 7, 10, 72, 20, 33, 3, 3, 1, 1, 1, 1, 1, 1, false, 0, 0},
      {1, 32, 10, 19, 40, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, true, 8, 16},
      {1, 24, 13, 9, 16, 8, 12, 3, 3, 2, 2, 1, 1, 1, 1, true, 0, 0},
      {1, 16, 11, 12, 32, 64, 48, 3, 3, 1, 1, 2, 2, 2, 2, true, 0, 0},
      {1, 16, 9, 9, 8, 16, 16, 5, 5, 1, 1, 2, 2, 1, 1, true, 8, 8},
      {1, 24, 6, 7, 16, 12, 16, 1, 1, 1, 1, 0, 0, 1, 1, true, 0, 0},
      {1, 16, 12, 10, 24, 16, 8, 3, 2, 2, 1, 0, 1, 1, 2, true, 4, 16},
      {1, 136, 5, 5, 136, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1, true, 0, 0},
  };
  if (quick) problems.resize(3);
  int fails = 0;
  unsigned seed = 1;
  for (auto pr : problems) {  // each dtype with a different pipeline depth
    pr.force_stages = 3;
    pr.force_wn = 4;
    fails += !check<TagF32>(pr, seed++, 3e-3);
    pr.force_stages = 2;
    pr.force_wn = 2;
    fails += !check<TagBF16>(pr, seed++, 2.5e-2);
    pr.force_stages = 4;  // the planner never picks 4 stages, so f16 exercises them here
    pr.force_wn = 0;
    fails += !check<TagF16>(pr, seed++, 4e-3);
  }
  std::printf("%s: %d failure(s)\n", fails ? "FAILED" : "PASSED", fails);
  return fails ? 1 : 0;
}
