// Small-m linear layer with AVX-512: see small_gemm.h.
// Grid: output features split across threads; each task streams every weight row of its features once,
// with the m dot products of that row in registers, the m input rows staying in L1/L2.
// Reads N*K weights + m*K inputs, writes m*N outputs.
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "cpu_features.h"

#if CUMO_X86_KERNELS
#include <immintrin.h>
#endif

namespace cumo {

#if CUMO_X86_KERNELS
bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512_bf16() { return false; }
#endif

namespace {

constexpr int64_t kFeatureGrain = 64;  // output features per parallel task

#if CUMO_X86_KERNELS
// Only the kernels below are compiled for AVX-512; the entry points check the CPU before calling them.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline float bias_at(const float* bias, int64_t j) { return bias ? bias[j] : 0.f; }
inline float bias_at(const c10::BFloat16* bias, int64_t j) { return bias ? static_cast<float>(bias[j]) : 0.f; }

template <int M, int U>
inline void zero(__m512 (&acc)[U][M]) {
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < M; ++i) acc[u][i] = _mm512_setzero_ps();
}

// out[i * n] = (sum over u and lanes of acc[u][i]) + b for each of the M rows: one output feature.
template <int M, int U>
inline void store_row_sums(__m512 (&acc)[U][M], float b, float* out, int64_t n) {
  for (int i = 0; i < M; ++i) {
    for (int u = 1; u < U; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    out[i * n] = _mm512_reduce_add_ps(acc[0][i]) + b;
  }
}

// out[i * n + j] = <x[i], w[j]> + bias[j] for j in [j0, j1), i < M; x rows fp32, weights W (fp32 or bf16,
// widened on load). Each weight row is read front to back as one sequential stream (what the hardware
// prefetcher follows best); U independent accumulator sets per input row hide the FMA latency.
template <typename W, int M, int U>
void fp32_rows_times_weight(const float* const* x, int64_t k, const W* w, int64_t ldw, const W* bias, int64_t j0,
                            int64_t j1, float* out, int64_t n) {
  const __mmask16 full = 0xFFFF;
  for (int64_t j = j0; j < j1; ++j) {
    const W* row = w + j * ldw;
    __m512 acc[U][M];
    zero(acc);
    int64_t d = 0;
    for (; d + 16 * U <= k; d += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const __m512 v = load16(row + d + 16 * u, full);
        for (int i = 0; i < M; ++i) acc[u][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x[i] + d + 16 * u), acc[u][i]);
      }
    }
    for (; d < k; d += 16) {
      const __mmask16 mask = k - d >= 16 ? full : static_cast<__mmask16>((1u << (k - d)) - 1);
      const __m512 v = load16(row + d, mask);
      for (int i = 0; i < M; ++i) acc[0][i] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mask, x[i] + d), acc[0][i]);
    }
    store_row_sums(acc, bias_at(bias, j), out + j, n);
  }
}

inline __m512bh load32_bf16(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load32_bf16(const c10::BFloat16* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// The same product for bf16 rows and weights with VDPBF16PS: each instruction multiplies 32 bf16 pairs
// exactly and adds them pairwise into 16 fp32 lanes, half the instructions of widen-then-FMA per weight.
template <int M, int U>
void bf16_rows_times_weight(const c10::BFloat16* const* x, int64_t k, const c10::BFloat16* w, int64_t ldw,
                            const c10::BFloat16* bias, int64_t j0, int64_t j1, float* out, int64_t n) {
  for (int64_t j = j0; j < j1; ++j) {
    const c10::BFloat16* row = w + j * ldw;
    __m512 acc[U][M];
    zero(acc);
    int64_t d = 0;
    for (; d + 32 * U <= k; d += 32 * U) {
      for (int u = 0; u < U; ++u) {
        const __m512bh v = load32_bf16(row + d + 32 * u);
        for (int i = 0; i < M; ++i) acc[u][i] = _mm512_dpbf16_ps(acc[u][i], v, load32_bf16(x[i] + d + 32 * u));
      }
    }
    for (; d < k; d += 32) {  // masked-off lanes load as +0: their products add nothing
      const __mmask32 mask = k - d >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (k - d)) - 1);
      const __m512bh v = load32_bf16(row + d, mask);
      for (int i = 0; i < M; ++i) acc[0][i] = _mm512_dpbf16_ps(acc[0][i], v, load32_bf16(x[i] + d, mask));
    }
    store_row_sums(acc, bias_at(bias, j), out + j, n);
  }
}

#pragma GCC pop_options

// Kernel tables by row count. U accumulator sets per row: enough independent chains (M * U >= 6-8)
// to cover the FMA/dot-product latency without spilling the 32 zmm registers.
template <typename W>
using Fp32Kernel = void (*)(const float* const*, int64_t, const W*, int64_t, const W*, int64_t, int64_t, float*,
                            int64_t);
using Bf16Kernel = void (*)(const c10::BFloat16* const*, int64_t, const c10::BFloat16*, int64_t,
                            const c10::BFloat16*, int64_t, int64_t, float*, int64_t);

template <typename W>
Fp32Kernel<W> fp32_kernel_for_rows(int64_t m) {
  switch (m) {
    case 1: return fp32_rows_times_weight<W, 1, 8>;
    case 2: return fp32_rows_times_weight<W, 2, 6>;
    case 3: return fp32_rows_times_weight<W, 3, 4>;
    case 4: return fp32_rows_times_weight<W, 4, 4>;
    case 5: return fp32_rows_times_weight<W, 5, 2>;
    case 6: return fp32_rows_times_weight<W, 6, 2>;
    case 7: return fp32_rows_times_weight<W, 7, 2>;
    case 8: return fp32_rows_times_weight<W, 8, 2>;
  }
  TORCH_CHECK(false, "small_rows_linear: ", m, " rows, expected 1..", kSmallGemmMaxRows);
}

Bf16Kernel bf16_kernel_for_rows(int64_t m) {
  switch (m) {
    case 1: return bf16_rows_times_weight<1, 8>;
    case 2: return bf16_rows_times_weight<2, 4>;
    case 3: return bf16_rows_times_weight<3, 3>;
    case 4: return bf16_rows_times_weight<4, 2>;
    case 5: return bf16_rows_times_weight<5, 2>;
    case 6: return bf16_rows_times_weight<6, 2>;
    case 7: return bf16_rows_times_weight<7, 2>;
    case 8: return bf16_rows_times_weight<8, 2>;
  }
  TORCH_CHECK(false, "small_rows_linear: ", m, " rows, expected 1..", kSmallGemmMaxRows);
}

#endif  // CUMO_X86_KERNELS

template <typename F>
void over_features(int64_t n, const F& fn) {
  at::parallel_for(0, n, kFeatureGrain, fn);
}

}  // namespace

bool small_gemm_supported(at::ScalarType dtype) {
  return cpu_has_avx512() && (dtype == at::kFloat || dtype == at::kBFloat16);
}

#if CUMO_X86_KERNELS
template <>
void small_rows_linear<float>(const float* const* rows, int64_t m, int64_t k, const float* w, int64_t ldw,
                              const float* bias, int64_t n, float* out) {
  const Fp32Kernel<float> kernel = fp32_kernel_for_rows<float>(m);
  over_features(n, [&](int64_t j0, int64_t j1) { kernel(rows, k, w, ldw, bias, j0, j1, out, n); });
}

template <>
void small_rows_linear<c10::BFloat16>(const c10::BFloat16* const* rows, int64_t m, int64_t k, const c10::BFloat16* w,
                                      int64_t ldw, const c10::BFloat16* bias, int64_t n, float* out) {
  if (cpu_has_avx512_bf16()) {
    const Bf16Kernel kernel = bf16_kernel_for_rows(m);
    over_features(n, [&](int64_t j0, int64_t j1) { kernel(rows, k, w, ldw, bias, j0, j1, out, n); });
    return;
  }
  // AVX-512 without BF16 (Skylake, Ice Lake): widen the m rows once, widen the weights on load.
  std::vector<float> widened(m * k);
  const float* widened_rows[kSmallGemmMaxRows];
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < k; ++c) widened[i * k + c] = static_cast<float>(rows[i][c]);
    widened_rows[i] = widened.data() + i * k;
  }
  const Fp32Kernel<c10::BFloat16> kernel = fp32_kernel_for_rows<c10::BFloat16>(m);
  over_features(n, [&](int64_t j0, int64_t j1) { kernel(widened_rows, k, w, ldw, bias, j0, j1, out, n); });
}
#else
template <>
void small_rows_linear<float>(const float* const*, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                              float*) {
  TORCH_CHECK(false, "small_rows_linear: this build has no x86 kernels (check small_gemm_supported first)");
}

template <>
void small_rows_linear<c10::BFloat16>(const c10::BFloat16* const*, int64_t, int64_t, const c10::BFloat16*, int64_t,
                                      const c10::BFloat16*, int64_t, float*) {
  TORCH_CHECK(false, "small_rows_linear: this build has no x86 kernels (check small_gemm_supported first)");
}
#endif

bool small_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  if (!small_gemm_supported(dtype) || m < 1 || m > kSmallGemmMaxRows || weight.stride(1) != 1 ||
      !out.is_contiguous() || x.scalar_type() != dtype)
    return false;
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor outf = dtype == at::kFloat ? out : at::empty({m, n}, out.options().dtype(at::kFloat));
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* rows[kSmallGemmMaxRows];
    for (int64_t i = 0; i < m; ++i) rows[i] = xc.const_data_ptr<scalar_t>() + i * k;
    small_rows_linear<scalar_t>(rows, m, k, weight.const_data_ptr<scalar_t>(), weight.stride(0),
                                bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, n,
                                outf.mutable_data_ptr<float>());
  };
  if (dtype == at::kFloat) run(float{});
  else run(c10::BFloat16{});
  if (!outf.is_same(out)) out.copy_(outf);
  return true;
}

}  // namespace cumo
