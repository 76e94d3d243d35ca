"""Tests of cumo_layers/upcycle.py: co-upcycled models compute the dense model's function."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cumo_layers import SparseMoEMLP, aux_loss, upcycle, upcycle_model
from cumo_layers.upcycle import UpcycleError, activation_name
from moe_kernels import ops
from moe_kernels.reference import ACTIVATIONS
from tests import helpers

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.layers import Mlp  # noqa: E402
from timm.layers import activations as timm_act  # noqa: E402
from transformers import activations as hf_act  # noqa: E402

BACKENDS = ["torch", "cpu"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    helpers.assert_close(actual.detach(), expected.detach(), dtype, what)


def backend_or_skip(backend: str) -> str:
    reason = ops.unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    return backend


def tiny_clip():
    config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=24, patch_size=8, hidden_act="quick_gelu",
    )
    return transformers.CLIPVisionModel(config)


def tiny_vit(**kw):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.5, num_classes=5, **kw
    )


def tiny_llama_config(**kw):
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, **kw,
    )


def connector():
    # LLaVA/CuMo connector: in != out, so a transposed copy cannot pass.
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 36))


def count_moe(model: nn.Module) -> int:
    return sum(isinstance(m, SparseMoEMLP) for m in model.modules())


def randomise_biases(model: nn.Module) -> nn.Module:
    """Default inits zero some biases; non-zero ones catch a dropped or misplaced bias."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------- activations

ACTIVATION_CASES = [
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.SiLU(), "silu"),
    (nn.ReLU(), "relu"),
    (nn.ReLU(inplace=True), "relu"),
    (F.gelu, "gelu"),
    (F.silu, "silu"),
    (F.relu, "relu"),
    (torch.relu, "relu"),
    (functools.partial(F.gelu, approximate="tanh"), "gelu_tanh"),
    (hf_act.GELUActivation(), "gelu"),
    (hf_act.GELUActivation(use_gelu_python=True), "gelu"),
    (hf_act.QuickGELUActivation(), "quick_gelu"),
    (hf_act.NewGELUActivation(), "gelu_tanh"),
    (hf_act.GELUTanh(), "gelu_tanh"),
    (hf_act.PytorchGELUTanh(), "gelu_tanh"),
    (hf_act.FastGELUActivation(), "gelu_tanh"),
    (hf_act.AccurateGELUActivation(), "gelu_tanh"),
    (hf_act.SiLUActivation(), "silu"),
    (hf_act.ACT2FN["gelu"], "gelu"),
    (hf_act.ACT2FN["quick_gelu"], "quick_gelu"),
    (hf_act.ACT2FN["gelu_pytorch_tanh"], "gelu_tanh"),
    (hf_act.ACT2FN["gelu_new"], "gelu_tanh"),
    (hf_act.ACT2FN["silu"], "silu"),
    (hf_act.ACT2FN["swish"], "silu"),
    (hf_act.ACT2FN["relu"], "relu"),
    (hf_act.ACT2FN["relu2"], "relu2"),
    (timm_act.GELU(), "gelu"),
    (timm_act.GELUTanh(), "gelu_tanh"),
    (timm_act.QuickGELU(), "quick_gelu"),
    (timm_act.Swish(), "silu"),
    (timm_act.gelu, "gelu"),
    (timm_act.quick_gelu, "quick_gelu"),
]


@pytest.mark.parametrize("act, name", ACTIVATION_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_activation_name_matches_the_function(act, name):
    assert activation_name(act) == name
    # The mapped name must compute what the dense activation computes.
    x = 3 * torch.randn(257, dtype=torch.float64)
    assert_close(ACTIVATIONS[name](x), act(x.clone()), torch.float32, f"{act!r} -> {name}")


class GELUSubclass(nn.GELU):
    """Same name as nn.GELU's base behaviour but possibly another forward: never trusted by type."""


class GatedMLP(nn.Module):
    """Llama-style MLP with a function (not a module) as its activation."""

    def __init__(self, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize(
    "act",
    [nn.Tanh(), nn.LeakyReLU(), hf_act.ACT2FN["gelu_10"], torch.tanh,
     functools.partial(F.gelu, approximate="bogus"), functools.partial(F.leaky_relu, negative_slope=0.2)],
    ids=["tanh", "leaky_relu", "clipped_gelu", "torch.tanh", "gelu_bad_partial", "partial_leaky"],
)
def test_unknown_activation_raises_naming_it_and_the_supported_set(act):
    with pytest.raises(UpcycleError, match="unsupported activation") as info:
        activation_name(act)
    for name in ACTIVATIONS:
        assert repr(name) in str(info.value)
    if isinstance(act, nn.Module):
        model, kind = nn.Sequential(nn.Linear(8, 12), act, nn.Linear(12, 8)), "Sequential"
    else:
        model, kind = GatedMLP(act), "GatedMLP"
    with pytest.raises(UpcycleError, match=f"cannot upcycle {kind}: unsupported activation"):
        upcycle(model)


def test_gated_mlp_with_a_function_activation_is_exact():
    dense = GatedMLP(F.silu)
    moe = upcycle(dense, backend="torch")
    x = torch.randn(6, 8)
    assert moe.glu and moe.activation == "silu"
    assert_close(moe(x), dense(x), torch.float32)


# ---------------------------------------------------------------- exactness: upcycle()


def dense_mlps():
    clip_mlp = tiny_clip().encoder.layers[0].mlp
    return {
        "clip_mlp": clip_mlp,  # fc1/activation_fn/fc2, quick_gelu
        "timm_mlp": Mlp(24, 40, 20, act_layer=nn.GELU),  # fc1/act/fc2, out != in
        "timm_mlp_mixed_bias": Mlp(24, 40, bias=(True, False)),  # fc1 bias, fc2 none -> zero b2
        "connector": connector(),  # Sequential(Linear, GELU, Linear), in != out
        "connector_no_bias": nn.Sequential(nn.Linear(24, 40, bias=False), nn.SiLU(), nn.Linear(40, 24, bias=False)),
        "llama_mlp": transformers.models.llama.modeling_llama.LlamaMLP(tiny_llama_config()),  # GLU silu, no bias
        "llama_mlp_bias": transformers.models.llama.modeling_llama.LlamaMLP(tiny_llama_config(mlp_bias=True)),
    }


DENSE_NAMES = ["clip_mlp", "timm_mlp", "timm_mlp_mixed_bias", "connector", "connector_no_bias", "llama_mlp",
               "llama_mlp_bias"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", DENSE_NAMES)
@pytest.mark.parametrize("mode, jitter", [("eval", 0.0), ("train", 0.0), ("train", 0.2)])
def test_upcycle_is_exact(kind, mode, jitter, backend):
    dense = randomise_biases(dense_mlps()[kind])
    dense.train(mode == "train")
    moe = upcycle(dense, num_experts=4, top_k=2, router_jitter=jitter, backend=backend_or_skip(backend))
    assert moe.training == (mode == "train")
    x = torch.randn(3, 17, moe.in_features)
    expected = dense(x)
    actual = moe(x)
    assert_close(actual, expected, torch.float32, f"{kind} {mode}")
    # Both experts of a token were used: routing spread over several experts (not a trivial route).
    assert int((moe.last_expert_load > 0).sum()) >= 2
    # Non-trivial: a perturbed expert changes the output, so the MoE path really ran.
    with torch.no_grad():
        moe.w2[int(moe.last_expert_load.argmax())] += 1.0
    assert (moe(x) - expected).abs().max() > 1e-2


def test_upcycle_layouts():
    mlps = dense_mlps()
    glu = upcycle(mlps["llama_mlp"])
    llama = mlps["llama_mlp"]
    assert glu.glu and glu.activation == "silu" and glu.b1 is None and glu.hidden_features == 40
    for e in range(glu.num_experts):
        assert torch.equal(glu.w1[e, :40], llama.gate_proj.weight)
        assert torch.equal(glu.w1[e, 40:], llama.up_proj.weight)
        assert torch.equal(glu.w2[e], llama.down_proj.weight)
    mixed = upcycle(mlps["timm_mlp_mixed_bias"])
    assert mixed.b1 is not None and torch.equal(mixed.b2, torch.zeros_like(mixed.b2))
    assert upcycle(mlps["clip_mlp"]).activation == "quick_gelu"
    assert upcycle(mlps["connector_no_bias"], num_experts=3, top_k=3).b2 is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_upcycle_keeps_dtype(dtype):
    dense = randomise_biases(connector()).to(dtype)
    moe = upcycle(dense, backend="torch")
    assert all(p.dtype == dtype for p in moe.parameters())
    x = torch.randn(9, 24, dtype=dtype)
    expected, actual = dense(x), moe(x)
    if dtype == torch.float64:
        assert_close(actual, expected, torch.float64)
    else:  # combine rounds the fp32 sum of two bf16 rows back to bf16: within one bf16 ulp
        assert_close(actual.float(), expected.float(), torch.bfloat16)


def test_parameters_share_nothing_with_the_dense_module():
    dense = randomise_biases(connector())
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    moe = upcycle(dense, backend="torch")
    dense_ptrs = {p.untyped_storage().data_ptr() for p in dense.parameters()}
    assert not dense_ptrs & {p.untyped_storage().data_ptr() for p in moe.parameters()}
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(1.0)
    for n, p in dense.named_parameters():
        assert torch.equal(p, before[n]), n


def test_gradients_reach_every_expert_and_the_router():
    dense = randomise_biases(dense_mlps()["clip_mlp"]).train()
    moe = upcycle(dense, num_experts=4, top_k=2, backend="torch")
    x = torch.randn(64, moe.in_features)
    out = moe(x)
    assert bool((moe.last_expert_load > 0).all()), "every expert needs tokens for this test"
    # With identical experts and renormalised weights the task loss has no gradient w.r.t. the
    # router (sum_k w_k = 1); the router learns from the aux losses first, as in CuMo.
    loss = out.square().mean() + aux_loss(moe)
    loss.backward()
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(moe, name).grad
        for e in range(moe.num_experts):
            assert grad[e].abs().max() > 0, f"{name}[{e}] got no gradient"
    assert moe.router.weight.grad.abs().max() > 0
    before = [p.detach().clone() for p in moe.parameters()]
    torch.optim.SGD(moe.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, b) for a, b in zip(before, moe.parameters()))


def test_router_init_is_pytorch_linear_default():
    moe = upcycle(connector(), num_experts=8)
    bound = 1.0 / 24**0.5
    weight = moe.router.weight
    assert weight.shape == (8, 24) and weight.abs().max() <= bound
    assert weight.std() > bound / 4  # random, not zero


def test_upcycle_refuses_what_it_cannot_copy():
    class Residual(nn.Module):  # right names, different forward
        def __init__(self):
            super().__init__()
            self.fc1, self.activation_fn, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.activation_fn(self.fc1(x)))

    class Extra(Residual):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

    cases = [
        (nn.Linear(8, 8), "structure is none of the supported ones"),
        (nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU()), "4 non-Dropout layers"),
        (Mlp(8, 16, norm_layer=nn.LayerNorm), "norm is LayerNorm"),
        (Mlp(8, 16, use_conv=True), "Conv2d, expected nn.Linear"),
        (timm.layers.GluMlp(8, 16), "forward is not fc2"),
        (Residual(), "forward differs"),
        (Extra(), r"submodules \['norm'\]"),
    ]
    for module, message in cases:
        with pytest.raises(UpcycleError, match=message) as info:
            upcycle(module)
        assert "Supported dense MLPs" in str(info.value) or "forward differs" in message


def test_upcycle_rejects_derived_arguments_and_warns_when_inexact():
    with pytest.raises(TypeError, match="activation"):
        upcycle(connector(), activation="relu")
    with pytest.warns(UserWarning, match="normalize_top_k=False"):
        moe = upcycle(connector(), normalize_top_k=False, backend="torch").eval()
    dense = connector()
    with pytest.warns(UserWarning, match="capacity_factor"):
        upcycle(dense, capacity_factor=1.0)
    x = torch.randn(5, 24)
    assert moe.router.normalize_top_k is False and moe(x).shape == (5, 36)


def test_dropout_is_dropped_with_one_warning():
    with pytest.warns(UserWarning, match=r"dropout is not carried.*drop1 \(p=0.1\), drop2 \(p=0.1\)") as record:
        upcycle(Mlp(8, 16, drop=0.1))
    assert len([w for w in record if "dropout" in str(w.message)]) == 1
    vit = tiny_vit(proj_drop_rate=0.1)
    with pytest.warns(UserWarning, match="blocks.0.mlp.drop1") as record:
        upcycle_model(vit)
    assert len([w for w in record if "dropout" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upcycle(Mlp(8, 16))  # p=0 dropout: no warning


# ---------------------------------------------------------------- exactness: upcycle_model()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_upcycle_model_clip_vision_is_exact(mode, backend):
    model = randomise_biases(tiny_clip()).train(mode == "train")
    pixels = torch.randn(2, 3, 24, 24)
    expected = model(pixel_values=pixels)
    assert upcycle_model(model, 4, 2, backend=backend_or_skip(backend)) is model
    assert count_moe(model) == 2
    assert not any(type(m).__name__ == "CLIPMLP" for m in model.modules())
    actual = model(pixel_values=pixels)
    assert_close(actual.last_hidden_state, expected.last_hidden_state, torch.float32, "last_hidden_state")
    assert_close(actual.pooler_output, expected.pooler_output, torch.float32, "pooler_output")
    if mode == "train":
        assert aux_loss(model) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_upcycle_model_timm_vit_is_exact(mode, backend):
    model = randomise_biases(tiny_vit()).train(mode == "train")
    images = torch.randn(2, 3, 24, 24)
    expected = model(images)
    upcycle_model(model, 4, 2, backend=backend_or_skip(backend))
    assert count_moe(model) == 2 and not any(isinstance(m, Mlp) for m in model.modules())
    assert_close(model(images), expected, torch.float32, "timm ViT logits")


def test_upcycle_model_on_a_connector_returns_the_moe():
    dense = randomise_biases(connector()).eval()
    x = torch.randn(7, 24)
    moe = upcycle_model(dense, 4, 2, backend="torch")
    assert isinstance(moe, SparseMoEMLP)
    assert_close(moe(x), dense(x), torch.float32)


def test_upcycle_model_llama_from_pretrained_is_exact(tmp_path):
    config = tiny_llama_config()
    config.tie_word_embeddings = False
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 11))
    expected = model(input_ids=tokens).logits
    upcycle_model(model, num_experts=4, top_k=2, match="mlp", backend="torch")
    layers = model.model.layers
    assert all(isinstance(layer.mlp, SparseMoEMLP) and layer.mlp.glu for layer in layers)
    actual = model(input_ids=tokens).logits
    assert expected.abs().max() > 0
    assert_close(actual, expected, torch.float32, "llama logits")


def test_match_regex_and_callable_select_exactly():
    model = tiny_clip()
    upcycle_model(model, match=r"layers\.0\.mlp$")
    layers = model.encoder.layers
    assert isinstance(layers[0].mlp, SparseMoEMLP) and not isinstance(layers[1].mlp, SparseMoEMLP)

    seen = []

    def pick(name, module):
        seen.append((name, module))
        return name.endswith("1.mlp")

    model = tiny_clip()
    upcycle_model(model, match=pick)
    layers = model.encoder.layers
    assert isinstance(layers[1].mlp, SparseMoEMLP) and not isinstance(layers[0].mlp, SparseMoEMLP)
    names = [name for name, _ in seen]
    assert "encoder.layers.1.mlp" in names
    assert "encoder.layers.1.mlp.fc1" not in names  # no descent into a replaced module
    assert all(isinstance(module, nn.Module) for _, module in seen)


def test_match_selecting_an_unsupported_module_raises():
    with pytest.raises(UpcycleError, match=r"encoder.layers.0.self_attn.*CLIPAttention"):
        upcycle_model(tiny_clip(), match=r"layers\.0\.(mlp|self_attn)$")
    with pytest.raises(UpcycleError, match="selected no module"):
        upcycle_model(tiny_clip(), match="no_such_module")
    with pytest.raises(TypeError, match="match must be"):
        upcycle_model(tiny_clip(), match=3)


def test_model_without_supported_mlp_raises_with_near_misses():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    with pytest.raises(UpcycleError, match=r"no supported dense MLP.*near misses.*1: .*unsupported activation"):
        upcycle_model(model)


def test_shared_mlp_becomes_one_shared_moe():
    shared = connector()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = shared, shared

        def forward(self, x):
            return self.b(self.a(x)[..., :24])

    model = Twice().eval()
    x = torch.randn(4, 24)
    expected = model(x)
    upcycle_model(model, backend="torch")
    assert isinstance(model.a, SparseMoEMLP) and model.a is model.b
    assert_close(model(x), expected, torch.float32)


def test_upcycled_model_trains():
    model = tiny_clip().train()
    upcycle_model(model, 4, 2, backend="torch")
    pixels = torch.randn(4, 3, 24, 24)
    target = torch.randn(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(model(pixel_values=pixels).pooler_output, target)
        (loss + aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_meta_module_with_a_custom_forward_is_refused():
    """On the meta device there is no data, but the structural probe still runs (on a CPU twin): a
    module shaped like an MLP whose forward adds a residual is refused there as on CPU."""

    class ResidualMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.activation_fn, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.activation_fn(self.fc1(x)))

    with torch.device("meta"):
        residual = ResidualMLP()
        plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    with pytest.raises(UpcycleError, match="forward differs"):
        upcycle(residual, num_experts=4, top_k=2)
    moe = upcycle(plain, num_experts=4, top_k=2)
    assert moe.w1.device.type == "meta" and moe.w1.shape == (4, 16, 8)
