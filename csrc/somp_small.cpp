// SOMP over a small (concept-sized) dictionary, one head at a time: the CPU kernel of
// hp_fast::somp_small (schema in module.cpp, Python wrapper hp_fast.ops.somp_small) for the
// L2-type rules ("l2", "ormp") when v <= SMALL_V (docs/fast-pursuit.md section 10).
//
// Same recurrences as the PyTorch twin pursue_small (hp_fast/pursuit/small_dictionary.py, read
// its docstring first), in atom space: with the Gram matrix Gd = D D.T (v, v), the projected
// dictionary E = D M.T (v, r) of the head and the stored columns A[t] = D q_t (v), no step
// touches a d-dimensional vector. The twin runs all heads in lock step through many small
// batched tensor ops whose operands stream from memory at every step; here each head runs
// its whole pursuit while its E (v*r floats, 77 KB for v=300, r=64) and A stay in cache,
// and the heads are spread over threads with at::parallel_for.
//
// Per head and step t (p the chosen atom, coef = A[:t, p] = Q d_p, nu = ||P d_p||):
//   a  = (Gd[p] - coef A[:t]) / nu            = D q_t
//   mq = (E[p]  - coef MQ[:t]) / nu           = M q_t
//   g  = G mq, gamma = mq . g                 energy this step explains (G = Z.T Z)
//   b  = E g - (MQ[:t] g) A[:t]               = D P_{t-1} W q_t
//   s -= a * (2 b - gamma a),  o -= a^2       scores s_j = ||Z M P d_j||^2, o_j = ||P d_j||^2
// Rules: l2 picks max s_j / ||d_j||^2 (or s_j), ormp max s_j / o_j; the lowest index among
// the scores within rtol of the best wins. Atoms with o_j <= span_tol ||d_j||^2 are retired.
// After every refresh_drop-fold drop of the residual energy s is recomputed exactly from
// F = E - A.T MQ (the fp32 recurrence would lose digits), as the twin does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace hp_fast {
namespace {

template <typename T>
struct SmallArgs {
  const T* E; int64_t sEb, sEv;      // E[h][j][c] = E[h*sEb + j*sEv + c]
  const T* Gd;                       // (v, v)
  const T* G;                        // (B, r, r)
  const T* L;                        // (B, r, rr): L L.T = G
  const T* atom_sq;                  // (v,)
  const T* total;                    // (B,) ||Z M||_F^2
  int64_t v, r, rr, k;
  bool ormp, normalize;
  T rtol, span_tol, refresh_drop;
  int64_t* support; T* evr; T* MQ; T* Tf;  // outputs (B, k), (B, k), (B, k, r), (B, k, k)
};

template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {  // y += alpha x
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// ||f L||^2 for a row f (r,) and L (r, rr); y (rr,) is scratch.
template <typename T>
inline T quad(const T* f, const T* L, int64_t r, int64_t rr, T* y) {
  for (int64_t c = 0; c < rr; ++c) y[c] = 0;
  for (int64_t q = 0; q < r; ++q) axpy(f[q], L + q * rr, y, rr);
  return dot(y, y, rr);
}

template <typename T>
void pursue_head(const SmallArgs<T>& a, int64_t h) {
  const int64_t v = a.v, r = a.r, rr = a.rr, k = a.k;
  const T* E = a.E + h * a.sEb;
  const T* G = a.G + h * r * r;
  const T* L = a.L + h * r * rr;
  T* MQ = a.MQ + h * k * r;
  T* Tf = a.Tf + h * k * k;
  int64_t* sup = a.support + h * k;
  T* evr = a.evr + h * k;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T ninf = -std::numeric_limits<T>::infinity();
  const T tiny = std::numeric_limits<T>::min();
  const T total = a.total[h];

  std::vector<T> s(v), orth(v), tol(v), inv_sq(v), A(k * v, T(0)), av(v), bv(v), score(v);
  std::vector<T> mq(r), g(r), f(r), y(rr), coef(k), hv(k);
  for (int64_t j = 0; j < v; ++j) {
    s[j] = quad(E + j * a.sEv, L, r, rr, y.data());  // ||Z M d_j||^2
    tol[j] = a.span_tol * a.atom_sq[j];
    orth[j] = a.atom_sq[j] <= tol[j] ? nan : a.atom_sq[j];
    inv_sq[j] = a.atom_sq[j] > 0 ? T(1) / a.atom_sq[j] : T(0);
  }
  for (int64_t t = 0; t < k; ++t) { sup[t] = -1; evr[t] = 0; }
  T explained = 0, ref = total;
  for (int64_t t = 0; t < k; ++t) {
    // ---- selection: the lowest index among the near-best finite scores
    T best = ninf;
    for (int64_t j = 0; j < v; ++j) {
      T sc = a.ormp ? s[j] / orth[j] : (a.normalize ? s[j] * inv_sq[j] : s[j]);
      if (std::isnan(sc) || std::isnan(orth[j])) sc = ninf;
      score[j] = sc;
      if (sc > best) best = sc;
    }
    if (!std::isfinite(best)) break;  // nothing left to choose: support stays -1, EVR flat
    const T thr = best - a.rtol * std::abs(best);
    int64_t p = 0;
    while (score[p] < thr) ++p;
    // ---- new support vector in atom space
    T cc = 0;
    for (int64_t q = 0; q < t; ++q) { coef[q] = A[q * v + p]; cc += coef[q] * coef[q]; }
    const T nu = std::sqrt(std::max(a.atom_sq[p] - cc, T(0)));
    const T inv_nu = T(1) / std::max(nu, tiny);
    T* at = A.data() + t * v;
    const T* gp = a.Gd + p * v;
    for (int64_t j = 0; j < v; ++j) at[j] = gp[j];
    for (int64_t q = 0; q < t; ++q) axpy(-coef[q], A.data() + q * v, at, v);
    for (int64_t j = 0; j < v; ++j) at[j] *= inv_nu;  // D q_t
    T* mqt = MQ + t * r;
    const T* ep = E + p * a.sEv;
    for (int64_t c = 0; c < r; ++c) mqt[c] = ep[c];
    for (int64_t q = 0; q < t; ++q) axpy(-coef[q], MQ + q * r, mqt, r);
    for (int64_t c = 0; c < r; ++c) mqt[c] *= inv_nu;  // M q_t
    for (int64_t q = 0; q < t; ++q) Tf[q * k + t] = coef[q];
    Tf[t * k + t] = nu;
    sup[t] = p;
    for (int64_t c = 0; c < r; ++c) g[c] = 0;
    for (int64_t q = 0; q < r; ++q) axpy(mqt[q], G + q * r, g.data(), r);  // G M q (G symmetric)
    const T gamma = dot(mqt, g.data(), r);
    explained += gamma;
    evr[t] = gamma;
    if (t == k - 1) break;
    // ---- rank-one updates of s and orth
    for (int64_t j = 0; j < v; ++j) bv[j] = dot(E + j * a.sEv, g.data(), r);  // D W q
    for (int64_t q = 0; q < t; ++q) axpy(-dot(g.data(), MQ + q * r, r), A.data() + q * v, bv.data(), v);
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      const T c = 2 * bv[j] - gamma * at[j];
      s[j] -= at[j] * c;
      orth[j] -= at[j] * at[j];
    }
    orth[p] = nan;
    for (int64_t j = 0; j < v; ++j)
      if (orth[j] <= tol[j]) orth[j] = nan;  // inside the span: retired for good
    const T residual = total - explained;
    if (residual < a.refresh_drop * ref) {  // recompute s from F = E - A.T MQ
      for (int64_t j = 0; j < v; ++j) {
        const T* ej = E + j * a.sEv;
        for (int64_t c = 0; c < r; ++c) f[c] = ej[c];
        for (int64_t q = 0; q <= t; ++q) axpy(-A[q * v + j], MQ + q * r, f.data(), r);
        s[j] = quad(f.data(), L, r, rr, y.data());
      }
      ref = residual;
    }
  }
  T acc = 0;  // explained energy after each step -> EVR
  for (int64_t t = 0; t < k; ++t) {
    acc += evr[t];
    evr[t] = total > 0 ? std::min(acc / std::max(total, tiny), T(1)) : T(0);
  }
}

// pursue_head compiled a second time for AVX2+FMA (flatten inlines it and its helpers into
// this function, so they are generated for that target); chosen at run time.
template <typename T>
__attribute__((target("avx2,fma"), flatten)) void pursue_head_avx2(const SmallArgs<T>& a, int64_t h) {
  pursue_head<T>(a, h);
}

template <typename T>
void run_heads(const SmallArgs<T>& a, int64_t B) {
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t h = b0; h < b1; ++h) {
      if (avx2) pursue_head_avx2<T>(a, h);
      else pursue_head<T>(a, h);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> somp_small_cpu(
    const at::Tensor& E, const at::Tensor& Gd, const at::Tensor& G, const at::Tensor& L,
    const at::Tensor& atom_sq, const at::Tensor& total, int64_t k, bool ormp, bool normalize,
    double rtol, double span_tol, double refresh_drop) {
  TORCH_CHECK(E.dim() == 3 && E.stride(2) == 1, "somp_small: E must be (B, v, r) with unit last stride");
  const int64_t B = E.size(0), v = E.size(1), r = E.size(2);
  TORCH_CHECK(G.dim() == 3 && G.size(0) == B && G.size(1) == r && G.size(2) == r, "somp_small: G must be (B, r, r)");
  TORCH_CHECK(L.dim() == 3 && L.size(0) == B && L.size(1) == r, "somp_small: L must be (B, r, rr)");
  TORCH_CHECK(Gd.dim() == 2 && Gd.size(0) == v && Gd.size(1) == v, "somp_small: Gd must be (v, v)");
  TORCH_CHECK(atom_sq.numel() == v && total.numel() == B, "somp_small: atom_sq (v,) and total (B,)");
  TORCH_CHECK(k >= 1, "somp_small: k must be >= 1");
  for (const auto* x : {&E, &Gd, &G, &L, &atom_sq, &total})
    TORCH_CHECK(x->scalar_type() == E.scalar_type() && x->device().is_cpu(), "somp_small: CPU tensors of one dtype");
  const auto Gc = G.contiguous(), Lc = L.contiguous(), Gdc = Gd.contiguous();
  const auto aq = atom_sq.contiguous(), tot = total.contiguous();
  auto opts = E.options();
  auto support = at::empty({B, k}, opts.dtype(at::kLong));
  auto evr = at::empty({B, k}, opts);
  auto MQ = at::zeros({B, k, r}, opts);
  auto Tf = at::zeros({B, k, k}, opts);
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "somp_small", [&] {
    SmallArgs<scalar_t> a{E.const_data_ptr<scalar_t>(), E.stride(0), E.stride(1),
                          Gdc.const_data_ptr<scalar_t>(), Gc.const_data_ptr<scalar_t>(),
                          Lc.const_data_ptr<scalar_t>(), aq.const_data_ptr<scalar_t>(),
                          tot.const_data_ptr<scalar_t>(), v, r, L.size(2), k, ormp, normalize,
                          static_cast<scalar_t>(rtol), static_cast<scalar_t>(span_tol),
                          static_cast<scalar_t>(refresh_drop), support.data_ptr<int64_t>(),
                          evr.data_ptr<scalar_t>(), MQ.data_ptr<scalar_t>(), Tf.data_ptr<scalar_t>()};
    run_heads<scalar_t>(a, B);
  });
  return {support, evr, MQ, Tf};
}

}  // namespace

TORCH_LIBRARY_IMPL(hp_fast, CPU, m) {
  m.impl("somp_small", &somp_small_cpu);
}

}  // namespace hp_fast
