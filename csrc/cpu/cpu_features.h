// Which CPU-specific kernels this build has, and what the CPU running it supports.
//
// The AVX-512 kernels (small_gemm.cpp, the combine in expert_mlp.cpp) are x86-64 code compiled with
// GCC's per-function targets (#pragma GCC target, target_clones) and chosen at run time with
// __builtin_cpu_supports. Other builds (ARM, clang, MSVC; or -DCUMO_PORTABLE, which is how that build
// is checked on x86: CUMO_PORTABLE=1 python setup.py build_ext) have only the portable ATen paths, and
// the answers below are false.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && !defined(CUMO_PORTABLE)
#define CUMO_X86_KERNELS 1
#else
#define CUMO_X86_KERNELS 0
#endif

namespace cumo {

// AVX-512 F, BW, VL and DQ: what the fp32 and bf16-widening kernels use.
bool cpu_has_avx512();
// AVX-512 with AVX512_BF16 (VDPBF16PS).
bool cpu_has_avx512_bf16();

}  // namespace cumo
