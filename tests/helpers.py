"""Shared test helpers: tolerance table, random MoE problems, the low-precision error rule."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

# Relative tolerances per dtype (STYLE.md). Used for same-precision comparisons; low precision is
# checked with `assert_lowp_close` (flash-attention's rule) instead of a hand-tuned number.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def cpu_backends() -> list[str]:
    """The backends that run on CPU tensors here: torch, cpu when its extension is built, and triton when Triton
    imports (asked with TRITON_INTERPRET=1 set, as the tests that use this list set it while they run: the
    variable is read at call time, and a test collected without it would silently drop triton). Triton is
    imported first, without the variable: imported under it, its library would stay interpreted in this process
    and the GPU tests of compiled kernels would skip."""
    from moe_kernels import ops

    ops.preload("triton")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [name for name in ("torch", "cpu", "triton") if ops.unavailable_reason(name, "cpu") is None]
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


class Shape(NamedTuple):
    tokens: int
    d_in: int
    hidden: int
    d_out: int
    experts: int
    top_k: int


# Each case says which edge it covers. Small enough for the Triton interpreter.
ODD_SHAPES = [
    (Shape(0, 16, 8, 16, 4, 2), "0 tokens: empty plan, nothing launched"),
    (Shape(1, 16, 8, 16, 4, 2), "1 token: most experts get nothing"),
    (Shape(7, 24, 12, 20, 4, 2), "odd sizes, d_out != d_in, T < any block"),
    (Shape(33, 32, 16, 32, 8, 8), "top_k == num_experts: every expert sees every token"),
    (Shape(64, 32, 48, 40, 16, 1), "top-1, more experts than a warp of rows"),
    (Shape(130, 40, 24, 56, 6, 3), "T crosses a 128-row tile boundary"),
]
ROUTINGS = ["random", "one_expert", "skip_experts"]


def routing_indices(tokens: int, experts: int, top_k: int, routing: str, device="cpu") -> Tensor:
    """[T, K] int64 distinct expert ids per token.

    random: uniform; one_expert: every token's first choice is expert 0 (all tokens on one
    expert); skip_experts: only the first ceil(E/2) >= K experts are used (others get no token).
    """
    if routing == "skip_experts":
        used = max(top_k, (experts + 1) // 2)
        idx = torch.rand(tokens, used, device=device).argsort(dim=-1)[:, :top_k]
    else:
        idx = torch.rand(tokens, experts, device=device).argsort(dim=-1)[:, :top_k]
    if routing == "one_expert" and tokens > 0:
        # Move expert 0 into slot 0: swap it with the first choice where it is already chosen.
        has_zero = (idx == 0).any(dim=-1)
        where_zero = (idx == 0).int().argmax(dim=-1)
        rows = torch.arange(tokens, device=device)[has_zero]
        idx[rows, where_zero[has_zero]] = idx[rows, 0]
        idx[:, 0] = 0
    return idx.to(torch.int64)


def random_problem(shape: Shape, dtype=torch.float32, device="cpu", glu=False, bias=True, routing="random"):
    """Fresh random inputs for expert_mlp: (x, top_k_weights, top_k_idx, w1, b1, w2, b2).

    Experts are all different and weights are non-uniform, so a wrong index changes the answer.
    """
    t, d, h, o, e, k = shape
    h1 = 2 * h if glu else h
    x = torch.randn(t, d, device=device, dtype=dtype)
    idx = routing_indices(t, e, k, routing, device)
    weights = torch.softmax(torch.randn(t, k, device=device), dim=-1)
    w1 = (torch.randn(e, h1, d, device=device) / d**0.5).to(dtype)
    w2 = (torch.randn(e, o, h, device=device) / h**0.5).to(dtype)
    b1 = (0.1 * torch.randn(e, h1, device=device)).to(dtype) if bias else None
    b2 = (0.1 * torch.randn(e, o, device=device)).to(dtype) if bias else None
    return x, weights, idx, w1, b1, w2, b2


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Max abs error relative to the max magnitude of the expected tensor."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.detach().double().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Same-dtype comparison with the table's relative tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:.0e} ({dtype})"


def assert_lowp_close(actual: Tensor, reference_lowp: Tensor, reference_exact: Tensor, what: str = "",
                      floor: float = 1e-3) -> None:
    """Flash-attention's rule: the backend's error against an exact (fp64) reference is at most
    2x the error of the plain PyTorch reference run in the same low precision (plus a floor).
    On a handful of elements the reference's max error is a small-sample statistic that can be
    near 0 by chance; callers with such tensors pass the dtype's unit roundoff as the floor."""
    err = rel_err(actual, reference_exact)
    budget = 2 * rel_err(reference_lowp, reference_exact) + floor
    assert err <= budget, f"{what}: error {err:.3g} > 2x reference's low-precision error ({budget:.3g})"


def naive_expert_mlp(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation="gelu", glu=False):
    """Per-token, per-slot Python loop: the reference's reference. x: [T, D] -> [T, O] (fp64 math)."""
    from moe_kernels.reference import apply_activation

    num_experts = w1.shape[0]
    x, w1, b1, w2, b2 = (None if t is None else t.detach() for t in (x, w1, b1, w2, b2))
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(top_k_idx.shape[1]):
            e = int(top_k_idx[t, k])
            if not 0 <= e < num_experts:
                continue
            hidden = w1[e].double() @ x[t].double()
            if b1 is not None:
                hidden = hidden + b1[e].double()
            hidden = apply_activation(hidden, activation, glu)
            y = w2[e].double() @ hidden
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += float(top_k_weights[t, k].detach()) * y
    return out


def assert_compiled_matches_eager(layer, x: Tensor, compiler: str = "aot_eager", after_compiled_backward=None) -> None:
    """torch.compile(layer, fullgraph=True) against eager on the same x: the forward and the gradients of
    x and of every parameter agree (the tolerance of x's dtype). ``after_compiled_backward()`` runs right after the
    compiled forward and backward, before anything eager runs (e.g. to count kernel launches)."""
    compiled = torch.compile(layer, backend=compiler, fullgraph=True)
    x = x.detach().clone().requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    y = compiled(x)
    grad = torch.randn_like(y)
    layer.zero_grad()
    (y * grad).sum().backward()
    if after_compiled_backward is not None:
        after_compiled_backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    y_eager = layer(x_eager)
    assert_close(y.detach(), y_eager.detach(), x.dtype, "compiled forward")
    (y_eager * grad).sum().backward()
    assert_close(x.grad, x_eager.grad, x.dtype, "compiled dx")
    for name, p in layer.named_parameters():
        assert_close(grads[name], p.grad, x.dtype, f"compiled d{name}")


# ----------------------------------------------------------------------------------------------
# The one parity harness: every backend's tests (cpu, triton, cuda) and benchmarks.gpu compare through it.

GRAD_NAMES = ("x", "top_k_weights", "w1", "b1", "w2", "b2")  # differentiable inputs, in argument order


def output_and_grads(fn, problem, activation: str, glu: bool, grad_out: Tensor | None, dtype=None):
    """fn(*problem)'s output and the gradient of every differentiable input (None where absent), on fresh
    leaves (cast to ``dtype`` when given, e.g. float64 for the exact reference)."""
    x, weights, idx, w1, b1, w2, b2 = [
        None if t is None else (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else
                                t.detach()).clone().requires_grad_(t.is_floating_point())
        for t in problem]
    y = fn(x, weights, idx, w1, b1, w2, b2, activation, glu)
    if grad_out is None:
        return y.detach(), None
    leaves = [x, weights, w1, b1, w2, b2]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_out.to(y.dtype), allow_unused=True))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def assert_matches_reference(fn, problem, activation: str = "gelu", glu: bool = False, grad_out: Tensor | None = None,
                             backward: bool = True) -> None:
    """Forward and every gradient of ``fn`` against ``reference.expert_mlp`` on the same inputs:
    the dtype's tolerance for fp32/fp64, the low-precision rule (against fp64) for fp16/bf16."""
    from moe_kernels import reference

    dtype = problem[0].dtype
    if backward and grad_out is None:
        grad_out = torch.randn(problem[0].shape[0], problem[5].shape[1], device=problem[0].device)
    y, grads = output_and_grads(fn, problem, activation, glu, grad_out if backward else None)
    y_ref, grads_ref = output_and_grads(reference.expert_mlp, problem, activation, glu, grad_out if backward else None)
    assert y.dtype == dtype, f"output dtype {y.dtype} != {dtype}"
    pairs = [("output", y, y_ref)] + ([] if not backward else
                                      [(f"grad {n}", g, r) for n, g, r in zip(GRAD_NAMES, grads, grads_ref)])
    if dtype in LOW_PRECISION or backward:
        y_exact, grads_exact = output_and_grads(reference.expert_mlp, problem, activation, glu,
                                                grad_out.double() if backward else None, dtype=torch.float64)
        exact = [y_exact] + (grads_exact if backward else [])
    for i, (what, got, want) in enumerate(pairs):
        if want is None:
            assert got is None or not got.abs().any(), f"{what}: expected no gradient"
            continue
        assert got is not None, f"{what}: missing"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
        if dtype in LOW_PRECISION:
            # floor: one unit roundoff (on one token the reference's own error can be ~0 by chance)
            assert_lowp_close(got, want, exact[i], what, floor=max(1e-3, torch.finfo(dtype).eps / 2))
        elif what == "grad top_k_weights":
            # Each entry is a dot product <grad_out[t], expert_out[t, k]> whose terms can cancel: its
            # rounding error scales with the terms, not with the result, so a tolerance relative to the
            # result does not bound it. The low-precision rule against fp64 does (floor: the table's).
            assert_lowp_close(got, want, exact[i], what, floor=RTOL[dtype])
        else:
            # The top-k weights' gradient is float32 whatever the expert dtype.
            assert_close(got, want, dtype if got.dtype == dtype else torch.float32, what)


def require_compiled_kernels(monkeypatch) -> None:
    """Skip unless Triton kernels compile for CUDA tensors here (not under the interpreter), and make
    sure TRITON_INTERPRET does not send them to it."""
    import pytest

    pytest.importorskip("triton")
    from moe_kernels.triton import runtime

    if runtime._library_is_interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1: CUDA tensors would run interpreted")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
