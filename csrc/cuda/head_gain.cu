// CUDA kernel for hp_fast::head_gain (schema: ../module.cpp; semantics: ../head_gain.cpp).
//
//   out[b, t, h*dh + i] = attn[b, (h,t) | (t,h), i] * (mask[b,t] ? g[b|-, h] : 1)
//
// One pass: each thread reads one chunk of a head's dh run through attn's strides
// and writes it to the contiguous (B, T, H*dh) output. Math in fp32 (fp64 for
// float64), one rounding per element, no fast-math: bit-identical to the CPU kernel.
//
// Fast path: 16-byte loads/stores (8 half/bf16, 4 float, 2 double per thread) when
// the dh dimension is contiguous, dh*elem_size is a multiple of 16, the data pointer
// is 16-byte aligned and every other stride keeps head starts 16-byte aligned.
// Otherwise a scalar kernel, one element per thread.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../checks.h"  // check_head_gain_inputs, shared with the CPU kernel

#include <algorithm>
#include <cstdint>
#include <limits>

namespace hp_fast {

namespace {

// VEC elements of scalar_t packed into one 16-byte, 16-byte-aligned word.
template <typename scalar_t, int VEC>
struct alignas(16) Pack {
  scalar_t v[VEC];
};

// Strides and sizes the kernels need, in elements.
template <typename index_t>
struct Geometry {
  index_t T, H, dh;      // sizes (B is implied by the element count)
  index_t sb, st, sh, sd;  // attn strides for batch, token, head, and within a head
  index_t g_sb;          // gains stride over batch: H for (B, H) gains, 0 for (H,)
};

// Vectorized kernel: thread `idx` handles output elements [idx*VEC, idx*VEC + VEC).
// Requires sd == 1, dh % VEC == 0 and 16-byte aligned head starts.
template <typename scalar_t, typename index_t, int VEC>
__global__ void head_gain_vec_kernel(
    const scalar_t* __restrict__ src,  // attn
    scalar_t* __restrict__ dst,        // out, contiguous (B, T, H*dh)
    const at::opmath_type<scalar_t>* __restrict__ gains,  // contiguous (H,) or (B, H)
    const bool* __restrict__ mask,     // contiguous (B, T), or nullptr
    Geometry<index_t> geo,
    index_t n_packs) {                 // B*T*H*dh / VEC
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const index_t packs_per_head = geo.dh / VEC;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < n_packs; idx += stride) {
    const index_t ip = idx % packs_per_head;  // pack within the head
    const index_t rh = idx / packs_per_head;  // (b*T + t)*H + h
    const index_t h = rh % geo.H;
    const index_t r = rh / geo.H;             // b*T + t
    const index_t b = r / geo.T;
    const index_t t = r - b * geo.T;
    const P in = *reinterpret_cast<const P*>(
        src + b * geo.sb + t * geo.st + h * geo.sh + ip * VEC);
    P out;
    if (mask != nullptr && !mask[r]) {
      out = in;  // gain 1
    } else {
      const opmath_t g = gains[b * geo.g_sb + h];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = static_cast<scalar_t>(static_cast<opmath_t>(in.v[k]) * g);
      }
    }
    *reinterpret_cast<P*>(dst + idx * VEC) = out;
  }
}

// Scalar fallback: thread `idx` handles output element idx; any strides.
template <typename scalar_t, typename index_t>
__global__ void head_gain_scalar_kernel(
    const scalar_t* __restrict__ src,
    scalar_t* __restrict__ dst,
    const at::opmath_type<scalar_t>* __restrict__ gains,
    const bool* __restrict__ mask,
    Geometry<index_t> geo,
    index_t n) {  // B*T*H*dh
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < n; idx += stride) {
    const index_t i = idx % geo.dh;
    const index_t rh = idx / geo.dh;
    const index_t h = rh % geo.H;
    const index_t r = rh / geo.H;
    const index_t b = r / geo.T;
    const index_t t = r - b * geo.T;
    const scalar_t x = src[b * geo.sb + t * geo.st + h * geo.sh + i * geo.sd];
    if (mask != nullptr && !mask[r]) {
      dst[idx] = x;
    } else {
      const opmath_t g = gains[b * geo.g_sb + h];
      dst[idx] = static_cast<scalar_t>(static_cast<opmath_t>(x) * g);
    }
  }
}

// Largest element offset reachable in a strided tensor, plus one.
int64_t storage_extent(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    extent += (t.size(d) - 1) * std::abs(t.stride(d));
  }
  return extent;
}

template <typename scalar_t, typename index_t>
void launch(
    const at::Tensor& attn,
    at::Tensor& out,
    const at::Tensor& gains,
    const at::Tensor& mask,
    Geometry<index_t> geo,
    bool vectorizable,
    cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const scalar_t* src = attn.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const opmath_t* gp = gains.const_data_ptr<opmath_t>();
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  constexpr int threads = 256;
  const int64_t work = vectorizable ? out.numel() / VEC : out.numel();
  // Grid-stride loop: enough blocks to fill the GPU several times over, no more.
  const int64_t max_blocks = static_cast<int64_t>(std::max(sms, 1)) * 32;
  const int blocks = static_cast<int>(
      std::min<int64_t>((work + threads - 1) / threads, max_blocks));

  if (vectorizable) {
    head_gain_vec_kernel<scalar_t, index_t, VEC><<<blocks, threads, 0, stream>>>(
        src, dst, gp, mp, geo, static_cast<index_t>(work));
  } else {
    head_gain_scalar_kernel<scalar_t, index_t><<<blocks, threads, 0, stream>>>(
        src, dst, gp, mp, geo, static_cast<index_t>(work));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor head_gain_cuda(
    const at::Tensor& attn,
    const at::Tensor& gains,
    const std::optional<at::Tensor>& mask,
    bool heads_first) {
  check_head_gain_inputs(attn, gains, mask, heads_first);
  TORCH_CHECK(
      attn.is_cuda(),
      "head_gain (CUDA kernel): attn must be on a CUDA device; got ", attn.device());
  const c10::cuda::CUDAGuard device_guard(attn.device());

  const int64_t B = attn.size(0);
  const int64_t H = heads_first ? attn.size(1) : attn.size(2);
  const int64_t T = heads_first ? attn.size(2) : attn.size(1);
  const int64_t dh = attn.size(3);
  const int64_t sb = attn.stride(0);
  const int64_t sh = heads_first ? attn.stride(1) : attn.stride(2);
  const int64_t st = heads_first ? attn.stride(2) : attn.stride(1);
  const int64_t sd = attn.stride(3);

  at::Tensor out = at::empty({B, T, H * dh}, attn.options());  // contiguous
  if (out.numel() == 0) {
    return out;
  }
  TORCH_CHECK(
      sb >= 0 && sh >= 0 && st >= 0 && sd >= 0,
      "head_gain (CUDA kernel): attn must not have negative strides; got ",
      attn.strides());
  const at::Tensor g = gains.contiguous();  // (H,) or (B, H); tiny
  at::Tensor m;                             // (B, T) bool, or undefined
  if (mask.has_value()) {
    m = mask->contiguous();
  }
  const int64_t g_sb = gains.dim() == 2 ? H : 0;
  const bool use_int32 =
      out.numel() <= std::numeric_limits<int32_t>::max() / 2 &&  // headroom for idx += stride
      storage_extent(attn) <= std::numeric_limits<int32_t>::max();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, attn.scalar_type(), "hp_fast::head_gain_cuda", [&] {
        constexpr int64_t VEC = 16 / sizeof(scalar_t);
        // A stride matters for alignment only if its dimension has more than one entry.
        auto aligned_stride = [&](int64_t stride, int64_t size) {
          return size == 1 || stride % VEC == 0;
        };
        const bool vectorizable =
            sd == 1 && dh % VEC == 0 &&
            reinterpret_cast<std::uintptr_t>(attn.const_data_ptr()) % 16 == 0 &&
            reinterpret_cast<std::uintptr_t>(out.const_data_ptr()) % 16 == 0 &&
            aligned_stride(sb, B) && aligned_stride(st, T) && aligned_stride(sh, H);
        if (use_int32) {
          const Geometry<int32_t> geo{
              static_cast<int32_t>(T), static_cast<int32_t>(H), static_cast<int32_t>(dh),
              static_cast<int32_t>(sb), static_cast<int32_t>(st), static_cast<int32_t>(sh),
              static_cast<int32_t>(sd), static_cast<int32_t>(g_sb)};
          launch<scalar_t, int32_t>(attn, out, g, m, geo, vectorizable, stream);
        } else {
          const Geometry<int64_t> geo{T, H, dh, sb, st, sh, sd, g_sb};
          launch<scalar_t, int64_t>(attn, out, g, m, geo, vectorizable, stream);
        }
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hp_fast, CUDA, m) {
  m.impl("head_gain", &head_gain_cuda);
}

}  // namespace hp_fast
