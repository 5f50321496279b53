// CUDA kernels of the mdarts ops (schemas in ops.cpp, argument checks in checks.h).
//
// Conventions
// - Data tensors (outs / xs / h / residual / grad) share one shape (..., D) and are
//   made contiguous by the checks; they are viewed as (N, D) rows, N = numel / D.
//   Every output is freshly allocated and contiguous.
// - Arithmetic is done in acc_t = at::opmath_type<scalar_t>: double for double,
//   float for float / half / bfloat16. Small parameters (weights (K,), ln_weight
//   and ln_bias (K, D)) are converted to acc_t on the device by checked_param.
// - Offsets are int64_t everywhere; blockIdx / blockDim are cast before multiplying.
// - The K data pointers of a tensor list travel to the device inside a struct passed
//   by value (PtrList, at most kMaxK = 64 tensors, checked on the host). No H2D copy
//   is needed, so the ops are also safe under CUDA graph capture.
// - Reductions over rows (grad of weights / ln_weight / ln_bias) write per-block
//   partial sums to a buffer that is summed with at::sum on the host side:
//   deterministic, no atomics.
// - Empty inputs (N == 0 or D == 0) return without launching anything.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "dropout_hash.h"

namespace mdarts {
namespace {

// ---------------------------------------------------------------------------
// Tensor lists on the device
// ---------------------------------------------------------------------------

constexpr int kMaxK = 64;  // most tensors in one list (outs / xs)

// Data pointers of up to kMaxK tensors, passed to a kernel by value (512 bytes).
template <typename T>
struct PtrList {
  T* ptr[kMaxK];
};

template <typename T>
PtrList<T> make_ptr_list(const std::vector<at::Tensor>& ts, const char* name) {
  TORCH_CHECK(ts.size() <= static_cast<size_t>(kMaxK), name, ": the CUDA kernels support at most ",
              kMaxK, " tensors in one list, got ", ts.size());
  PtrList<T> list{};
  for (size_t k = 0; k < ts.size(); ++k) {
    list.ptr[k] = static_cast<T*>(ts[k].data_ptr());
  }
  return list;
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// Sum over the 32 lanes of a warp; every lane gets the (bit-identical) total.
template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the whole block; every thread gets the same total.
// Requires blockDim.x % 32 == 0, blockDim.y == blockDim.z == 1, and that every
// thread of the block calls it. `shared` holds 32 values of scratch space.
template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();  // earlier readers of `shared` are done
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < num_warps ? shared[lane] : T(0);
  return warp_reduce_sum(v);
}

// Normalized value of one element: (h + o - mu) * rstd, in acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t normalize(acc_t h, acc_t o, acc_t mu, acc_t rstd) {
  return (h + o - mu) * rstd;
}

// Index of the first maximum of xs[0..K)[i]. NaN counts as a maximum: the first
// NaN wins and nothing after it replaces it.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ int first_max_index(const PtrList<const scalar_t>& xs, int K, int64_t i) {
  acc_t best = to_acc<acc_t>(xs.ptr[0][i]);
  int best_k = 0;
  for (int k = 1; k < K; ++k) {
    const acc_t v = to_acc<acc_t>(xs.ptr[k][i]);
    if (!at::_isnan(best) && (v > best || at::_isnan(v))) {
      best = v;
      best_k = k;
    }
  }
  return best_k;
}

// ---------------------------------------------------------------------------
// Launch configuration
// ---------------------------------------------------------------------------

constexpr int kElementwiseThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of a grid-stride elementwise kernel over numel (> 0) elements.
int64_t elementwise_blocks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(numel, kElementwiseThreads), num_sms() * 8));
}

// Launches a grid-stride elementwise kernel over numel (> 0) elements on the current stream.
template <typename Kernel, typename... Args>
void launch_elementwise(Kernel kernel, int64_t numel, Args... args) {
  const auto blocks = static_cast<unsigned int>(elementwise_blocks(numel));
  kernel<<<blocks, kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Threads of a one-block-per-row kernel: a power of two in [32, 512], about D.
int row_threads(int64_t D) {
  int threads = 32;
  while (threads < 512 && 2 * threads <= D) threads *= 2;
  return threads;
}

// Blocks of a grid-stride-over-rows kernel over N (> 0) rows.
int64_t row_blocks(int64_t N, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(N, num_sms() * (2048 / threads)));
}

// ---------------------------------------------------------------------------
// mixed_sum
// ---------------------------------------------------------------------------

// out[i] = sum_k weights[k] * outs[k][i].  outs: K x (numel,), weights: (K,), out: (numel,)
template <typename scalar_t, typename acc_t>
__global__ void mixed_sum_kernel(PtrList<const scalar_t> outs, const acc_t* __restrict__ weights,
                                 scalar_t* __restrict__ out, int64_t numel, int K) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    acc_t total = 0;
    for (int k = 0; k < K; ++k) total += weights[k] * to_acc<acc_t>(outs.ptr[k][i]);
    out[i] = static_cast<scalar_t>(total);
  }
}

// Each block handles kSumGroup consecutive k (blockIdx.y selects the group):
//   grad_outs[k][i] = weights[k] * grad[i]
//   partial[blockIdx.x, k] = sum over this block's i of grad[i] * outs[k][i]
// grad: (numel,), outs / grad_outs: K x (numel,), weights: (K,), partial: (gridDim.x, K)
constexpr int kSumGroup = 4;

template <typename scalar_t, typename acc_t>
__global__ void mixed_sum_backward_kernel(const scalar_t* __restrict__ grad, PtrList<const scalar_t> outs,
                                          const acc_t* __restrict__ weights, PtrList<scalar_t> grad_outs,
                                          acc_t* __restrict__ partial, int64_t numel, int K) {
  __shared__ acc_t s_red[32];
  const int k0 = static_cast<int>(blockIdx.y) * kSumGroup;
  acc_t w[kSumGroup];
  acc_t dot[kSumGroup];
#pragma unroll
  for (int q = 0; q < kSumGroup; ++q) {
    w[q] = k0 + q < K ? weights[k0 + q] : acc_t(0);
    dot[q] = 0;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t g = to_acc<acc_t>(grad[i]);
#pragma unroll
    for (int q = 0; q < kSumGroup; ++q) {
      const int k = k0 + q;
      if (k < K) {
        grad_outs.ptr[k][i] = static_cast<scalar_t>(w[q] * g);
        dot[q] += g * to_acc<acc_t>(outs.ptr[k][i]);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kSumGroup; ++q) {
    const acc_t total = block_reduce_sum(dot[q], s_red);
    if (threadIdx.x == 0 && k0 + q < K) partial[static_cast<int64_t>(blockIdx.x) * K + k0 + q] = total;
  }
}

at::Tensor mixed_sum_cuda(at::TensorList outs_in, const at::Tensor& weights_in) {
  const auto outs = checked_list(outs_in, "outs");
  const at::Tensor& first = outs[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const int64_t K = static_cast<int64_t>(outs.size());
  const auto acc = acc_dtype(first.scalar_type());
  const at::Tensor weights = checked_param(weights_in, {K}, first.device(), acc, "weights");
  at::Tensor out = at::empty(first.sizes(), first.options());
  const int64_t numel = first.numel();
  if (numel == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "mdarts_mixed_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise(mixed_sum_kernel<scalar_t, acc_t>, numel, make_ptr_list<const scalar_t>(outs, "outs"),
                       weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), numel, static_cast<int>(K));
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cuda(const at::Tensor& grad_in,
                                                                        at::TensorList outs_in,
                                                                        const at::Tensor& weights_in) {
  const auto outs = checked_list(outs_in, "outs");
  const at::Tensor& first = outs[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor grad = checked_like(grad_in, first, "grad");
  const int64_t K = static_cast<int64_t>(outs.size());
  const auto acc = acc_dtype(first.scalar_type());
  const at::Tensor weights = checked_param(weights_in, {K}, first.device(), acc, "weights");

  std::vector<at::Tensor> grad_outs = empty_like_each(outs);
  const int64_t numel = first.numel();
  if (numel == 0) return {grad_outs, at::zeros({K}, weights_in.options())};

  const int64_t blocks_x = elementwise_blocks(numel);
  const int64_t groups = ceil_div(K, kSumGroup);
  at::Tensor partial = at::empty({blocks_x, K}, first.options().dtype(acc));  // (blocks_x, K)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "mdarts_mixed_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto out_ptrs = make_ptr_list<const scalar_t>(outs, "outs");
    const auto grad_ptrs = make_ptr_list<scalar_t>(grad_outs, "grad_outs");
    const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(groups));
    mixed_sum_backward_kernel<scalar_t, acc_t><<<grid, kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), out_ptrs, weights.data_ptr<acc_t>(), grad_ptrs, partial.data_ptr<acc_t>(), numel,
        static_cast<int>(K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor grad_weights = partial.sum(0).to(weights_in.scalar_type());  // (K,)
  return {grad_outs, grad_weights};
}

// ---------------------------------------------------------------------------
// mixed_ln_sum
// ---------------------------------------------------------------------------

// One block per row (grid-stride over rows). For row n and each k:
//   z = h[n] + outs[k][n] (D values), mu = mean(z), rstd = 1 / sqrt(mean((z - mu)^2) + eps)
// (two passes over the row), then
//   out[n] = residual[n] + sign * sum_k weights[k] * ((z - mu) * rstd * ln_w[k] + ln_b[k]).
// h / residual / out: (N, D); outs: K x (N, D); weights: (K,); ln_w, ln_b: (K, D);
// mean_out, rstd_out: (K, N). residual may be nullptr (treated as 0).
template <typename scalar_t, typename acc_t>
__global__ void mixed_ln_sum_kernel(const scalar_t* __restrict__ h, PtrList<const scalar_t> outs,
                                    const acc_t* __restrict__ weights, const acc_t* __restrict__ ln_w,
                                    const acc_t* __restrict__ ln_b, const scalar_t* __restrict__ residual,
                                    scalar_t* __restrict__ out, acc_t* __restrict__ mean_out,
                                    acc_t* __restrict__ rstd_out, int64_t N, int64_t D, int K, acc_t eps,
                                    acc_t sign) {
  __shared__ acc_t s_red[32];
  __shared__ acc_t s_mean[kMaxK];
  __shared__ acc_t s_rstd[kMaxK];
  const acc_t d_acc = static_cast<acc_t>(D);

  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t base = row * D;
    const scalar_t* h_row = h + base;

    // Row statistics of z_k = h + outs[k], one k at a time.
    for (int k = 0; k < K; ++k) {
      const scalar_t* o_row = outs.ptr[k] + base;
      acc_t sum = 0;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        sum += to_acc<acc_t>(h_row[j]) + to_acc<acc_t>(o_row[j]);
      }
      const acc_t mu = block_reduce_sum(sum, s_red) / d_acc;
      acc_t sq = 0;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        const acc_t c = to_acc<acc_t>(h_row[j]) + to_acc<acc_t>(o_row[j]) - mu;
        sq += c * c;
      }
      const acc_t var = block_reduce_sum(sq, s_red) / d_acc;
      const acc_t rstd = acc_t(1) / sqrt(var + eps);
      if (threadIdx.x == 0) {
        s_mean[k] = mu;
        s_rstd[k] = rstd;
        mean_out[static_cast<int64_t>(k) * N + row] = mu;
        rstd_out[static_cast<int64_t>(k) * N + row] = rstd;
      }
    }
    __syncthreads();  // s_mean / s_rstd visible to all threads

    // Weighted sum of the K layer norms.
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      const acc_t hv = to_acc<acc_t>(h_row[j]);
      acc_t total = 0;
      for (int k = 0; k < K; ++k) {
        const int64_t p = static_cast<int64_t>(k) * D + j;
        const acc_t xhat = normalize(hv, to_acc<acc_t>(outs.ptr[k][base + j]), s_mean[k], s_rstd[k]);
        total += weights[k] * (xhat * ln_w[p] + ln_b[p]);
      }
      total *= sign;
      if (residual != nullptr) total = to_acc<acc_t>(residual[base + j]) + total;
      out[base + j] = static_cast<scalar_t>(total);
    }
    __syncthreads();  // s_mean / s_rstd are rewritten for the next row
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_ln_sum_cuda(const at::Tensor& h_in, at::TensorList outs_in,
                                                                 const at::Tensor& weights_in,
                                                                 const at::Tensor& ln_weight_in,
                                                                 const at::Tensor& ln_bias_in, double eps,
                                                                 const std::optional<at::Tensor>& residual_in,
                                                                 double sign) {
  const auto outs = checked_list(outs_in, "outs");
  const c10::cuda::CUDAGuard guard(outs[0].device());
  const at::Tensor h = checked_like(h_in, outs[0], "h");
  const int64_t K = static_cast<int64_t>(outs.size());
  const LnParams params = checked_ln_params(h, K, weights_in, ln_weight_in, ln_bias_in);
  const int64_t D = params.D, N = params.N;
  const auto acc = params.acc;
  at::Tensor residual;
  if (residual_in.has_value()) residual = checked_like(*residual_in, h, "residual");

  at::Tensor out = at::empty(h.sizes(), h.options());
  // Empty rows (D == 0) get mean 0 and rstd 0; nothing is launched.
  if (N == 0 || D == 0) {
    return {out, at::zeros({K, N}, h.options().dtype(acc)), at::zeros({K, N}, h.options().dtype(acc))};
  }
  at::Tensor mean = at::empty({K, N}, h.options().dtype(acc));
  at::Tensor rstd = at::empty({K, N}, h.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "mdarts_mixed_ln_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto out_ptrs = make_ptr_list<const scalar_t>(outs, "outs");
    const int threads = row_threads(D);
    const auto blocks = static_cast<unsigned int>(row_blocks(N, threads));
    const scalar_t* res_ptr = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
    mixed_ln_sum_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        h.data_ptr<scalar_t>(), out_ptrs, params.weights.data_ptr<acc_t>(), params.ln_weight.data_ptr<acc_t>(),
        params.ln_bias.data_ptr<acc_t>(), res_ptr, out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>(), N, D, static_cast<int>(K), static_cast<acc_t>(eps), static_cast<acc_t>(sign));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

// ---------------------------------------------------------------------------
// mixed_ln_sum_backward
// ---------------------------------------------------------------------------

// One block per row (grid-stride over rows). With g = grad[n], c_k = sign * weights[k],
// xhat_k = (h + outs[k] - mean[k, n]) * rstd[k, n] and dxhat_k = c_k * g * ln_w[k]:
//   a_k = mean_j(dxhat_k), b_k = mean_j(dxhat_k * xhat_k)              (first pass, per k)
//   dz_k = rstd_k * (dxhat_k - a_k - xhat_k * b_k)                      (second pass)
//   grad_outs[k][n] = dz_k, grad_h[n] = sum_k dz_k
// grad / h / grad_h: (N, D); outs / grad_outs: K x (N, D); weights: (K,); ln_w: (K, D);
// mean, rstd: (K, N).
template <typename scalar_t, typename acc_t>
__global__ void mixed_ln_sum_backward_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                                  PtrList<const scalar_t> outs, const acc_t* __restrict__ weights,
                                                  const acc_t* __restrict__ ln_w, const acc_t* __restrict__ mean,
                                                  const acc_t* __restrict__ rstd, scalar_t* __restrict__ grad_h,
                                                  PtrList<scalar_t> grad_outs, int64_t N, int64_t D, int K,
                                                  acc_t sign) {
  __shared__ acc_t s_red[32];
  __shared__ acc_t s_mean[kMaxK];
  __shared__ acc_t s_rstd[kMaxK];
  __shared__ acc_t s_a[kMaxK];
  __shared__ acc_t s_b[kMaxK];
  const acc_t d_acc = static_cast<acc_t>(D);

  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t base = row * D;
    const scalar_t* g_row = grad + base;
    const scalar_t* h_row = h + base;

    // a_k and b_k, one k at a time.
    for (int k = 0; k < K; ++k) {
      const scalar_t* o_row = outs.ptr[k] + base;
      const acc_t mu = mean[static_cast<int64_t>(k) * N + row];
      const acc_t rs = rstd[static_cast<int64_t>(k) * N + row];
      const acc_t c = sign * weights[k];
      acc_t sum_a = 0;
      acc_t sum_b = 0;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        const acc_t xhat = normalize(to_acc<acc_t>(h_row[j]), to_acc<acc_t>(o_row[j]), mu, rs);
        const acc_t dxhat = c * to_acc<acc_t>(g_row[j]) * ln_w[static_cast<int64_t>(k) * D + j];
        sum_a += dxhat;
        sum_b += dxhat * xhat;
      }
      const acc_t a = block_reduce_sum(sum_a, s_red) / d_acc;
      const acc_t b = block_reduce_sum(sum_b, s_red) / d_acc;
      if (threadIdx.x == 0) {
        s_mean[k] = mu;
        s_rstd[k] = rs;
        s_a[k] = a;
        s_b[k] = b;
      }
    }
    __syncthreads();  // s_* visible to all threads

    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      const acc_t g = to_acc<acc_t>(g_row[j]);
      const acc_t hv = to_acc<acc_t>(h_row[j]);
      acc_t gh = 0;
      for (int k = 0; k < K; ++k) {
        const acc_t xhat = normalize(hv, to_acc<acc_t>(outs.ptr[k][base + j]), s_mean[k], s_rstd[k]);
        const acc_t dxhat = sign * weights[k] * g * ln_w[static_cast<int64_t>(k) * D + j];
        const acc_t dz = s_rstd[k] * (dxhat - s_a[k] - xhat * s_b[k]);
        grad_outs.ptr[k][base + j] = static_cast<scalar_t>(dz);
        gh += dz;
      }
      grad_h[base + j] = static_cast<scalar_t>(gh);
    }
    __syncthreads();  // s_* are rewritten for the next row
  }
}

// Column partial sums over rows. Block (32, kColRows): threadIdx.x picks the column
// j = blockIdx.x * 32 + threadIdx.x, threadIdx.y strides over the rows of chunk
// blockIdx.y (rows n = blockIdx.y * kColRows + threadIdx.y + m * gridDim.y * kColRows).
// blockIdx.z picks kColGroup consecutive slots s in [0, K]:
//   s <  K: partial[chunk, s, j] = sum_n g[n, j] * xhat_s[n, j]
//   s == K: partial[chunk, K, j] = sum_n g[n, j]
// grad / h: (N, D); outs: K x (N, D); mean, rstd: (K, N); partial: (gridDim.y, K + 1, D).
constexpr int kColWidth = 32;
constexpr int kColRows = 8;
constexpr int kColGroup = 4;
static_assert(kColGroup <= kColRows, "the slot reduction uses threadIdx.y < kColGroup");

template <typename scalar_t, typename acc_t>
__global__ void mixed_ln_sum_backward_cols_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                                  PtrList<const scalar_t> outs, const acc_t* __restrict__ mean,
                                                  const acc_t* __restrict__ rstd, acc_t* __restrict__ partial,
                                                  int64_t N, int64_t D, int K) {
  __shared__ acc_t s_acc[kColGroup][kColRows][kColWidth];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColWidth + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * kColRows;
  const int s0 = static_cast<int>(blockIdx.z) * kColGroup;

  acc_t acc[kColGroup];
#pragma unroll
  for (int q = 0; q < kColGroup; ++q) acc[q] = 0;

  if (j < D) {
    for (int64_t n = chunk * kColRows + threadIdx.y; n < N; n += row_stride) {
      const int64_t idx = n * D + j;
      const acc_t g = to_acc<acc_t>(grad[idx]);
      const acc_t hv = to_acc<acc_t>(h[idx]);
#pragma unroll
      for (int q = 0; q < kColGroup; ++q) {
        const int s = s0 + q;
        if (s < K) {
          const int64_t stat = static_cast<int64_t>(s) * N + n;
          acc[q] += g * normalize(hv, to_acc<acc_t>(outs.ptr[s][idx]), mean[stat], rstd[stat]);
        } else if (s == K) {
          acc[q] += g;
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kColGroup; ++q) s_acc[q][threadIdx.y][threadIdx.x] = acc[q];
  __syncthreads();

  // Thread row q (< kColGroup) sums the kColRows values of slot s0 + q in a fixed order.
  const int q = threadIdx.y;
  const int s = s0 + q;
  if (q < kColGroup && s <= K && j < D) {
    acc_t total = 0;
    for (int r = 0; r < kColRows; ++r) total += s_acc[q][r][threadIdx.x];
    partial[(chunk * (K + 1) + s) * D + j] = total;
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> mixed_ln_sum_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& h_in, at::TensorList outs_in, const at::Tensor& weights_in,
    const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, double sign) {
  const auto outs = checked_list(outs_in, "outs");
  const c10::cuda::CUDAGuard guard(outs[0].device());
  const at::Tensor h = checked_like(h_in, outs[0], "h");
  const at::Tensor grad = checked_like(grad_in, h, "grad");
  const int64_t K = static_cast<int64_t>(outs.size());
  const LnParams params = checked_ln_params(h, K, weights_in, ln_weight_in, ln_bias_in);
  const int64_t D = params.D, N = params.N;
  const auto acc = params.acc;
  const at::Tensor mean = checked_param(mean_in, {K, N}, h.device(), acc, "mean");
  const at::Tensor rstd = checked_param(rstd_in, {K, N}, h.device(), acc, "rstd");

  at::Tensor grad_h = at::empty(h.sizes(), h.options());
  std::vector<at::Tensor> grad_outs = empty_like_each(outs);
  if (N == 0 || D == 0) {
    return {grad_h, grad_outs, at::zeros({K}, weights_in.options()), at::zeros({K, D}, ln_weight_in.options()),
            at::zeros({K, D}, ln_bias_in.options())};
  }

  // Column sums: chunks of rows so that the grid has a few blocks per SM.
  const int64_t col_blocks = ceil_div(D, kColWidth);
  const int64_t slot_groups = ceil_div(K + 1, kColGroup);
  const int64_t target_chunks = std::max<int64_t>(1, (num_sms() * 8) / (col_blocks * slot_groups));
  const int64_t chunks = std::min<int64_t>({target_chunks, ceil_div(N, kColRows), int64_t{65535}});
  at::Tensor partial = at::empty({chunks, K + 1, D}, h.options().dtype(acc));  // (chunks, K + 1, D)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "mdarts_mixed_ln_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto out_ptrs = make_ptr_list<const scalar_t>(outs, "outs");
    const auto grad_ptrs = make_ptr_list<scalar_t>(grad_outs, "grad_outs");
    const auto stream = at::cuda::getCurrentCUDAStream();

    const int threads = row_threads(D);
    const auto blocks = static_cast<unsigned int>(row_blocks(N, threads));
    mixed_ln_sum_backward_rows_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), out_ptrs, params.weights.data_ptr<acc_t>(),
        params.ln_weight.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), grad_h.data_ptr<scalar_t>(),
        grad_ptrs, N, D, static_cast<int>(K), static_cast<acc_t>(sign));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const dim3 col_grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(chunks),
                        static_cast<unsigned int>(slot_groups));
    const dim3 col_block(kColWidth, kColRows);
    mixed_ln_sum_backward_cols_kernel<scalar_t, acc_t><<<col_grid, col_block, 0, stream>>>(
        grad.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), out_ptrs, mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        partial.data_ptr<acc_t>(), N, D, static_cast<int>(K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const at::Tensor sums = partial.sum(0);     // (K + 1, D)
  const at::Tensor S = sums.narrow(0, 0, K);  // (K, D): sum_n g * xhat_k
  const at::Tensor C = sums.select(0, K);     // (D): sum_n g
  auto param_grads = ln_param_grads(S, C, params.weights, params.ln_weight, params.ln_bias, sign);
  return {grad_h, grad_outs, std::get<0>(param_grads).to(weights_in.scalar_type()),
          std::get<1>(param_grads).to(ln_weight_in.scalar_type()),
          std::get<2>(param_grads).to(ln_bias_in.scalar_type())};
}

// ---------------------------------------------------------------------------
// split_pool
// ---------------------------------------------------------------------------

// out[i] = max_k xs[k][i] (first maximum, NaN propagates) or mean_k xs[k][i].
// xs: K x (numel,), out: (numel,)
template <typename scalar_t, typename acc_t>
__global__ void split_pool_kernel(PtrList<const scalar_t> xs, scalar_t* __restrict__ out, int64_t numel, int K,
                                  bool is_max) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    if (is_max) {
      out[i] = xs.ptr[first_max_index<acc_t>(xs, K, i)][i];
    } else {
      acc_t total = 0;
      for (int k = 0; k < K; ++k) total += to_acc<acc_t>(xs.ptr[k][i]);
      out[i] = static_cast<scalar_t>(total / static_cast<acc_t>(K));
    }
  }
}

// max:  grad_xs[k][i] = grad[i] if k is the first maximum of xs[.][i], else 0
// mean: grad_xs[k][i] = grad[i] / K
// grad: (numel,), xs / grad_xs: K x (numel,)
template <typename scalar_t, typename acc_t>
__global__ void split_pool_backward_kernel(const scalar_t* __restrict__ grad, PtrList<const scalar_t> xs,
                                           PtrList<scalar_t> grad_xs, int64_t numel, int K, bool is_max) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const scalar_t zero = static_cast<scalar_t>(acc_t(0));
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const scalar_t g = grad[i];
    if (is_max) {
      const int best = first_max_index<acc_t>(xs, K, i);
      for (int k = 0; k < K; ++k) grad_xs.ptr[k][i] = k == best ? g : zero;
    } else {
      const scalar_t share = static_cast<scalar_t>(to_acc<acc_t>(g) / static_cast<acc_t>(K));
      for (int k = 0; k < K; ++k) grad_xs.ptr[k][i] = share;
    }
  }
}

at::Tensor split_pool_cuda(at::TensorList xs_in, c10::string_view mode) {
  const bool is_max = pool_is_max(mode);
  const auto xs = checked_list(xs_in, "xs");
  const at::Tensor& first = xs[0];
  const c10::cuda::CUDAGuard guard(first.device());
  at::Tensor out = at::empty(first.sizes(), first.options());
  const int64_t numel = first.numel();
  if (numel == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "mdarts_split_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise(split_pool_kernel<scalar_t, acc_t>, numel, make_ptr_list<const scalar_t>(xs, "xs"),
                       out.data_ptr<scalar_t>(), numel, static_cast<int>(xs.size()), is_max);
  });
  return out;
}

std::vector<at::Tensor> split_pool_backward_cuda(const at::Tensor& grad_in, at::TensorList xs_in,
                                                 c10::string_view mode) {
  const bool is_max = pool_is_max(mode);
  const auto xs = checked_list(xs_in, "xs");
  const at::Tensor& first = xs[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor grad = checked_like(grad_in, first, "grad");
  std::vector<at::Tensor> grad_xs = empty_like_each(xs);
  const int64_t numel = first.numel();
  if (numel == 0) return grad_xs;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "mdarts_split_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto x_ptrs = make_ptr_list<const scalar_t>(xs, "xs");
    const auto grad_ptrs = make_ptr_list<scalar_t>(grad_xs, "grad_xs");
    launch_elementwise(split_pool_backward_kernel<scalar_t, acc_t>, numel, grad.data_ptr<scalar_t>(), x_ptrs,
                       grad_ptrs, numel, static_cast<int>(xs.size()), is_max);
  });
  return grad_xs;
}

// ---------------------------------------------------------------------------
// seeded_dropout
// ---------------------------------------------------------------------------

// out[i] = x[i] * (keep(i) ? scale : 0), keep from dropout_hash.h; x, out: (numel,)
template <typename scalar_t, typename acc_t>
__global__ void seeded_dropout_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t numel,
                                      uint32_t k0, uint32_t k1, uint32_t threshold, acc_t scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = static_cast<scalar_t>(to_acc<acc_t>(x[i]) * (dropout_keep(i, k0, k1, threshold) ? scale : acc_t(0)));
  }
}

at::Tensor seeded_dropout_cuda(const at::Tensor& x_in, double p, int64_t seed) {
  check_data_dtype(x_in, "x");
  check_dropout_p(p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mdarts_seeded_dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_elementwise(seeded_dropout_kernel<scalar_t, acc_t>, numel, x.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), numel, k0, k1, dropout_threshold(p),
                       static_cast<acc_t>(1.0 / (1.0 - p)));
  });
  return out;
}

}  // namespace
}  // namespace mdarts

TORCH_LIBRARY_IMPL(mdarts, CUDA, m) {
  m.impl("mixed_sum", &mdarts::mixed_sum_cuda);
  m.impl("mixed_sum_backward", &mdarts::mixed_sum_backward_cuda);
  m.impl("mixed_ln_sum", &mdarts::mixed_ln_sum_cuda);
  m.impl("mixed_ln_sum_backward", &mdarts::mixed_ln_sum_backward_cuda);
  m.impl("split_pool", &mdarts::split_pool_cuda);
  m.impl("split_pool_backward", &mdarts::split_pool_backward_cuda);
  m.impl("seeded_dropout", &mdarts::seeded_dropout_cuda);
}
