// Argument checks of hp_fast::head_gain shared by the CPU kernel (head_gain.cpp) and the CUDA
// kernel (cuda/head_gain.cu): shapes, dtypes and devices of attn, gains and mask. The schema is
// in module.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace hp_fast {

// Every message names the bad argument and says what is expected.
inline void check_head_gain_inputs(
    const at::Tensor& attn,
    const at::Tensor& gains,
    const std::optional<at::Tensor>& mask,
    bool heads_first) {
  TORCH_CHECK(
      attn.dim() == 4,
      "head_gain: attn must be 4-D, (B, H, T, dh) with heads_first=True or "
      "(B, T, H, dh) with heads_first=False; got shape ",
      attn.sizes());
  const auto st = attn.scalar_type();
  TORCH_CHECK(
      st == at::kFloat || st == at::kHalf || st == at::kBFloat16 ||
          st == at::kDouble,
      "head_gain: attn must be float32, float16, bfloat16 or float64; got ",
      st);
  const int64_t B = attn.size(0);
  const int64_t H = heads_first ? attn.size(1) : attn.size(2);
  const int64_t T = heads_first ? attn.size(2) : attn.size(1);

  const auto gain_type = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(
      gains.scalar_type() == gain_type,
      "head_gain: gains must be ", gain_type, " for attn of dtype ", st,
      " (math is done in ", gain_type, "); got ", gains.scalar_type(),
      ". Convert with gains.to(torch.", gain_type == at::kDouble ? "float64" : "float32", ")");
  TORCH_CHECK(
      gains.device() == attn.device(),
      "head_gain: gains must be on attn's device ", attn.device(), "; got ",
      gains.device());
  TORCH_CHECK(
      (gains.dim() == 1 && gains.size(0) == H) ||
          (gains.dim() == 2 && gains.size(0) == B && gains.size(1) == H),
      "head_gain: gains must have shape (H,) = (", H, ",) or (B, H) = (", B,
      ", ", H, ") for attn of shape ", attn.sizes(),
      " (heads_first=", heads_first ? "True" : "False", "); got ",
      gains.sizes());

  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(
        m.scalar_type() == at::kBool,
        "head_gain: mask must be a bool tensor; got ", m.scalar_type());
    TORCH_CHECK(
        m.device() == attn.device(),
        "head_gain: mask must be on attn's device ", attn.device(), "; got ",
        m.device());
    TORCH_CHECK(
        m.dim() == 2 && m.size(0) == B && m.size(1) == T,
        "head_gain: mask must have shape (B, T) = (", B, ", ", T,
        ") for attn of shape ", attn.sizes(), " (heads_first=",
        heads_first ? "True" : "False", "); got ", m.sizes());
  }
}

}  // namespace hp_fast
