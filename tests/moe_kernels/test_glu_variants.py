"""GLU variants (moe_kernels.reference.GluSpec) on every backend that runs them, against the reference.

cpu runs the compiled extension; triton runs under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16: the
interpreter's bf16 tl.dot is wrong); cuda must refuse every variant. The specs are the families of
transformers that need them (cumo_layers/transformers.py maps each family to one).
"""

from __future__ import annotations

import pytest
import torch

from moe_kernels import cpu, cuda, ops, reference
from moe_kernels.reference import GluSpec
from tests.helpers import (
    ODD_SHAPES,
    Shape,
    assert_matches_reference,
    output_and_grads,
    random_problem,
    require_compiled_kernels,
)

# (activation, spec): limits and caps small enough that the random pre-activations (about N(0, 1))
# fall on both sides of every clamp and deep into the tanh's curve.
VARIANTS = {
    "gpt_oss": ("quick_gelu", GluSpec("clamped", interleaved=True, limit=0.6, up_offset=1.0)),
    "clamped_swiglu": ("silu", GluSpec("clamped", limit=0.5)),  # deepseek-v4, hy-v4, glm5-next
    "clamped_after": ("silu", GluSpec("clamped_after", limit=0.2, up_offset=0.25)),  # step3p7 (offset 0 there)
    "softcapped": ("silu", GluSpec("softcapped", gate_cap=0.8, up_cap=1.5)),  # inkling2
    "plain_interleaved": ("gelu", GluSpec(interleaved=True)),
}
SHAPES = [
    (ODD_SHAPES[0][0], ODD_SHAPES[0][1]),  # 0 tokens
    (ODD_SHAPES[1][0], ODD_SHAPES[1][1]),  # 1 token
    (Shape(7, 24, 12, 20, 4, 2), "odd sizes, T < any block"),
    (Shape(130, 40, 24, 56, 6, 3), "T crosses a 128-row tile; cpu: experts past the small-row path"),
]


def backend_fn(name: str, monkeypatch):
    """The backend's expert_mlp, or a skip saying why it cannot run here."""
    if name == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        import moe_kernels.triton as triton_backend

        return triton_backend.expert_mlp
    reason = cpu.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"CPU backend unavailable: {reason}")
    return cpu.expert_mlp


def test_reference_spells_the_families_formulas():
    """The reference's variants written out as transformers' _apply_gate methods do (fp64)."""
    hidden = 3 * torch.randn(5, 16, dtype=torch.float64)
    limit = 1.5
    gate, up = hidden[:, ::2].clamp(max=limit), hidden[:, 1::2].clamp(-limit, limit)
    gpt_oss = (up + 1) * (gate * torch.sigmoid(gate * 1.702))
    spec = GluSpec("clamped", interleaved=True, limit=limit, up_offset=1.0)
    assert torch.equal(reference.apply_activation(hidden, "quick_gelu", spec), gpt_oss)
    gate, up = hidden.chunk(2, dim=-1)
    step3p7 = torch.nn.functional.silu(gate).clamp(max=limit) * up.clamp(-limit, limit)
    spec = GluSpec("clamped_after", limit=limit)
    assert torch.equal(reference.apply_activation(hidden, "silu", spec), step3p7)
    inkling = torch.tanh(gate / 4.0) * 4.0 * torch.sigmoid(gate) * (torch.tanh(up / 25.0) * 25.0)
    spec = GluSpec("softcapped", gate_cap=4.0, up_cap=25.0)
    assert torch.equal(reference.apply_activation(hidden, "silu", spec), inkling)
    assert torch.equal(reference.apply_activation(hidden, "silu", True),
                       reference.apply_activation(hidden, "silu", GluSpec()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[why for _, why in SHAPES])
def test_variant_matches_reference(backend, variant, shape, monkeypatch):
    """Forward and every gradient, fp32, biases on, some experts without tokens."""
    activation, spec = VARIANTS[variant]
    problem = random_problem(shape, glu=True, routing="skip_experts")
    assert_matches_reference(backend_fn(backend, monkeypatch), problem, activation, spec)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_softcapped_with_wide_caps_near_zero(backend, scale, monkeypatch):
    """Caps of 30 and 50 keep tanh's arguments (x / cap) near 0, where 2 * sigmoid(2x) - 1 loses the digits that
    tanh(x) ~ x keeps (3.7e-4 relative error at scale 0.01 before the Triton kernels' tanh was mended): fp32,
    forward and every gradient against the reference."""
    problem = list(random_problem(Shape(16, 32, 16, 24, 4, 2), glu=True))
    problem[0] = scale * problem[0]
    assert_matches_reference(backend_fn(backend, monkeypatch), problem, "silu",
                             GluSpec("softcapped", gate_cap=30.0, up_cap=50.0))


@pytest.mark.parametrize("backend,dtype,tokens", [
    ("cpu", torch.bfloat16, 4),  # a few rows per expert: the small-row kernel where the CPU has AVX-512
    ("cpu", torch.bfloat16, 20),  # the GEMM path
    ("cpu", torch.float16, 20),
    ("triton", torch.float16, 20),
])
@pytest.mark.parametrize("variant", ["gpt_oss", "clamped_after", "softcapped"])
def test_variant_low_precision(backend, dtype, tokens, variant, monkeypatch):
    """The low-precision rule against fp64 (the shared harness), 3 experts."""
    activation, spec = VARIANTS[variant]
    problem = random_problem(Shape(tokens, 24, 12, 20, 3, 2), dtype=dtype, glu=True)
    assert_matches_reference(backend_fn(backend, monkeypatch), problem, activation, spec)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("tokens", [3, 40])  # cpu: the small-row path, then the GEMM path
def test_variant_strided_operands(backend, tokens, monkeypatch):
    """gpt-oss's layout: w1 and w2 transposed views of [E, D, 2H] / [E, H, O] storage (read in place),
    strided x and b1."""
    activation, spec = VARIANTS["gpt_oss"]
    shape = Shape(tokens, 24, 12, 20, 4, 2)
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, glu=True)
    x = torch.randn(tokens, 2 * shape.d_in)[:, ::2]
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    b1 = b1.t().contiguous().t()
    assert not (x.is_contiguous() or w1.is_contiguous() or b1.is_contiguous())
    assert_matches_reference(backend_fn(backend, monkeypatch), (x, weights, idx, w1, b1, w2, b2), activation, spec)


def boundary_problem(spec: GluSpec, tokens: int = 12):
    """A problem whose gate and up pre-activations sit exactly on the clamp limits: one-hot token rows
    pick w1 columns that hold -limit, +limit and values on either side (exact in any GEMM)."""
    shape = Shape(tokens, 8, 6, 10, 3, 2)
    x, weights, idx, w1, _, w2, b2 = random_problem(shape, glu=True)
    x = torch.nn.functional.one_hot(torch.arange(tokens) % shape.d_in, shape.d_in).float()
    choices = torch.tensor([-spec.limit, spec.limit, 0.5 * spec.limit, -2.0 * spec.limit, 2.0 * spec.limit])
    w1 = choices[torch.randint(0, len(choices), w1.shape)]
    return x, weights, idx, w1, None, w2, b2


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", ["clamped", "clamped_after"])
@pytest.mark.parametrize("tokens", [4, 30])  # cpu: the small-row path, then the GEMM path
def test_gradients_at_the_clamp_limits(backend, kind, tokens, monkeypatch):
    """At x == limit torch.clamp's backward gives zero (it passes the gradient for lo < x < hi only): so
    must every backend, entry for entry. relu: act(gate) == limit exactly when gate == limit (clamped_after)."""
    spec = GluSpec(kind, interleaved=True, limit=0.75, up_offset=1.0)
    problem = boundary_problem(spec, tokens)
    fn = backend_fn(backend, monkeypatch)
    grad_out = torch.randn(tokens, 10)
    _, grads = output_and_grads(fn, problem, "relu", spec, grad_out)
    _, grads_ref = output_and_grads(reference.expert_mlp, problem, "relu", spec, grad_out)
    grad_w1, grad_w1_ref = grads[2], grads_ref[2]
    assert torch.equal(grad_w1 == 0, grad_w1_ref == 0)
    assert_matches_reference(fn, problem, "relu", spec, grad_out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_backend_refuses_variants(variant):
    activation, spec = VARIANTS[variant]
    problem = random_problem(Shape(3, 8, 4, 8, 2, 1), glu=True)
    with pytest.raises(NotImplementedError, match=rf"backend 'cuda'.*{spec.kind}.*backend='triton'"):
        cuda.expert_mlp(*problem, activation, spec)


BAD_SPECS = [
    (GluSpec("swiglu"), ValueError, "unknown GLU kind 'swiglu'"),
    (GluSpec("clamped"), ValueError, "glu.limit must be a finite float > 0"),
    (GluSpec("clamped", limit=-1.0), ValueError, "glu.limit must be a finite float > 0"),
    (GluSpec("clamped", limit=7.0, up_offset=float("nan")), ValueError, "glu.up_offset must be a finite float"),
    (GluSpec("softcapped", gate_cap=4.0), ValueError, "glu.up_cap must be a finite float > 0"),
    (GluSpec(limit=7.0), ValueError, "glu.limit has no meaning for kind 'plain'"),
    (GluSpec(interleaved=1), TypeError, "glu.interleaved must be a bool"),
    (GluSpec("clamped", limit="7"), TypeError, "glu.limit must be a float"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("spec,error,message", BAD_SPECS + [
    (GluSpec("softcapped", gate_cap=4.0, up_cap=25.0), ValueError, "activation must be 'silu'"),
])
def test_bad_spec_raises_the_same_error_on_every_backend(backend, spec, error, message, monkeypatch):
    if backend != "torch":
        backend_fn(backend, monkeypatch)
    problem = random_problem(Shape(3, 8, 4, 8, 2, 1), glu=True)
    with pytest.raises(error, match=message):
        ops.expert_mlp(*problem, activation="gelu", glu=spec, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_compiled_triton_on_gpu(variant, dtype, monkeypatch):
    """The compiled kernels (not the interpreter) on a GPU, bf16 included, against the reference:
    tiles wide enough for the tensor-core paths, some experts without tokens, biases on."""
    require_compiled_kernels(monkeypatch)
    import moe_kernels.triton as triton_backend

    activation, spec = VARIANTS[variant]
    problem = random_problem(Shape(300, 256, 192, 128, 8, 2), dtype=dtype, device="cuda", glu=True,
                             routing="skip_experts")
    assert_matches_reference(triton_backend.expert_mlp, problem, activation, spec)
