"""Property-based tests of the ops over every backend that runs here (hypothesis draws the cases).

Parity: each example is a fresh problem: any T (0 included), widths that are not multiples of the
vector length (D and H of 0 included), any E and 1 <= K <= E, some slots dropped (ids E or -1), no GLU, the
plain one or a variant, biases or not,
every activation, x non-contiguous or not, fp32 or fp64 (fp32/fp16 for Triton, in its interpreter).
Forward and every gradient must match the reference. For the cpu backend small T exercises the
small-row path (<= 8 rows per expert), larger T the bins and the ATen GEMMs, skewed routing the
expert that runs alone. Contract: a random valid problem with one random rule broken raises the same
error, type and text, on every backend.
"""

import pytest
import torch

from moe_kernels import cpu, ops, reference
from moe_kernels.reference import GluSpec
from tests.helpers import Shape, assert_lowp_close, assert_matches_reference, random_problem

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_REASON = cpu.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"CPU backend unavailable: {_REASON}", allow_module_level=True)

ACTIVATIONS = list(reference.ACTIVATIONS)
# Every GLU kind, with caps and limits that put typical pre-activations on both sides of each clamp and near
# tanh's 0 (wide caps) as well as deep into its curve.
GLU_VARIANTS = [GluSpec("clamped", interleaved=True, limit=0.6, up_offset=1.0), GluSpec("clamped_after", limit=0.3),
                GluSpec("softcapped", gate_cap=30.0, up_cap=50.0), GluSpec("softcapped", gate_cap=0.8, up_cap=1.5)]


@pytest.fixture(scope="module")
def monkeypatch_interpreter():
    """Triton runs CPU tensors through its interpreter (module scope: hypothesis re-runs one test call)."""
    pytest.importorskip("triton")
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    yield
    patch.undo()


@st.composite
def problems(draw, min_tokens=0, min_out=1, max_tokens=150, dtypes=(torch.float32, torch.float64)):
    experts = draw(st.integers(1, 9))
    shape = Shape(
        tokens=draw(st.sampled_from([t for t in (0, 1, 2, 3, 5, 8, 13, 40, 150) if min_tokens <= t <= max_tokens])),
        d_in=draw(st.integers(0, 40)),  # 0: the experts reduce to their biases
        hidden=draw(st.integers(0, 40)),
        d_out=draw(st.integers(min_out, 40)),
        experts=experts,
        top_k=draw(st.integers(1, experts)),
    )
    glu = draw(st.sampled_from([False, True, *GLU_VARIANTS]))
    return dict(
        shape=shape,
        glu=glu,
        bias=draw(st.booleans()),
        # softcapped is a SiLU with capped factors (the contract refuses it with another activation)
        activation="silu" if getattr(glu, "kind", None) == "softcapped" else draw(st.sampled_from(ACTIVATIONS)),
        dtype=draw(st.sampled_from(dtypes)),
        routing=draw(st.sampled_from(["random", "one_expert", "skip_experts"])),
        drop=draw(st.floats(0.0, 0.5)),
        strided_x=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _problem(case):
    torch.manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, dtype=dtype, glu=bool(case["glu"]), bias=case["bias"],
                                               routing=case["routing"])
    dropped = torch.rand(idx.shape) < case["drop"]
    idx = torch.where(dropped, torch.where(torch.rand(idx.shape) < 0.5, shape.experts, -1), idx)
    if case["strided_x"]:  # every other column of a wider tensor
        x = torch.stack([x, torch.randn_like(x)], dim=-1).flatten(-2)[:, ::2]
    return [x, w.to(torch.promote_types(dtype, torch.float32)), idx, w1, b1, w2, b2]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_cpu_matches_reference(case):
    assert_matches_reference(cpu.expert_mlp, _problem(case), case["activation"], case["glu"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems(max_tokens=40, dtypes=(torch.float32, torch.float16)))
def test_triton_matches_reference(case, monkeypatch_interpreter):
    from moe_kernels import triton as triton_backend

    assert_matches_reference(triton_backend.expert_mlp, _problem(case), case["activation"], case["glu"])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.sampled_from([1, 5, 17, 40, 150, 300]), d_in=st.integers(0, 40), experts=st.integers(1, 70),
       top_k=st.integers(1, 8), normalize=st.booleans(), capacity=st.sampled_from([None, None, 0.5, 2.0]),
       strided=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_triton_moe_mlp_routes_as_the_reference(tokens, d_in, experts, top_k, normalize, capacity, strided, dtype,
                                                seed, monkeypatch_interpreter):
    """The whole MoE MLP on Triton (its router kernels: one block; a block of tokens a program, with the scatter
    scanning the counts; F.linear and the gating kernel), inference: the logits are F.linear's up to the GEMM's
    rounding, and on those logits the top-k, the load and the output are the reference's (compared on the
    backend's own logits, so that a near tie rounded the other way cannot fail it)."""
    from moe_kernels.routing import apply_capacity, expert_capacity

    top_k = min(top_k, experts)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d_in, tokens, generator=gen).t() if strided else torch.randn(tokens, d_in, generator=gen)
    router_weight = torch.randn(experts, d_in, generator=gen) * max(d_in, 1) ** -0.5
    w1, b1 = torch.randn(experts, 12, d_in, generator=gen) * 0.3, torch.randn(experts, 12, generator=gen) * 0.1
    w2, b2 = torch.randn(experts, 7, 12, generator=gen) * 0.3, torch.randn(experts, 7, generator=gen) * 0.1
    x, router_weight, w1, b1, w2, b2 = (t.to(dtype) for t in (x, router_weight, w1, b1, w2, b2))
    limit = None if capacity is None else expert_capacity(capacity, tokens, top_k, experts)
    with torch.no_grad():
        got = ops.moe_mlp(x, router_weight, w1, b1, w2, b2, top_k, normalize, "gelu", False, backend="triton",
                          capacity=limit, return_logits=True)
    one_ulp = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-10, atol=2**-10)
    torch.testing.assert_close(got.logits, torch.nn.functional.linear(x, router_weight), **one_ulp)
    weights, ids = reference.topk_gating(got.logits, top_k, normalize)
    assert torch.equal(got.top_k_idx, ids)
    torch.testing.assert_close(got.top_k_weights, weights, rtol=1e-6, atol=1e-7)
    kept = ids if limit is None else apply_capacity(ids, experts, limit)
    assert torch.equal(got.expert_load, reference.expert_load(ids, experts))
    out = reference.expert_mlp(x.double(), weights.double(), kept, *(t.double() for t in (w1, b1, w2, b2)),
                               "gelu", False)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.out.double(), out, rtol=tolerance, atol=tolerance)


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
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, dtype=torch.float64, glu=bool(glu), bias=case["bias"],
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


# Each breaks one rule of moe_kernels/contract.py on a valid problem (x, weights, idx, w1, b1, w2, b2).
MUTATIONS = {
    "float ids": lambda a: a.__setitem__(2, a[2].float()),
    "ids for another T": lambda a: a.__setitem__(2, a[2][1:]),
    "weights of another K": lambda a: a.__setitem__(1, a[1][:, 1:]),
    "x with another D": lambda a: a.__setitem__(0, a[0][:, 1:]),
    "b1 of another width": lambda a: a.__setitem__(4, a[4][:, 1:]),
    "b2 in another dtype": lambda a: a.__setitem__(6, a[6].double()),
    "w2 with other experts": lambda a: a.__setitem__(5, a[5][1:]),
    "a meta bias": lambda a: a.__setitem__(4, a[4].to("meta")),
    "1-D x": lambda a: a.__setitem__(0, a[0][0]),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems(min_tokens=1, dtypes=(torch.float32,)), mutation=st.sampled_from(sorted(MUTATIONS)))
def test_bad_arguments_raise_the_same_error_on_every_backend(case, mutation, monkeypatch_interpreter):
    shape = case["shape"]
    case = {**case, "bias": True, "shape": shape._replace(top_k=max(2, shape.top_k), experts=max(2, shape.experts),
                                                          d_in=max(2, shape.d_in), hidden=max(2, shape.hidden))}
    errors = {}
    for backend in ("torch", "cpu", "triton"):
        args = _problem(case)
        MUTATIONS[mutation](args)
        with pytest.raises((TypeError, ValueError)) as caught:
            ops.expert_mlp(*args, case["activation"], case["glu"], backend=backend)
        errors[backend] = (type(caught.value), str(caught.value))
    assert len(set(errors.values())) == 1, errors
