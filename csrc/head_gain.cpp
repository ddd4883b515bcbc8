// hp_fast::head_gain: multiply each attention head's output by a gain while
// writing it in the (B, T, H*dh) layout that o_proj consumes.
//
//   attn   (B, H, T, dh) if heads_first (what SDPA returns)
//          (B, T, H, dh) otherwise      (what HF attention functions return)
//          any strides: the op reads through them, so the transpose/contiguous
//          copy the model makes anyway and the gain are one pass over memory.
//   gains  (H,) or (B, H); float32 (float64 when attn is float64)
//   mask   optional bool (B, T); where False the gain is 1 (output = input)
//   out    contiguous (B, T, H*dh) in attn's dtype
//
//   out[b, t, h*dh + i] = attn[b, (h,t) | (t,h), i] * (mask[b,t] ? g[b|-, h] : 1)
//
// Math is in fp32 (fp64 for float64): each element is converted, multiplied by
// one gain and rounded once, so results are bit-identical to
// (attn.float() * g).to(attn.dtype).
//
// This file holds the CPU kernel. The schema is in module.cpp, the input checks
// shared with the CUDA kernel (cuda/head_gain.cu, linked into the same module
// when CUDA is built) in checks.h.
//
// CPU kernel: at::parallel_for over the B*T output rows (needs -fopenmp, see setup.py);
// per row, a loop over heads, each copying one dh run. Contiguous runs use AVX2/F16C
// loops on x86 CPUs where torch itself uses AVX2 or AVX512 (ATEN_CPU_CAPABILITY=default
// turns them off), portable loops elsewhere; strided runs use a scalar loop.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cstdint>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace hp_fast {
namespace {

// ---- one head's run: y[0:n] = x[0:n] * g, math in opmath_t, one rounding -------------------

// Portable version: a plain loop that -O3 vectorizes for float/double (c10's
// BFloat16 conversions are bit operations; Half conversions are slow without F16C).
template <typename scalar_t, typename opmath_t>
inline void scale_run_generic(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t n,
                              opmath_t g) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = static_cast<scalar_t>(static_cast<opmath_t>(x[i]) * g);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HP_FAST_X86_AVX2 1
// AVX2 versions, compiled for AVX2 by function attribute (the rest of the library stays
// baseline x86-64) and chosen at run time. Same single multiply and same
// round-to-nearest-even as the portable loop, so results are bit-identical.
__attribute__((target("avx2"))) void scale_run_avx2(
    const float* __restrict x, float* __restrict y, int64_t n, float g) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * g;  // auto-vectorized with ymm
}

__attribute__((target("avx2"))) void scale_run_avx2(
    const double* __restrict x, double* __restrict y, int64_t n, double g) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * g;
}

__attribute__((target("avx2,f16c"))) void scale_run_avx2(
    const c10::Half* __restrict x, c10::Half* __restrict y, int64_t n, float g) {
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  auto* ys = reinterpret_cast<uint16_t*>(y);
  const __m256 gv = _mm256_set1_ps(g);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ys + i),
                     _mm256_cvtps_ph(_mm256_mul_ps(v, gv), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) {
    ys[i] = _cvtss_sh(_cvtsh_ss(xs[i]) * g, _MM_FROUND_TO_NEAREST_INT);
  }
}

__attribute__((target("avx2"))) void scale_run_avx2(
    const c10::BFloat16* __restrict x, c10::BFloat16* __restrict y, int64_t n, float g) {
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  auto* ys = reinterpret_cast<uint16_t*>(y);
  const __m256 gv = _mm256_set1_ps(g);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7FFF);
  const __m256i qnan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // bf16 -> fp32: the 16 bits become the high half of the float
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + i)));
    const __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), gv);
    // fp32 -> bf16, round to nearest even; NaN -> canonical quiet NaN (as c10::BFloat16)
    const __m256i u = _mm256_castps_si256(r);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i b = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q));
    b = _mm256_blendv_epi8(b, qnan, is_nan);
    // 8 x u32 (each < 2^16) -> 8 x u16
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ys + i), packed);
  }
  for (; i < n; ++i) {
    y[i] = static_cast<c10::BFloat16>(static_cast<float>(x[i]) * g);
  }
}

// AVX2 path when torch itself runs AVX2/AVX512 kernels (so ATEN_CPU_CAPABILITY=default
// selects the portable loops here too) and the CPU has F16C.
bool use_avx2() {
  static const bool yes = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#endif

at::Tensor head_gain_cpu(
    const at::Tensor& attn,
    const at::Tensor& gains,
    const std::optional<at::Tensor>& mask,
    bool heads_first) {
  check_head_gain_inputs(attn, gains, mask, heads_first);
  TORCH_CHECK(
      attn.device().is_cpu(),
      "head_gain (CPU kernel): attn must be on the CPU; got ", attn.device());

  const int64_t B = attn.size(0);
  const int64_t H = heads_first ? attn.size(1) : attn.size(2);
  const int64_t T = heads_first ? attn.size(2) : attn.size(1);
  const int64_t dh = attn.size(3);
  // Strides of attn in elements, named by meaning rather than position.
  const int64_t sb = attn.stride(0);
  const int64_t sh = heads_first ? attn.stride(1) : attn.stride(2);
  const int64_t st = heads_first ? attn.stride(2) : attn.stride(1);
  const int64_t sd = attn.stride(3);

  at::Tensor out = at::empty({B, T, H * dh}, attn.options());  // contiguous
  if (out.numel() == 0) {
    return out;
  }
  // gains and mask are tiny: make them contiguous, never attn.
  const at::Tensor g = gains.contiguous();              // (H,) or (B, H)
  const int64_t g_sb = gains.dim() == 2 ? H : 0;        // per-row gains or shared
  at::Tensor m;                                         // (B, T) bool, or undefined
  if (mask.has_value()) {
    m = mask->contiguous();
  }

  const int64_t row = H * dh;  // output elements per (b, t)
  // ~32k elements per task so small problems (decode: T = 1) stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row, 1));
#ifdef HP_FAST_X86_AVX2
  const bool avx2 = use_avx2();
#else
  const bool avx2 = false;
#endif

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, attn.scalar_type(), "hp_fast::head_gain", [&] {
        using opmath_t = at::opmath_type<scalar_t>;  // float, or double for double
        const scalar_t* src = attn.const_data_ptr<scalar_t>();
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        const opmath_t* gp = g.const_data_ptr<opmath_t>();
        const bool* mp = m.defined() ? m.const_data_ptr<bool>() : nullptr;

        auto scale_run = [avx2](const scalar_t* x, scalar_t* y, int64_t n, opmath_t gain) {
#ifdef HP_FAST_X86_AVX2
          if (avx2) {
            scale_run_avx2(x, y, n, gain);
            return;
          }
#endif
          (void)avx2;
          scale_run_generic(x, y, n, gain);
        };

        at::parallel_for(0, B * T, grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / T;
            const int64_t t = r % T;
            const bool apply = mp == nullptr || mp[r];
            const scalar_t* src_bt = src + b * sb + t * st;
            scalar_t* dst_bt = dst + r * row;
            for (int64_t h = 0; h < H; ++h) {
              const scalar_t* x = src_bt + h * sh;  // dh elements, stride sd
              scalar_t* y = dst_bt + h * dh;        // dh elements, contiguous
              if (!apply) {                         // gain 1: plain copy
                if (sd == 1) {
                  std::copy(x, x + dh, y);
                } else {
                  for (int64_t i = 0; i < dh; ++i) y[i] = x[i * sd];
                }
                continue;
              }
              const opmath_t gain = gp[b * g_sb + h];
              if (sd == 1) {
                scale_run(x, y, dh, gain);  // contiguous run: vectorized
              } else {
                for (int64_t i = 0; i < dh; ++i) {
                  y[i] = static_cast<scalar_t>(
                      static_cast<opmath_t>(x[i * sd]) * gain);
                }
              }
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hp_fast, CPU, m) {
  m.impl("head_gain", &head_gain_cpu);
}

}  // namespace hp_fast
