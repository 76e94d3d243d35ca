"""How the Triton backend launches: availability, compiled vs interpreted kernels, autotuning.

Under the interpreter (CPU tensors with TRITON_INTERPRET=1), two Triton facts are worked around:
whether a @triton.jit function is interpreted is fixed when it is *defined*, for Triton's own
library (tl.sum, tl.cumsum, ...) when ``triton`` is first imported. So kernels.py is loaded once per
mode, and an interpreted launch swaps Triton's compiled library functions for interpreted twins
for its duration. The mode therefore does not depend on when TRITON_INTERPRET was set relative to
the first ``import triton`` (timm, for one, imports triton). CUDA tensors run compiled kernels,
the two grouped GEMMs autotuned; under the interpreter tiles are fixed and small.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Fixed tiles under the interpreter: small, so that tests cross tile edges on tiny shapes.
INTERPRET_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
INTERPRET_WEIGHT_GRAD = dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_R=32)

# Number of launches per kernel name since the last reset: tests read it so that a silent
# fallback to PyTorch cannot pass.
LAUNCHES: Counter = Counter()

_KERNEL_FILE = Path(__file__).with_name("kernels.py")
_kernel_modules: dict[bool, ModuleType] = {}
_autotuned: dict[str, object] = {}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1"
    return f"Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device.type}"


def check_device(*tensors: Tensor | None) -> bool:
    """Raise unless the tensors share a device the kernels can run on; True under the interpreter."""
    from moe_kernels.ops import BackendUnavailableError

    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    reason = unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend 'triton' cannot run on {device.type}: {reason}")
    # CUDA tensors run compiled, unless triton itself was imported for the interpreter.
    return device.type == "cpu" or _library_is_interpreted()


def kernels(interpret: bool) -> ModuleType:
    """kernels.py with its @triton.jit functions defined in the requested mode."""
    if interpret not in _kernel_modules:
        from triton import knobs

        name = f"moe_kernels.triton._kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
        _kernel_modules[interpret] = module
    return _kernel_modules[interpret]


# Grouped GEMM tiles for H100-class GPUs (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Decode-sized
# problems (<= 64 rows in all) only try the thin tiles, larger ones only the wide ones, which keeps
# first-call compile time down; (64, 64, 32) is the safe default that fits any SM.
GEMM_TILES_FEW_ROWS = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4)]
GEMM_TILES_MANY_ROWS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                        (64, 64, 32, 4, 2)]
WEIGHT_GRAD_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 2)]


def _gemm_configs() -> list:
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
            for m, n, k, w, s in GEMM_TILES_FEW_ROWS + GEMM_TILES_MANY_ROWS]


def _prune_gemm_configs(configs, named_args, **kwargs):
    few_rows = named_args["rows_bucket"] == 0
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == few_rows]
    return kept or configs


def _weight_grad_configs() -> list:
    return [triton.Config(dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_R=r), num_warps=w, num_stages=s)
            for p, q, r, w, s in WEIGHT_GRAD_TILES]


def _library_is_interpreted() -> bool:
    """True if Triton's own @jit library was defined for the interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(tl.standard.sum, InterpretedFunction)


@contextmanager
def _interpreted_library():
    """Swap the compiled @jit functions of triton.language for interpreted twins while an
    interpreted kernel runs (no-op if triton was imported with TRITON_INTERPRET=1)."""
    if _library_is_interpreted():
        yield
        return
    swapped = []
    for module in (tl, tl.standard, tl.core, tl.math):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                swapped.append((module, name, value))
                setattr(module, name, InterpretedFunction(value.fn))
    try:
        yield
    finally:
        for module, name, value in reversed(swapped):
            setattr(module, name, value)


def _kernel(name: str, interpret: bool):
    """The kernel to launch: raw under the interpreter (fixed tiles), autotuned on CUDA for the two
    GEMM kernels, keyed by (E, N, K) / (E, P, Q) plus the dtypes of the tensor arguments."""
    raw = getattr(kernels(interpret), name)
    if interpret or name not in ("grouped_gemm_kernel", "grouped_weight_grad_kernel"):
        return raw
    if name not in _autotuned:
        if name == "grouped_gemm_kernel":
            _autotuned[name] = triton.autotune(
                _gemm_configs(), key=["E", "N", "K", "rows_bucket"],
                prune_configs_by={"early_config_prune": _prune_gemm_configs})(raw)
        else:
            _autotuned[name] = triton.autotune(_weight_grad_configs(), key=["E", "P", "Q"])(raw)
    return _autotuned[name]


def launch(name: str, interpret: bool, grid, *args, **kwargs) -> None:
    LAUNCHES[name] += 1
    if interpret:
        with _interpreted_library():
            _kernel(name, True)[grid](*args, **kwargs)
    else:
        _kernel(name, False)[grid](*args, **kwargs)


def dot_options(dtype: torch.dtype, interpret: bool) -> dict:
    """tl.dot settings: fp32 promises fp32 accuracy (1e-5), so no TF32 unless the user asks torch
    for it; under the interpreter bf16 operands go through fp32 (its bf16 tl.dot is wrong)."""
    if interpret and dtype == torch.bfloat16:
        return dict(DOT_PRECISION="ieee", DOT_FP32=True)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return dict(DOT_PRECISION="ieee", DOT_FP32=False)
    return dict(DOT_PRECISION="tf32", DOT_FP32=False)


def rows_bucket(rows: int) -> int:
    """Autotune key: decode-sized (0), mid (1) and prefill-sized (2) row counts tune apart."""
    return 0 if rows <= 64 else 1 if rows <= 4096 else 2


def device_guard(t: Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()
