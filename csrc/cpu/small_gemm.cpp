// Small-m linear layer with AVX-512: see small_gemm.h.
// Grid: output features split across threads; each task converts the m input rows to fp32 once
// (they stay in L1/L2), then streams every weight row once with its m dot products in registers.
// Reads N*K weights + m*K inputs, writes m*N outputs.
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace cumo {
namespace {

constexpr int64_t kFeatureGrain = 64;  // output features per parallel task

// Only the kernels below are compiled for AVX-512; small_linear checks the CPU before calling them.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// outf[i * n + j] = <xf[i], w[j]> + bias[j] for j in [j0, j1), i < M; xf: [M, K] fp32.
// Each weight row is read front to back as one sequential stream (what the hardware prefetcher
// follows best); U independent accumulator sets per input row hide the FMA latency.
template <typename T, int M, int U>
void rows_times_weight(const float* xf, int64_t k, const T* w, int64_t ldw, const float* bias, int64_t j0,
                       int64_t j1, float* outf, int64_t n) {
  const __mmask16 full = 0xFFFF;
  for (int64_t j = j0; j < j1; ++j) {
    const T* row = w + j * ldw;
    __m512 acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int i = 0; i < M; ++i) acc[u][i] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 * U <= k; d += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const __m512 v = load16(row + d + 16 * u, full);
        for (int i = 0; i < M; ++i)
          acc[u][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xf + i * k + d + 16 * u), acc[u][i]);
      }
    }
    for (; d < k; d += 16) {
      const __mmask16 mask = k - d >= 16 ? full : static_cast<__mmask16>((1u << (k - d)) - 1);
      const __m512 v = load16(row + d, mask);
      for (int i = 0; i < M; ++i) acc[0][i] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mask, xf + i * k + d), acc[0][i]);
    }
    const float b = bias ? bias[j] : 0.f;
    for (int i = 0; i < M; ++i) {
      for (int u = 1; u < U; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
      outf[i * n + j] = _mm512_reduce_add_ps(acc[0][i]) + b;
    }
  }
}

#pragma GCC pop_options

template <typename T>
using KernelFn = void (*)(const float*, int64_t, const T*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <typename T>
KernelFn<T> kernel_for_rows(int64_t m) {
  switch (m) {
    case 1: return rows_times_weight<T, 1, 8>;
    case 2: return rows_times_weight<T, 2, 6>;
    case 3: return rows_times_weight<T, 3, 4>;
    case 4: return rows_times_weight<T, 4, 4>;
    case 5: return rows_times_weight<T, 5, 2>;
    case 6: return rows_times_weight<T, 6, 2>;
    case 7: return rows_times_weight<T, 7, 2>;
    case 8: return rows_times_weight<T, 8, 2>;
  }
  return nullptr;
}

template <typename T>
void small_linear_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor outf = std::is_same_v<T, float> ? out : at::empty({m, n}, out.options().dtype(at::kFloat));
  const KernelFn<T> kernel = kernel_for_rows<T>(m);
  const T* w = weight.const_data_ptr<T>();
  const int64_t ldw = weight.stride(0);
  at::parallel_for(0, n, kFeatureGrain, [&](int64_t j0, int64_t j1) {
    kernel(xf.const_data_ptr<float>(), k, w, ldw, bf.defined() ? bf.const_data_ptr<float>() : nullptr, j0, j1,
           outf.mutable_data_ptr<float>(), n);
  });
  if (!outf.is_same(out)) out.copy_(outf);
}

}  // namespace

bool small_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const auto dtype = weight.scalar_type();
  if (!has_avx512 || x.size(0) < 1 || x.size(0) > kSmallGemmMaxRows || weight.stride(1) != 1 ||
      !out.is_contiguous() || (dtype != at::kFloat && dtype != at::kBFloat16))
    return false;
  if (dtype == at::kFloat) small_linear_impl<float>(out, x, weight, bias);
  else small_linear_impl<c10::BFloat16>(out, x, weight, bias);
  return true;
}

}  // namespace cumo
