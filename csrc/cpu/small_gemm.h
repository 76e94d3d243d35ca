// Linear layer for a handful of rows (decode, small batches): out = x @ weight^T + bias, streaming
// each weight row from memory once. At m <= kSmallGemmMaxRows rows a GEMM is bound by the weight
// reads, and oneDNN's per-call packing of the weight costs more than the product itself.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace cumo {

constexpr int64_t kSmallGemmMaxRows = 8;

// Whether small_rows_linear runs for this dtype on this CPU (fp32 or bf16, AVX-512).
bool small_gemm_supported(at::ScalarType dtype);

// out[i * n + j] = sum_c rows[i][c] * w[j * ldw + c] + bias[j], in fp32, for i < m, j < n, with
// 1 <= m <= kSmallGemmMaxRows. rows: m pointers to k contiguous elements each, anywhere in memory (the
// gather of token rows is fused into the product: no gathered copy); bias may be null. T is float or
// c10::BFloat16; bf16 takes AVX512_BF16's pairwise dot product where the CPU has it (products exact,
// fp32 sums). Parallel over n when called outside a parallel region. Requires small_gemm_supported.
template <typename T>
void small_rows_linear(const T* const* rows, int64_t m, int64_t k, const T* w, int64_t ldw, const T* bias, int64_t n,
                       float* out);

// Tensor form: x [m, K]; weight [N, K] with unit stride along K; bias [N] or none; out [m, N] contiguous.
// Returns true when it ran; false (out untouched) when it does not apply, and the caller runs at::mm.
bool small_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace cumo
