// Linear layer for a handful of rows (decode, small batches): out = x @ weight^T + bias, streaming
// each weight row from memory once. At m <= kSmallGemmMaxRows rows a GEMM is bound by the weight
// reads, and oneDNN's per-call packing of the weight costs more than the product itself.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace cumo {

constexpr int64_t kSmallGemmMaxRows = 8;

// x: [m, K]; weight: [N, K] with unit stride along K; bias: [N] or none; out: [m, N] contiguous.
// Runs only for fp32/bf16 on CPUs with AVX-512 and returns true; returns false (out untouched) when
// it does not apply, and the caller runs at::mm. Parallel over N when called outside a parallel region.
bool small_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace cumo
