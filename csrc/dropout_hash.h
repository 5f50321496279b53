// The counter-based keep mask of seeded_dropout, shared by the CPU and CUDA kernels and
// written out again in Python by mdarts_kernels.reference.dropout_keep (the Triton kernel
// and the reference must give the same bits).
//
// seeded_dropout(x, p, seed)[i] = x[i] * (keep(i) ? 1 / (1 - p) : 0) (a NaN stays NaN, as
// in torch's dropout). Element i (row-major index of the contiguous tensor) is kept when
//   mix32(mix32(lo ^ k0) + (k1 ^ hi)) >= threshold(p)
// with lo, hi the low and high 32 bits of i and k0, k1 those of the seed. No state: the
// backward (and a recomputation) rebuilds the mask from the seed instead of saving it.
#pragma once
#include <c10/macros/Macros.h>
#include <cstdint>

namespace mdarts {

// a 32-bit integer finaliser (xor-shift-multiply, "lowbias32")
C10_HOST_DEVICE inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

C10_HOST_DEVICE inline bool dropout_keep(int64_t index, uint32_t k0, uint32_t k1, uint32_t threshold) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i >> 32);
  return mix32(mix32(lo ^ k0) + (k1 ^ hi)) >= threshold;
}

// kept when hash >= threshold: threshold = floor(p * 2^32), at most 2^32 - 1
inline uint32_t dropout_threshold(double p) {
  const double scaled = p * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

}  // namespace mdarts
