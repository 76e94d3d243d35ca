// Moving rows between token order and the expert-sorted order of a routing plan: see token_rows.h.
#include "token_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_features.h"

#if CUMO_X86_KERNELS
#include <immintrin.h>
#endif

namespace cumo {

constexpr int64_t kRowGrain = 64;  // rows (tokens) per task of the gather and the combine

void gather_token_rows(at::Tensor& out, const at::Tensor& src, const int64_t* slots, int64_t m, int64_t top_k) {
  const int64_t bytes = src.size(1) * src.element_size();
  const char* from = static_cast<const char*>(src.const_data_ptr());
  char* to = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, m, kRowGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(to + i * bytes, from + (slots[i] / top_k) * bytes, bytes);
  });
}

namespace {

#if CUMO_X86_KERNELS
// Row loops of the combine, vectorised by the compiler for the CPU found at load time (ifunc clones).
#define CUMO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CUMO_CLONES
#endif

template <typename acc_t, typename scalar_t>
void axpy_row(acc_t* acc, const scalar_t* row, acc_t s, int64_t n) {  // acc += s * row
  for (int64_t c = 0; c < n; ++c) acc[c] += s * static_cast<acc_t>(row[c]);
}

template <typename acc_t, typename scalar_t>
void store_row(scalar_t* out, const acc_t* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(acc[c]);
}

CUMO_CLONES void axpy_row(float* acc, const float* row, float s, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += s * row[c];
}

CUMO_CLONES void axpy_row(float* acc, const c10::BFloat16* row, float s, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t widened = static_cast<uint32_t>(bits[c]) << 16;
    float value;
    std::memcpy(&value, &widened, sizeof(value));
    acc[c] += s * value;
  }
}

// Round to nearest even, NaN to the canonical 0x7FC0, as c10::BFloat16 does.
CUMO_CLONES void store_row(c10::BFloat16* out, const float* acc, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t c = 0; c < n; ++c) {
    uint32_t u;
    std::memcpy(&u, acc + c, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits[c] = acc[c] != acc[c] ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

// One token of the combine with AVX-512 (fp32 and bf16 rows): out[c] = sum_r scales[r] * rows[r][c] over
// the token's n kept rows, the sum for 16 columns held in a register while all n rows stream in
// lockstep (n concurrent read streams per thread), one fused multiply-add per row in row order, bf16
// rounded to nearest even with NaN canonical. Only called after the CPU check.
#if CUMO_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

inline __m512 load16_widened(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16_widened(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
inline void store16_rounded(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16_rounded(c10::BFloat16* p, __m512 v, __mmask16 mask) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(rounded));
}

template <typename scalar_t>
void combine_token_avx512(const scalar_t* const* rows, const float* scales, int64_t n, int64_t cols, scalar_t* out) {
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 mask = cols - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (cols - c)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < n; ++r)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(scales[r]), load16_widened(rows[r] + c, mask), acc);
    store16_rounded(out + c, acc, mask);
  }
}

#pragma GCC pop_options
#endif  // CUMO_X86_KERNELS

// out[t] = sum_k [id kept] scale[t,k] * rows[slot_rows[t*K+k]], accumulated in opmath_t, in k order.
// scale == nullptr means 1. Dropped slots are skipped, never multiplied, so nothing leaks from them.
template <typename scalar_t>
void combine_kernel(const scalar_t* rows, const int64_t* slot_rows, const at::opmath_type<scalar_t>* scale,
                    const int64_t* ids, int64_t num_experts, int64_t tokens, int64_t top_k, int64_t cols,
                    scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
#if CUMO_X86_KERNELS
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_has_avx512() && top_k <= 64) {
      at::parallel_for(0, tokens, kRowGrain, [&](int64_t t0, int64_t t1) {
        const scalar_t* token_rows[64];
        float token_scales[64];
        for (int64_t t = t0; t < t1; ++t) {
          int64_t n = 0;
          for (int64_t k = 0; k < top_k; ++k) {
            const int64_t slot = t * top_k + k;
            if (ids[slot] < 0 || ids[slot] >= num_experts) continue;
            token_rows[n] = rows + slot_rows[slot] * cols;
            token_scales[n++] = scale ? scale[slot] : 1.f;
          }
          combine_token_avx512(token_rows, token_scales, n, cols, out + t * cols);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, tokens, kRowGrain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(cols);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t slot = t * top_k + k;
        if (ids[slot] < 0 || ids[slot] >= num_experts) continue;
        const scalar_t* row = rows + slot_rows[slot] * cols;
        axpy_row(acc.data(), row, scale ? scale[slot] : acc_t(1), cols);
      }
      store_row(out + t * cols, acc.data(), cols);
    }
  });
}

}  // namespace

at::Tensor combine(const at::Tensor& rows, const RoutingPlan& plan, const at::Tensor& scale, const at::Tensor& ids,
                   int64_t num_experts) {
  const int64_t tokens = ids.size(0), top_k = ids.size(1), cols = rows.size(1);
  at::Tensor out = at::empty({tokens, cols}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "cumo_combine", [&] {
    combine_kernel<scalar_t>(rows.const_data_ptr<scalar_t>(), plan.slot_rows.const_data_ptr<int64_t>(),
                             scale.defined() ? scale.const_data_ptr<at::opmath_type<scalar_t>>() : nullptr,
                             ids.const_data_ptr<int64_t>(), num_experts, tokens, top_k, cols,
                             out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace cumo
