"""Property-based parity of the compiled CPU backend with the reference (hypothesis draws the cases).

Each example is a fresh problem: any T (0 included), widths that are not multiples of the vector
length, any E and 1 <= K <= E, some slots dropped (ids E or -1), GLU or not, biases or not, every
activation, x non-contiguous or not, fp32 or fp64. Forward and every gradient must match the reference
at the dtype's tolerance. Small T exercises the small-row path (<= 8 rows per expert), larger T the
bins and the ATen GEMMs, skewed routing the expert that runs alone.
"""

import pytest
import torch

from moe_kernels import cpu, reference
from tests.helpers import Shape, assert_close, assert_lowp_close, random_problem

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_REASON = cpu.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"CPU backend unavailable: {_REASON}", allow_module_level=True)

ACTIVATIONS = ["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"]


@st.composite
def problems(draw, min_tokens=0, min_out=1):
    experts = draw(st.integers(1, 9))
    shape = Shape(
        tokens=draw(st.sampled_from([t for t in (0, 1, 2, 3, 5, 8, 13, 40, 150) if t >= min_tokens])),
        d_in=draw(st.integers(1, 40)),
        hidden=draw(st.integers(1, 40)),
        d_out=draw(st.integers(min_out, 40)),
        experts=experts,
        top_k=draw(st.integers(1, experts)),
    )
    return dict(
        shape=shape,
        glu=draw(st.booleans()),
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        routing=draw(st.sampled_from(["random", "one_expert", "skip_experts"])),
        drop=draw(st.floats(0.0, 0.5)),
        strided_x=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_cpu_matches_reference(case):
    torch.manual_seed(case["seed"])
    shape, dtype, glu = case["shape"], case["dtype"], case["glu"]
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, dtype=dtype, glu=glu, bias=case["bias"],
                                               routing=case["routing"])
    w = w.to(dtype)
    dropped = torch.rand(idx.shape) < case["drop"]
    idx = torch.where(dropped, torch.where(torch.rand(idx.shape) < 0.5, shape.experts, -1), idx)
    if case["strided_x"]:  # every other column of a wider tensor
        x = torch.stack([x, torch.randn_like(x)], dim=-1).flatten(-2)[:, ::2]
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, w1, b1, w2, b2)]
    grad_out = torch.randn(shape.tokens, shape.d_out, dtype=dtype)

    def outputs(fn):
        xs, ws, w1s, b1s, w2s, b2s = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
        y = fn(xs, ws, idx, w1s, b1s, w2s, b2s, case["activation"], glu)
        present = [t for t in (xs, ws, w1s, b1s, w2s, b2s) if t is not None]
        grads = torch.autograd.grad(y, present, grad_out, allow_unused=True)
        return y.detach(), grads

    y, grads = outputs(cpu.expert_mlp)
    y_ref, grads_ref = outputs(reference.expert_mlp)
    assert_close(y, y_ref, dtype, "y")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        if g_ref is None:
            assert g is None or not g.abs().any(), i
        else:
            assert g is not None, i
            assert_close(g, g_ref, dtype, f"grad {i}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems(min_tokens=8, min_out=8))
def test_cpu_bf16_forward_within_reference_error(case):
    """bf16 forward (the small-row path's VDPBF16PS kernel included): error against fp64 at most about
    twice the bf16 reference's own (tests/helpers.py: assert_lowp_close), floor one bf16 epsilon.
    The rule compares max errors, a statistic that needs many elements: on outputs of one or a few
    elements the bf16 reference can be exact by chance, and a weighted sum that cancels (three
    experts' 0.08-sized terms summing to 0.005) turns one legitimate rounding difference into tens of
    percent of the result. Hence at least 8 tokens and 8 output features here; the fp32/fp64 property
    above covers every size at tight tolerance."""
    torch.manual_seed(case["seed"])
    shape, glu = case["shape"], case["glu"]
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, dtype=torch.float64, glu=glu, bias=case["bias"],
                                               routing=case["routing"])
    low = [t.bfloat16() if t is not None else None for t in (x, w1, b1, w2, b2)]
    exact = [t.double() if t is not None else None for t in low]  # the same rounded inputs, in fp64
    args = (case["activation"], glu)
    with torch.inference_mode():
        y = cpu.expert_mlp(low[0], w, idx, *low[1:], *args)
        y_lp = reference.expert_mlp(low[0], w, idx, *low[1:], *args)
        y_64 = reference.expert_mlp(exact[0], w.double(), idx, *exact[1:], *args)
    assert y.dtype == torch.bfloat16
    assert_lowp_close(y, y_lp, y_64, "y", floor=torch.finfo(torch.bfloat16).eps)
