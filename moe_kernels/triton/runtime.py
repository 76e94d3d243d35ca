"""How the Triton backend launches: availability, compiled vs interpreted kernels, tile tables, and
the host-side helpers every launcher shares (grid arithmetic, the eager fast-path test).

Under the interpreter (CPU tensors with TRITON_INTERPRET=1), two Triton facts are worked around:
whether a @triton.jit function is interpreted is fixed when it is *defined*, for Triton's own
library (tl.sum, tl.cumsum, ...) when ``triton`` is first imported. So the kernel files
(``*_kernels.py``) are loaded once per mode, and an interpreted launch swaps Triton's compiled library
functions for interpreted twins for its duration. The mode therefore does not depend on when
TRITON_INTERPRET was set relative to the first ``import triton`` (timm, for one, imports triton).
CUDA tensors run compiled kernels with tiles from tiles.py's tables; under the interpreter tiles
are fixed and small.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
import os
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Number of launches per kernel name since the last reset: tests read it so that a silent
# fallback to PyTorch cannot pass.
LAUNCHES: Counter = Counter()

# The @triton.jit kernels: the router's (gating.py, routing.py), the losses' (losses.py), the experts' (experts.py).
_KERNEL_FILES = ("router_kernels.py", "loss_kernels.py", "expert_kernels.py")
_kernel_namespaces: dict[bool, SimpleNamespace] = {}


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
    if device.type == "cuda":  # the hot path: a CUDA tensor exists, so CUDA is available
        return _library_is_interpreted()
    reason = unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend 'triton' cannot run on {device.type}: {reason}")
    # CUDA tensors run compiled, unless triton itself was imported for the interpreter.
    return device.type == "cpu" or _library_is_interpreted()


def kernels(interpret: bool) -> SimpleNamespace:
    """The public names of the _KERNEL_FILES (kernels and constexpr codes), with their @triton.jit
    functions defined in the requested mode (each file loaded once per mode, as its own module)."""
    if interpret not in _kernel_namespaces:
        merged = {}
        for file_name in _KERNEL_FILES:
            stem = file_name.removesuffix(".py")
            name = f"moe_kernels.triton._{stem}_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file_name))
            module = importlib.util.module_from_spec(spec)
            with knobs.runtime.scope():
                knobs.runtime.interpret = interpret
                spec.loader.exec_module(module)
            merged.update({key: value for key, value in vars(module).items()
                           if not key.startswith("_") and not isinstance(value, ModuleType)})
        _kernel_namespaces[interpret] = SimpleNamespace(**merged)
    return _kernel_namespaces[interpret]


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


class Launch:
    """One kernel launch with everything but its tensors fixed: the kernel's name, the grid, the scalar
    runtime arguments (after the tensors in every kernel's signature: sizes and strides) and the
    constexpr and launch-option keywords. A launcher builds it once per shape in a ``shape_cache``d
    function, so a repeated call computes no tile, grid or stride again, and ``BoundKernels`` keys
    on the object itself (hashed by identity: a binding holds it, so its id is not reused while bound)."""

    __slots__ = ("name", "grid", "scalars", "constexprs")

    def __init__(self, name: str, grid: tuple[int, ...], scalars: tuple, constexprs: dict) -> None:
        self.name, self.grid, self.scalars, self.constexprs = name, (*grid, 1, 1)[:3], scalars, constexprs

    def __repr__(self) -> str:
        return f"Launch({self.name}, grid={self.grid}, scalars={self.scalars}, {self.constexprs})"


_SHAPE_CACHES: list = []
SHAPE_CACHE_SIZE = 4096  # Launches kept per launcher, least recently used dropped first


def shape_cache(fn):
    """``functools.lru_cache`` for the functions that build a ``Launch`` from sizes, strides, dtypes and
    flags; ``clear_shape_caches`` empties them all (when the tile tables change)."""
    cached = functools.lru_cache(maxsize=SHAPE_CACHE_SIZE)(fn)
    _SHAPE_CACHES.append(cached)
    return cached


def clear_shape_caches() -> None:
    for cached in _SHAPE_CACHES:
        cached.cache_clear()


def launch(spec: Launch, interpret: bool, *tensors: Tensor) -> None:
    """Launch ``spec`` on its tensors (every tensor argument of the kernel, in signature order).

    Compiled launches go through ``BOUND_KERNELS`` (below): Triton's own launch path once per
    specialization, the compiled kernel directly after that."""
    LAUNCHES[spec.name] += 1
    if interpret:
        with _interpreted_library():
            getattr(kernels(True), spec.name)[spec.grid](*tensors, *spec.scalars, **spec.constexprs)
        return
    BOUND_KERNELS.launch(spec, tensors)


_DTYPE = operator.attrgetter("dtype")


class BoundKernels:
    """Compiled kernels bound once per specialization, launched without Triton's per-call binding.

    Triton's ``kernel[grid](...)`` re-derives, on every call, the specialization of every argument, a
    cache key holding ``str(options)``, the current device and stream, launch metadata and hook
    state: 20-50 us of Python per launch on a GPU host, as much as the kernels of a decode step.
    Here the first launch of a specialization goes through Triton (compiling if needed) and keeps the
    ``CompiledKernel`` it returns; later launches with the same key call its launcher directly with
    the tensors, the scalars and the constexprs in signature order, which is what Triton's
    ``JITFunction.run`` passes it (Triton 3.6 through 3.8). While a launch hook is installed (a
    profiler such as proton), every launch goes through Triton so that the hook sees it.

    The key is finer than what Triton specializes on, so a bound binary is never run on arguments it
    was not compiled for: the ``Launch`` (which fixes every scalar's value, every keyword and the grid;
    Triton specializes integers on width, divisibility by 16 and equality to 1), the device, and each
    tensor's dtype and 16-byte alignment. Scalars come from shapes and strides, so each new token count
    binds once more; at most ``MAX_BOUND`` keys are kept, the oldest dropped first. ``CUMO_TRITON_BIND=0``
    in the environment (or ``enabled = False``) sends every launch through Triton, to compare or to debug.

    The bound launcher gets the tensors' addresses as ints, which the key read already: given a tensor,
    Triton's launcher calls its ``data_ptr()`` and then ``cuPointerGetAttribute`` (a driver call), per
    pointer and launch; an int it takes as it is.
    """

    MAX_BOUND = 4096

    def __init__(self, driver=None) -> None:
        self._bound: dict[tuple, tuple] = {}
        self._driver = driver
        # Triton's launch hooks (profilers add to these chains; Triton 3.6 through 3.8 keep one of each).
        self._enter_hook, self._exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        self.enabled = os.environ.get("CUMO_TRITON_BIND", "1").strip().lower() not in ("0", "false", "no", "off")

    def __len__(self) -> int:
        return len(self._bound)

    def clear(self) -> None:
        self._bound.clear()

    @property
    def driver(self):
        if self._driver is None:
            from triton.runtime.driver import driver

            self._driver = driver.active
        return self._driver

    def launch(self, spec: Launch, tensors: tuple[Tensor, ...]) -> None:
        driver = self._driver or self.driver
        if not self.enabled:
            self.launch_through_triton(spec, tensors)
            return
        device = driver.get_current_device()
        pointers = list(map(Tensor.data_ptr, tensors))
        aligned = True if not functools.reduce(operator.or_, pointers) & 15 else tuple(not p & 15 for p in pointers)
        key = (spec, device, aligned, *map(_DTYPE, tensors))
        bound = self._bound.get(key)
        if bound is None or self._enter_hook.calls or self._exit_hook.calls:
            compiled = self.launch_through_triton(spec, tensors)
            if bound is None:
                if len(self._bound) >= self.MAX_BOUND:
                    del self._bound[next(iter(self._bound))]
                self._bound[key] = self._bind(spec, compiled, len(tensors))
            return
        run, function, metadata, tail = bound
        run(*spec.grid, driver.get_current_stream(device), function, metadata, None, None, None, *pointers, *tail)

    @staticmethod
    def launch_through_triton(spec: Launch, tensors: tuple[Tensor, ...]):
        """Triton's own launch (compiling on a cache miss); returns the CompiledKernel it ran."""
        return getattr(kernels(False), spec.name)[spec.grid](*tensors, *spec.scalars, **spec.constexprs)

    @staticmethod
    def _bind(spec: Launch, compiled, num_tensors: int) -> tuple:
        """(launcher, CUfunction, packed metadata, the scalars then the constexprs in signature order)."""
        params = getattr(kernels(False), spec.name).params[num_tensors + len(spec.scalars):]
        if not all(p.is_constexpr for p in params):
            raise TypeError(f"{spec.name}: pass every runtime argument positionally (tensors, then scalars); "
                            f"{[p.name for p in params if not p.is_constexpr]} were not")
        constexprs = tuple(spec.constexprs[p.name] if p.name in spec.constexprs else p.default for p in params)
        return compiled.run, compiled.function, compiled.packed_metadata, (*spec.scalars, *constexprs)


BOUND_KERNELS = BoundKernels()


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every Triton kernel here computes on


def check_dtype(t: Tensor, what: str) -> None:
    """Raise TypeError naming ``what`` unless ``t`` is float32, float16 or bfloat16."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} take {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}")


_get_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or (lambda: torch.backends.cuda.matmul.allow_tf32)


def allow_tf32() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32``, read without its module's ``__getattr__`` (a forward reads it
    for every GEMM launch it builds)."""
    return _get_allow_tf32()


def flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t``'s elements as a contiguous tensor of ``dtype`` for a kernel that indexes them flat: ``t`` itself when
    it is one already (no Python-level reshape, cast or copy call on the hot path)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.reshape(-1).to(dtype).contiguous()


def dot_options(dtype: torch.dtype, interpret: bool, allow_tf32: bool) -> dict:
    """tl.dot settings: fp32 promises fp32 accuracy (1e-5), so no TF32 unless the user asks torch
    for it (``allow_tf32``: torch.backends.cuda.matmul.allow_tf32); under the interpreter bf16 operands
    go through fp32 (its bf16 tl.dot is wrong)."""
    if interpret and dtype == torch.bfloat16:
        return dict(DOT_PRECISION="ieee", DOT_FP32=True)
    if dtype == torch.float32 and not allow_tf32:
        return dict(DOT_PRECISION="ieee", DOT_FP32=False)
    return dict(DOT_PRECISION="tf32", DOT_FP32=False)


def device_guard(t: Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device); nothing to do when it is
    the current one already, or the tensor is on the CPU (the interpreter)."""
    index = t.get_device()
    if index < 0 or index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(index)


ELEMENTWISE_TILE = 4096  # elements per program of the router, combine and weight-gradient kernels


def row_tiles(num_experts: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E) of the kernels that hold whole rows of E logits: all E columns, and as many
    rows as fit ELEMENTWISE_TILE (at most 64)."""
    block_e = next_power_of_2(num_experts)
    return max(1, min(64, ELEMENTWISE_TILE // block_e)), block_e


# Host-side integer helpers: triton.cdiv / next_power_of_2 are @jit-wrapped on some Triton versions,
# ~9 us of Python per call, and a forward computes a dozen grids and tile sizes.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def eager(*tensors: Tensor | None) -> bool:
    """Plain eager execution: not tracing, and every tensor a plain tensor or Parameter. Then the
    public functions skip the custom ops' dispatch (autograd wrapper, redispatch, argument boxing:
    tens of microseconds per call, as much as the kernels of a decode step) and call the launchers,
    with a torch.autograd.Function when a gradient is wanted; moe_kernels/ops.py has checked the
    arguments. Tracing, fake tensors and other subclasses (DTensor, ...) take the custom ops, whose
    fake kernels and dispatch they need."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)
