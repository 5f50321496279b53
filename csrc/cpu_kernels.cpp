// CPU kernels of the mdarts ops: parallel over rows (or element tiles) with
// at::parallel_for, inner loops over the feature axis written so that the compiler
// vectorises them (`omp simd` for the reductions), arithmetic in acc_t (float, or
// double for double data). Column sums over rows go through a fixed number of
// per-chunk partial buffers, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "dropout_hash.h"

namespace mdarts {
namespace {

constexpr int64_t kTile = 1024;       // elements per tile of the elementwise kernels
constexpr int64_t kMaxChunks = 64;    // partial-sum chunks of the column reductions

template <typename T>
std::vector<const T*> data_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> ptrs;
  ptrs.reserve(ts.size());
  for (const auto& t : ts) ptrs.push_back(t.data_ptr<T>());
  return ptrs;
}

template <typename T>
std::vector<T*> mutable_ptrs(std::vector<at::Tensor>& ts) {
  std::vector<T*> ptrs;
  ptrs.reserve(ts.size());
  for (auto& t : ts) ptrs.push_back(t.data_ptr<T>());
  return ptrs;
}

int64_t num_chunks(int64_t count) { return std::max<int64_t>(1, std::min<int64_t>(count, kMaxChunks)); }

// ----------------------------------------------------------------------------
// mixed_sum

// dst = w * g; returns sum_i g[i] * src[i].
template <typename scalar_t, typename acc_t>
acc_t scale_and_dot(const acc_t* g, const scalar_t* src, acc_t w, scalar_t* dst, int64_t len) {
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < len; ++i) {
    dot += g[i] * static_cast<acc_t>(src[i]);
    dst[i] = static_cast<scalar_t>(w * g[i]);
  }
  return dot;
}

at::Tensor mixed_sum_cpu(at::TensorList outs_in, const at::Tensor& weights_in) {
  auto outs = checked_list(outs_in, "outs");
  const int64_t K = outs.size();
  const auto acc = acc_dtype(outs[0].scalar_type());
  auto weights = checked_param(weights_in, {K}, outs[0].device(), acc, "weights");
  auto result = at::empty_like(outs[0], at::MemoryFormat::Contiguous);
  const int64_t numel = result.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "mixed_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = data_ptrs<scalar_t>(outs);
    const acc_t* w = weights.data_ptr<acc_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kTile * 8, [&](int64_t begin, int64_t end) {
      acc_t buf[kTile];
      for (int64_t start = begin; start < end; start += kTile) {
        const int64_t len = std::min(kTile, end - start);
        for (int64_t i = 0; i < len; ++i) buf[i] = acc_t(0);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* src = in[k] + start;
          const acc_t wk = w[k];
          for (int64_t i = 0; i < len; ++i) buf[i] += wk * static_cast<acc_t>(src[i]);
        }
        for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<scalar_t>(buf[i]);
      }
    });
  });
  return result;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cpu(const at::Tensor& grad_in,
                                                                        at::TensorList outs_in,
                                                                        const at::Tensor& weights_in) {
  auto outs = checked_list(outs_in, "outs");
  const int64_t K = outs.size();
  auto grad = checked_like(grad_in, outs[0], "grad");
  const auto acc = acc_dtype(outs[0].scalar_type());
  auto weights = checked_param(weights_in, {K}, outs[0].device(), acc, "weights");
  auto grad_outs = empty_like_each(outs);
  const int64_t numel = grad.numel();
  const int64_t chunks = num_chunks((numel + kTile - 1) / kTile);
  const int64_t chunk_len = chunks ? (numel + chunks - 1) / chunks : 0;
  auto partial = at::zeros({chunks, K}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = data_ptrs<scalar_t>(outs);
    auto gout = mutable_ptrs<scalar_t>(grad_outs);
    const acc_t* w = weights.data_ptr<acc_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      acc_t gbuf[kTile];
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const int64_t stop = std::min(numel, (c + 1) * chunk_len);
        for (int64_t start = c * chunk_len; start < stop; start += kTile) {
          const int64_t len = std::min(kTile, stop - start);
          for (int64_t i = 0; i < len; ++i) gbuf[i] = static_cast<acc_t>(g[start + i]);
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* src = in[k] + start;
            scalar_t* dst = gout[k] + start;
            part[c * K + k] += scale_and_dot(gbuf, src, w[k], dst, len);
          }
        }
      }
    });
  });
  auto grad_weights = partial.sum(0).to(weights_in.scalar_type());
  return {grad_outs, grad_weights};
}

// ----------------------------------------------------------------------------
// mixed_ln_sum

template <typename acc_t>
struct RowStats {
  acc_t mean;
  acc_t rstd;
};

// z = h + o over one row of length D (written to z); returns its mean and 1/std.
template <typename scalar_t, typename acc_t>
RowStats<acc_t> add_and_normalise_stats(const acc_t* h, const scalar_t* o, acc_t* z, int64_t D, acc_t eps) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < D; ++j) {
    z[j] = h[j] + static_cast<acc_t>(o[j]);
    sum += z[j];
  }
  const acc_t mean = sum / D;
  acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < D; ++j) {
    const acc_t c = z[j] - mean;
    sq += c * c;
  }
  return {mean, acc_t(1) / std::sqrt(sq / D + eps)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_ln_sum_cpu(const at::Tensor& h_in, at::TensorList outs_in,
                                                                const at::Tensor& weights_in,
                                                                const at::Tensor& ln_weight_in,
                                                                const at::Tensor& ln_bias_in, double eps,
                                                                const std::optional<at::Tensor>& residual_in,
                                                                double sign) {
  auto outs = checked_list(outs_in, "outs");
  const int64_t K = outs.size();
  auto h = checked_like(h_in, outs[0], "h");
  const LnParams params = checked_ln_params(h, K, weights_in, ln_weight_in, ln_bias_in);
  const int64_t D = params.D, N = params.N;
  at::Tensor residual;
  if (residual_in.has_value()) residual = checked_like(*residual_in, h, "residual");
  auto result = at::empty_like(h, at::MemoryFormat::Contiguous);
  auto mean = at::empty({K, N}, params.weights.options());
  auto rstd = at::empty({K, N}, params.weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "mixed_ln_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = data_ptrs<scalar_t>(outs);
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
    const acc_t* w = params.weights.data_ptr<acc_t>();
    const acc_t* gamma = params.ln_weight.data_ptr<acc_t>();
    const acc_t* beta = params.ln_bias.data_ptr<acc_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* rstd_p = rstd.data_ptr<acc_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(sign);
    const acc_t e = static_cast<acc_t>(eps);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffers(3 * D);
      acc_t* hrow = buffers.data();
      acc_t* z = hrow + D;
      acc_t* total = z + D;
      for (int64_t n = begin; n < end; ++n) {
        const int64_t offset = n * D;
        for (int64_t j = 0; j < D; ++j) {
          hrow[j] = static_cast<acc_t>(hp[offset + j]);
          total[j] = acc_t(0);
        }
        for (int64_t k = 0; k < K; ++k) {
          const auto stats = add_and_normalise_stats<scalar_t, acc_t>(hrow, in[k] + offset, z, D, e);
          mean_p[k * N + n] = stats.mean;
          rstd_p[k * N + n] = stats.rstd;
          const acc_t wk = w[k];
          const acc_t* gk = gamma + k * D;
          const acc_t* bk = beta + k * D;
          for (int64_t j = 0; j < D; ++j) total[j] += wk * ((z[j] - stats.mean) * stats.rstd * gk[j] + bk[j]);
        }
        if (rp) {
          for (int64_t j = 0; j < D; ++j) out[offset + j] = static_cast<scalar_t>(static_cast<acc_t>(rp[offset + j]) + s * total[j]);
        } else {
          for (int64_t j = 0; j < D; ++j) out[offset + j] = static_cast<scalar_t>(s * total[j]);
        }
      }
    });
  });
  return {result, mean, rstd};
}

// Backward of one row through one LayerNorm-wrapped op. Recomputes
// xhat = (h + o - mu) * rstd, then with dxhat = scale * g * gamma writes
// dz = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) to dst, adds dz to gh
// and g * xhat to the column sum col_s. xhat, dxhat: scratch rows of length D.
template <typename scalar_t, typename acc_t>
void layer_norm_backward_row(const acc_t* h, const scalar_t* o, const acc_t* g, const acc_t* gamma, acc_t mu,
                             acc_t rstd, acc_t scale, int64_t D, acc_t* xhat, acc_t* dxhat, acc_t* col_s,
                             scalar_t* dst, acc_t* gh) {
  acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
  for (int64_t j = 0; j < D; ++j) {
    xhat[j] = (h[j] + static_cast<acc_t>(o[j]) - mu) * rstd;
    dxhat[j] = scale * g[j] * gamma[j];
    col_s[j] += g[j] * xhat[j];
    sum_dxhat += dxhat[j];
    sum_dxhat_xhat += dxhat[j] * xhat[j];
  }
  const acc_t m1 = sum_dxhat / D;
  const acc_t m2 = sum_dxhat_xhat / D;
  for (int64_t j = 0; j < D; ++j) {
    const acc_t dz = rstd * (dxhat[j] - m1 - xhat[j] * m2);
    dst[j] = static_cast<scalar_t>(dz);
    gh[j] += dz;
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> mixed_ln_sum_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& h_in, at::TensorList outs_in, const at::Tensor& weights_in,
    const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, double sign) {
  auto outs = checked_list(outs_in, "outs");
  const int64_t K = outs.size();
  auto h = checked_like(h_in, outs[0], "h");
  auto grad = checked_like(grad_in, h, "grad");
  const LnParams params = checked_ln_params(h, K, weights_in, ln_weight_in, ln_bias_in);
  const int64_t D = params.D, N = params.N;
  auto mean = checked_param(mean_in, {K, N}, h.device(), params.acc, "mean");
  auto rstd = checked_param(rstd_in, {K, N}, h.device(), params.acc, "rstd");

  auto grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  auto grad_outs = empty_like_each(outs);
  const int64_t chunks = num_chunks(N);
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  // per-chunk column sums: S[c, k, j] = sum_n grad[n, j] * xhat_k[n, j], C[c, j] = sum_n grad[n, j]
  auto partial_s = at::zeros({chunks, K, D}, params.weights.options());
  auto partial_c = at::zeros({chunks, D}, params.weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "mixed_ln_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = data_ptrs<scalar_t>(outs);
    auto gout = mutable_ptrs<scalar_t>(grad_outs);
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* ghp = grad_h.data_ptr<scalar_t>();
    const acc_t* w = params.weights.data_ptr<acc_t>();
    const acc_t* gamma = params.ln_weight.data_ptr<acc_t>();
    const acc_t* mean_p = mean.data_ptr<acc_t>();
    const acc_t* rstd_p = rstd.data_ptr<acc_t>();
    acc_t* ps = partial_s.data_ptr<acc_t>();
    acc_t* pc = partial_c.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(sign);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<acc_t> buffers(5 * D);
      acc_t* hrow = buffers.data();
      acc_t* grow = hrow + D;
      acc_t* xhat = grow + D;
      acc_t* dxhat = xhat + D;
      acc_t* gh = dxhat + D;
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        acc_t* col_s = ps + c * K * D;
        acc_t* col_c = pc + c * D;
        const int64_t row_end = std::min(N, (c + 1) * rows_per_chunk);
        for (int64_t n = c * rows_per_chunk; n < row_end; ++n) {
          const int64_t offset = n * D;
          for (int64_t j = 0; j < D; ++j) {
            hrow[j] = static_cast<acc_t>(hp[offset + j]);
            grow[j] = static_cast<acc_t>(gp[offset + j]);
            col_c[j] += grow[j];
            gh[j] = acc_t(0);
          }
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* o = in[k] + offset;
            const acc_t mu = mean_p[k * N + n];
            const acc_t r = rstd_p[k * N + n];
            layer_norm_backward_row(hrow, o, grow, gamma + k * D, mu, r, s * w[k], D, xhat, dxhat,
                                    col_s + k * D, gout[k] + offset, gh);
          }
          for (int64_t j = 0; j < D; ++j) ghp[offset + j] = static_cast<scalar_t>(gh[j]);
        }
      }
    });
  });
  auto param_grads =
      ln_param_grads(partial_s.sum(0), partial_c.sum(0), params.weights, params.ln_weight, params.ln_bias, sign);
  return {grad_h, grad_outs, std::get<0>(param_grads).to(weights_in.scalar_type()),
          std::get<1>(param_grads).to(ln_weight_in.scalar_type()), std::get<2>(param_grads).to(ln_bias_in.scalar_type())};
}

// ----------------------------------------------------------------------------
// split_pool

at::Tensor split_pool_cpu(at::TensorList xs_in, c10::string_view mode) {
  const bool is_max = pool_is_max(mode);
  auto xs = checked_list(xs_in, "xs");
  const int64_t n = xs.size();
  auto result = at::empty_like(xs[0], at::MemoryFormat::Contiguous);
  const int64_t numel = result.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "split_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = data_ptrs<scalar_t>(xs);
    scalar_t* out = result.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kTile * 8, [&](int64_t begin, int64_t end) {
      acc_t buf[kTile];
      for (int64_t start = begin; start < end; start += kTile) {
        const int64_t len = std::min(kTile, end - start);
        for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<acc_t>(in[0][start + i]);
        for (int64_t p = 1; p < n; ++p) {
          const scalar_t* src = in[p] + start;
          if (is_max) {
            // NaN counts as a maximum, so it propagates
            for (int64_t i = 0; i < len; ++i) {
              const acc_t v = static_cast<acc_t>(src[i]);
              buf[i] = (v > buf[i] || std::isnan(v)) && !std::isnan(buf[i]) ? v : buf[i];
            }
          } else {
            for (int64_t i = 0; i < len; ++i) buf[i] += static_cast<acc_t>(src[i]);
          }
        }
        const acc_t scale = is_max ? acc_t(1) : acc_t(1) / n;
        for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<scalar_t>(buf[i] * scale);
      }
    });
  });
  return result;
}

std::vector<at::Tensor> split_pool_backward_cpu(const at::Tensor& grad_in, at::TensorList xs_in,
                                                c10::string_view mode) {
  const bool is_max = pool_is_max(mode);
  auto xs = checked_list(xs_in, "xs");
  auto grad = checked_like(grad_in, xs[0], "grad");
  const int64_t n = xs.size();
  auto grads = empty_like_each(xs);
  const int64_t numel = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "split_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = data_ptrs<scalar_t>(xs);
    auto gx = mutable_ptrs<scalar_t>(grads);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kTile * 8, [&](int64_t begin, int64_t end) {
      if (!is_max) {
        const acc_t scale = acc_t(1) / n;
        for (int64_t p = 0; p < n; ++p)
          for (int64_t i = begin; i < end; ++i) gx[p][i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * scale);
        return;
      }
      for (int64_t i = begin; i < end; ++i) {
        int64_t best = 0;
        acc_t best_value = static_cast<acc_t>(in[0][i]);
        for (int64_t p = 1; p < n; ++p) {
          const acc_t v = static_cast<acc_t>(in[p][i]);
          if ((v > best_value || std::isnan(v)) && !std::isnan(best_value)) {
            best = p;
            best_value = v;
          }
        }
        for (int64_t p = 0; p < n; ++p) gx[p][i] = p == best ? g[i] : scalar_t(0);
      }
    });
  });
  return grads;
}

// ----------------------------------------------------------------------------
// seeded_dropout

// The function-multiversioned hash loop: an AVX2 clone where the CPU has it (32-bit
// multiplies and unsigned compares, which the x86-64 baseline lacks, are 3x faster there).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MDARTS_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MDARTS_TARGET_CLONES
#endif

// keep[j] = 1 if element start + j is kept, else 0, for a run of elements that does not
// cross a multiple of 2^32 (so the high half of the index is constant): 32-bit integer
// arithmetic only, which the compiler vectorises.
MDARTS_TARGET_CLONES void keep_run(int64_t start, int64_t len, uint32_t k0, uint32_t k1, uint32_t threshold,
                                   float* keep) {
  const uint32_t base = static_cast<uint32_t>(start);
  const uint32_t key = k1 ^ static_cast<uint32_t>(static_cast<uint64_t>(start) >> 32);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    keep[j] = mix32(mix32((base + static_cast<uint32_t>(j)) ^ k0) + key) >= threshold ? 1.0f : 0.0f;
  }
}

// out[i] = in[i] * (keep(i) * scale) for i in [begin, end)
template <typename scalar_t, typename acc_t>
void dropout_range(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, uint32_t k0, uint32_t k1,
                   uint32_t threshold, acc_t scale) {
  float keep[kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t len = std::min(kTile, end - start);
    // the first part up to the next multiple of 2^32 (all of it, but for tensors over 4G elements)
    const int64_t first = std::min<int64_t>(len, static_cast<int64_t>((static_cast<uint64_t>(start) | 0xFFFFFFFFull) + 1) - start);
    keep_run(start, first, k0, k1, threshold, keep);
    keep_run(start + first, len - first, k0, k1, threshold, keep + first);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      out[start + j] = static_cast<scalar_t>(static_cast<acc_t>(in[start + j]) * (static_cast<acc_t>(keep[j]) * scale));
    }
  }
}

at::Tensor seeded_dropout_cpu(const at::Tensor& x_in, double p, int64_t seed) {
  check_data_dtype(x_in, "x");
  check_dropout_p(p);
  const at::Tensor x = x_in.contiguous();
  auto result = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  const uint32_t threshold = dropout_threshold(p);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "seeded_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kTile * 32, [&](int64_t begin, int64_t end) {
      dropout_range(in, out, begin, end, k0, k1, threshold, scale);
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdarts, CPU, m) {
  m.impl("mixed_sum", &mixed_sum_cpu);
  m.impl("mixed_sum_backward", &mixed_sum_backward_cpu);
  m.impl("mixed_ln_sum", &mixed_ln_sum_cpu);
  m.impl("mixed_ln_sum_backward", &mixed_ln_sum_backward_cpu);
  m.impl("split_pool", &split_pool_cpu);
  m.impl("split_pool_backward", &split_pool_backward_cpu);
  m.impl("seeded_dropout", &seeded_dropout_cpu);
}

}  // namespace mdarts
