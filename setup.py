"""Builds the compiled extensions of cumo-moe with torch.utils.cpp_extension (ninja).

moe_kernels._C     CPU ops (C++/OpenMP/ATen), every csrc/cpu/*.cpp. Skipped with CUMO_SKIP_CPU=1.
                   CUMO_SKIP_EXT=1 skips both extensions. CUMO_PORTABLE=1 leaves out the x86 AVX-512
                   kernels (csrc/cpu/cpu_features.h): the build that ARM and clang get, checkable on x86.
moe_kernels._cuda  CUDA ops, every csrc/cuda/*.cu and *.cpp. Built only where a CUDA build of torch
                   and nvcc exist; skipped with CUMO_SKIP_CUDA=1. Architectures from
                   TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). No GPU is queried at build time.
The package imports without either; moe_kernels.ops says which backends run and why not.
"""

import glob
import os

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers need C++20
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]


def extensions():
    if os.environ.get("CUMO_SKIP_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    include_dirs = [os.path.abspath("csrc")]
    modules = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources and os.environ.get("CUMO_SKIP_CPU") != "1":
        modules.append(
            CppExtension(
                "moe_kernels._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": CXX_FLAGS + (["-DCUMO_PORTABLE"] if os.environ.get("CUMO_PORTABLE") == "1" else [])},
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    want_cuda = os.environ.get("CUMO_SKIP_CUDA") != "1" and torch.version.cuda is not None
    if cuda_sources and want_cuda and CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        modules.append(
            CUDAExtension(
                "moe_kernels._cuda",
                cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": NVCC_FLAGS},
            )
        )
    return modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="cumo-moe",
    version="0.1.0",
    description="Sparse Mixture-of-Experts kernels and layers for PyTorch (CuMo-style co-upcycling)",
    packages=find_packages(include=["moe_kernels", "moe_kernels.*", "cumo_layers", "cumo_layers.*"]),
    package_data={"moe_kernels.triton": ["tuned/*.json"]},  # tile tables tuned per GPU model
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "safetensors"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["cumo-upcycle=cumo_layers.cli:main"]},
)
