"""``python -m benchmarks.kernel_resources``: what the GPU compiler makes of our Triton kernels, without a GPU.

The layer runs on CPU tensors with a GPU's launch settings (tiles, dot precision: as ``check_device`` would
pick them for CUDA tensors), every launch is recorded instead of run, and each distinct specialization is
compiled for a GPU target exactly as Triton's JIT would specialize it (its own binder: integers equal to 1
become constants, pointers and integers divisible by 16 carry that fact), through Triton's bundled ptxas.
The report lists, per grouped-GEMM and weight-gradient specialization at the benchmark shapes, its tiles,
registers per thread, spills and whether the tensor-core code is Hopper's wgmma or the older mma.sync.
``--check ARCH`` compiles every specialization the layer launches instead (what
``tests/moe_kernels/test_triton_compiles.py`` runs).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from moe_kernels.triton import experts, gating, losses, moe, routing, runtime

HOPPER = GPUTarget("cuda", 90, 32)


def specialize(kernel, args: list, constexprs: dict, target: GPUTarget) -> tuple:
    """(ASTSource, options) that Triton's JIT would compile for these arguments on ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **constexprs)
    packed = kernel._pack_args(backend, constexprs, bound_args, specialization, options)
    options, signature, constants, attrs = packed
    return ASTSource(kernel, signature, constants, attrs), options.__dict__


class Recording(runtime.BoundKernels):
    """Records one launch (kernel, arguments, constexprs) per specialization; runs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: dict[tuple, tuple] = {}

    def launch(self, spec: runtime.Launch, tensors: tuple) -> None:
        args = [*tensors, *spec.scalars]
        key = (spec.name, *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                            (a == 1, a % 16 == 0) if isinstance(a, int) else type(a) for a in args],
               *map(str, spec.constexprs.items()))
        self.launches.setdefault(key, (getattr(runtime.kernels(False), spec.name), args, spec.constexprs))


@contextmanager
def recording_gpu_launches() -> Iterator[Recording]:
    """The Triton backend on CPU tensors with the settings of CUDA tensors, its launches recorded."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the backend takes CPU tensors; nothing is interpreted below
    modules = (experts, gating, losses, moe, routing)  # every launcher module that decides how to launch
    saved = [(module, module.check_device) for module in modules] + [(runtime, runtime.BOUND_KERNELS)]
    recording = Recording()
    try:
        for module in modules:
            module.check_device = lambda *tensors: False  # compiled-mode tiles and dot options
        runtime.BOUND_KERNELS = recording
        yield recording
    finally:
        for module, value in saved:
            setattr(module, "BOUND_KERNELS" if module is runtime else "check_device", value)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def resources(kernel, args: list, constexprs: dict, target: GPUTarget = HOPPER) -> dict:
    """Registers per thread, spilled bytes and the MMA instruction family of one compiled specialization."""
    from triton.backends.nvidia.compiler import get_ptxas

    source, options = specialize(kernel, args, constexprs, target)
    compiled = triton.compile(source, target=target, options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as handle:
        handle.write(ptx)
        handle.flush()
        report = subprocess.run([get_ptxas(target.arch).path, "-v", f"--gpu-name=sm_{target.arch}a", handle.name,
                                 "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills),
            "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"}


# Every kernel the layer launches, and the configurations that reach every epilogue and dtype they
# specialize on: (dtype, activation, glu, bias), each at one routing block and at several.
ALL_KERNELS = {"route_one_block_kernel", "route_blocks_kernel", "topk_gating_kernel", "topk_gating_backward_kernel",
               "router_losses_kernel", "router_losses_reduce_kernel", "router_losses_backward_kernel",
               "routing_one_block_kernel", "routing_histogram_kernel", "routing_scan_kernel", "routing_scatter_kernel",
               "grouped_gemm_kernel", "combine_kernel", "fc2_combine_kernel", "topk_weight_grad_kernel",
               "grouped_weight_grad_kernel", "capacity_kernel"}


def check_configurations() -> list[tuple]:
    from moe_kernels.reference import GluSpec

    return [(torch.bfloat16, "silu", True, False), (torch.float16, "gelu", False, True),
            (torch.float32, "quick_gelu", GluSpec("clamped", interleaved=True, limit=7.0, up_offset=1.0), True)]


def compile_check(target: GPUTarget) -> list[str]:
    """Compile every specialization the layer launches (training step and inference, the configurations
    above, fp16 with capacity drops, 1 and 300 tokens, the latter with and without a scan kernel) for ``target``;
    the failures, one line each (empty: all compiled). Run it in a process of its own: after Triton's interpreter
    has run kernels, its compiler fails in that process."""
    from cumo_layers import SparseMoEMLP

    with recording_gpu_launches() as recording:
        for dtype, activation, glu, bias in check_configurations():
            # One routing block; several (the scatter scans their counts); as many as need a scan kernel.
            tile = routing.SCAN_IN_SCATTER_TILE
            for tokens, scan_tile in ((1, tile), (300, tile), (300, 0)):
                with routing.scan_in_scatter_tile(scan_tile):
                    layer = SparseMoEMLP(64, 32, num_experts=8, top_k=2, activation=activation, glu=glu, bias=bias,
                                         capacity_factor=1.25 if dtype == torch.float16 else None,
                                         backend="triton", dtype=dtype).train()
                    x = torch.randn(tokens, 64, dtype=dtype, requires_grad=True)
                    out = layer(x)
                    torch.autograd.grad(out.float().sum() + layer.last_aux_loss, [x, *layer.parameters()])
                    with torch.no_grad():
                        layer.eval()(x)
    launched = {key[0] for key in recording.launches}
    failures = [f"never launched: {name}" for name in sorted(ALL_KERNELS - launched)]
    for kernel, args, constexprs in recording.launches.values():
        try:
            source, options = specialize(kernel, args, constexprs, target)
            triton.compile(source, target=target, options=options)
        except Exception as exc:  # collected: every failing specialization is reported at once
            failures.append(f"{kernel.__name__} {constexprs}: {type(exc).__name__}: {exc}")
    print(f"compiled {len(recording.launches)} specializations of {len(launched)} kernels for "
          f"sm_{target.arch}: {len(failures)} failures")
    return failures


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import REGIMES
    from cumo_layers import SparseMoEMLP

    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=int, metavar="ARCH",
                        help="instead: compile every specialization the layer launches for sm_ARCH; exit 1 on failure")
    args = parser.parse_args(argv)
    if args.check:
        failures = compile_check(GPUTarget("cuda", args.check, 32))
        print("\n".join(failures))
        return 1 if failures else 0
    for regime in REGIMES:
        with recording_gpu_launches() as recording:
            layer = SparseMoEMLP(regime.d_model, regime.hidden, regime.d_out, num_experts=regime.experts,
                                 top_k=regime.top_k, activation=regime.activation, glu=regime.glu, bias=False,
                                 backend="triton", dtype=torch.bfloat16).train()
            x = torch.randn(regime.tokens, regime.d_model, dtype=torch.bfloat16, requires_grad=True)
            torch.autograd.grad(layer(x).float().sum(), [x, layer.w1, layer.w2])
        print(f"\n{regime.name} (T={regime.tokens} D={regime.d_model} H={regime.hidden} E={regime.experts} "
              f"k={regime.top_k}), bf16, sm_90")
        for kernel, args, constexprs in recording.launches.values():
            if kernel.__name__ not in ("grouped_gemm_kernel", "grouped_weight_grad_kernel"):
                continue
            tiles = {k: v for k, v in constexprs.items()
                     if k in ("EPILOGUE", "GATHER_A", "GATHER_B", "num_warps", "num_stages")
                     or (k.startswith("BLOCK_") and k != "BLOCK_E")}
            print(f"  {kernel.__name__:27s} {tiles} {resources(kernel, args, constexprs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
