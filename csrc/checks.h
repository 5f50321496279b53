// Argument checks and preparation shared by the CPU and CUDA kernels.
// The Python layer raises friendlier errors first; these checks make a direct
// torch.ops.mdarts.* call fail with a message instead of a crash.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <string>
#include <vector>

namespace mdarts {

inline void check_data_dtype(const at::Tensor& t, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              name, ": expected a float64, float32, float16 or bfloat16 tensor, got ", dt);
}

// outs: K >= 1 tensors of one shape, dtype and device. Returns them contiguous.
inline std::vector<at::Tensor> checked_list(at::TensorList outs, const char* name) {
  TORCH_CHECK(!outs.empty(), name, ": expected at least one tensor (K >= 1), got an empty list");
  const auto& first = outs[0];
  check_data_dtype(first, name);
  std::vector<at::Tensor> result;
  result.reserve(outs.size());
  for (size_t k = 0; k < outs.size(); ++k) {
    const auto& t = outs[k];
    TORCH_CHECK(t.sizes() == first.sizes(), name, "[", k, "]: expected shape ", first.sizes(),
                " like ", name, "[0], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), name, "[", k, "]: expected dtype ",
                first.scalar_type(), " like ", name, "[0], got ", t.scalar_type());
    TORCH_CHECK(t.device() == first.device(), name, "[", k, "]: expected device ", first.device(),
                " like ", name, "[0], got ", t.device());
    result.push_back(t.contiguous());
  }
  return result;
}

// A tensor that must match `like` in shape, dtype and device. Returns it contiguous.
inline at::Tensor checked_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ",
              t.device());
  return t.contiguous();
}

// A new contiguous tensor like each of `ts` (the gradients of a tensor list).
inline std::vector<at::Tensor> empty_like_each(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> result;
  result.reserve(ts.size());
  for (const auto& t : ts) result.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  return result;
}

// Accumulation dtype of a data dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType data) {
  return data == at::kDouble ? at::kDouble : at::kFloat;
}

// A small float parameter tensor of the given shape, returned contiguous in dtype `acc`.
inline at::Tensor checked_param(const at::Tensor& t, at::IntArrayRef shape, const at::Device& device,
                                at::ScalarType acc, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == device, name, ": expected device ", device, ", got ", t.device());
  return t.to(acc).contiguous();
}

inline int64_t feature_dim(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, name, ": expected at least one dimension (the feature axis D)");
  TORCH_CHECK(t.size(-1) >= 1, name, ": expected a feature axis D >= 1, got shape ", t.sizes());
  return t.size(-1);
}

// The arguments that mixed_ln_sum and mixed_ln_sum_backward share, checked against h (already
// checked like outs[0]; K = outs.size()): h is viewed as N rows of D features, and the weights
// (K) and LayerNorm parameters (K, D) are returned contiguous in the accumulation dtype acc.
struct LnParams {
  int64_t D;
  int64_t N;
  at::ScalarType acc;
  at::Tensor weights;
  at::Tensor ln_weight;
  at::Tensor ln_bias;
};

inline LnParams checked_ln_params(const at::Tensor& h, int64_t K, const at::Tensor& weights,
                                  const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  const int64_t D = feature_dim(h, "h");
  const auto acc = acc_dtype(h.scalar_type());
  // a braced list is evaluated in order: the checks run (and fail) in the order written
  return {D,
          h.numel() / D,
          acc,
          checked_param(weights, {K}, h.device(), acc, "weights"),
          checked_param(ln_weight, {K, D}, h.device(), acc, "ln_weight"),
          checked_param(ln_bias, {K, D}, h.device(), acc, "ln_bias")};
}

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a dropout probability in [0, 1), got ", p);
}

inline bool pool_is_max(c10::string_view mode) {
  TORCH_CHECK(mode == "max" || mode == "mean", "mode: expected 'max' or 'mean', got '",
              std::string(mode), "'");
  return mode == "max";
}

// Parameter gradients of mixed_ln_sum from its two column sums over all rows:
// S (K, D) = sum_n grad[n] * xhat_k[n] and C (D) = sum_n grad[n]. Returns, in the dtype
// of S: (grad_weights (K), grad_ln_weight (K, D), grad_ln_bias (K, D)).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_param_grads(const at::Tensor& S, const at::Tensor& C,
                                                                     const at::Tensor& weights,
                                                                     const at::Tensor& ln_weight,
                                                                     const at::Tensor& ln_bias, double sign) {
  auto scale = (weights * sign).unsqueeze(1);                       // (K, 1)
  auto grad_ln_weight = scale * S;                                  // (K, D)
  auto grad_ln_bias = scale * C.unsqueeze(0);                       // (K, D)
  auto grad_weights = ((ln_weight * S).sum(1) + (ln_bias * C.unsqueeze(0)).sum(1)) * sign;  // (K)
  return {grad_weights, grad_ln_weight, grad_ln_bias};
}

}  // namespace mdarts
