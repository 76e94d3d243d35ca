"""cumo-upcycle: co-upcycle a local Hugging Face checkpoint into a sparse MoE checkpoint.

    cumo-upcycle --model SRC --out DST --experts 4 --top-k 2 [--match REGEX] [--dtype bf16] [--force]
    python -m cumo_layers.cli ...   (the same)

Llama, Mistral and Qwen2 causal LMs become native transformers MoE checkpoints (Mixtral, Qwen2-MoE:
their config and weight names), which ``AutoModelForCausalLM.from_pretrained(DST)`` loads. CLIP vision
models and LLaVA projectors are written in this package's format (``cumo_layers.load_upcycled(DST)``).
Every expert is a copy of the dense MLP and the top-k weights sum to 1, so the output is unchanged: a
probe batch checks it (the max difference is printed) before anything is written. DST is written
atomically (a temporary directory, then a rename); SRC is only read, and only from safetensors (a
pickle-only ``.bin`` checkpoint is refused, never unpickled).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from cumo_layers.checkpoint import CheckpointError, atomic_directory
from cumo_layers.dense_mlp import PROBE_RTOL, PROBE_RTOL_LOW_PRECISION, UpcycleError, read_dense_mlp
from cumo_layers.router import TopKRouter
from cumo_layers.serialization import save_upcycled
from cumo_layers.upcycle import upcycle

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PROBE_SEED = 0
PROBE_TOKENS = 16


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


@dataclass(frozen=True)
class Family:
    """How one source model_type is upcycled."""

    model_type: str
    target: str  # "mixtral" / "qwen2_moe" (native transformers MoE) or "cumo" (this package's format)
    default_match: str | None  # package format: regex of the module names to upcycle
    description: str


FAMILIES = {
    f.model_type: f for f in (
        Family("llama", "mixtral", None, "Llama causal LM -> Mixtral"),
        Family("mistral", "mixtral", None, "Mistral causal LM -> Mixtral"),
        Family("qwen2", "qwen2_moe", None, "Qwen2 causal LM -> Qwen2-MoE"),
        Family("clip_vision_model", "cumo", r"encoder\.layers\.\d+\.mlp$", "CLIP vision model -> cumo format"),
        Family("llava", "cumo", r"multi_modal_projector$", "LLaVA projector -> cumo format"),
    )
}


def supported_list() -> str:
    return ", ".join(f"{f.model_type} ({f.description})" for f in FAMILIES.values())


def check_source(source: Path) -> dict:
    """The source's config.json; CliError for a missing path, a non-checkpoint, pickle-only weights or an
    unsupported architecture."""
    if not source.exists():
        raise CliError(f"--model {source}: no such file or directory")
    if not source.is_dir():
        raise CliError(f"--model {source}: not a directory; expected a Hugging Face checkpoint directory")
    config_path = source / "config.json"
    if not config_path.is_file():
        raise CliError(f"--model {source} is not a Hugging Face checkpoint: config.json is missing")
    if not any(source.glob("*.safetensors")):
        pickled = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CliError(f"--model {source} holds only pickle weights ({', '.join(pickled)}); they are never "
                           "unpickled here: convert the checkpoint to safetensors first")
        raise CliError(f"--model {source} is not a Hugging Face checkpoint: no *.safetensors weights")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"--model {source}: config.json is not valid JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in FAMILIES:
        raise CliError(f"unsupported architecture {model_type!r} ({', '.join(config.get('architectures') or [])}); "
                       f"supported: {supported_list()}")
    return config


def check_destination(source: Path, destination: Path, force: bool) -> None:
    src, dst = source.resolve(), destination.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise CliError(f"--out {destination} overlaps --model {source}; the source is never modified")
    if dst.exists() and not force:
        raise CliError(f"--out {destination} exists; pass --force to replace it")


def progress(items: list, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="layer", file=sys.stderr)


def check_probe(expected: Tensor, actual: Tensor, dtype: torch.dtype) -> None:
    """Print the probe's max difference; CliError if the upcycled model does not compute the dense one."""
    diff = float((actual.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max()) or 1.0
    rtol = PROBE_RTOL.get(dtype, PROBE_RTOL_LOW_PRECISION)
    print(f"probe: max |upcycled - dense| = {diff:.3g} (relative {diff / scale:.3g}, allowed {rtol:g})")
    if not diff / scale <= rtol:
        raise CliError(f"the upcycled model's output differs from the dense model's by {diff / scale:.3g} "
                       "(relative) on the probe; nothing was written")


# ---- Llama / Mistral / Qwen2 -> Mixtral / Qwen2-MoE (native transformers checkpoints)

def moe_config(dense_config, family: Family, experts: int, top_k: int, dense_layers: list[int]):
    """The Mixtral or Qwen2-MoE config of the upcycled model: the dense config's attention, norms and
    rope, and one MoE per MLP whose experts have the dense MLP's size (top-k weights renormalised)."""
    import transformers

    c = dense_config
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise CliError(f"{c.model_type} with attention_bias/mlp_bias has no {family.target} equivalent")
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attention_dropout, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, num_experts_per_tok=top_k, dtype=c.dtype,
    )
    if family.target == "mixtral":
        if dense_layers:
            raise CliError(f"Mixtral has no dense layers: --match must select every layer's mlp (left dense: "
                           f"{dense_layers[:8]})")
        return transformers.MixtralConfig(num_local_experts=experts, head_dim=getattr(c, "head_dim", None),
                                          sliding_window=getattr(c, "sliding_window", None), **common)
    # Qwen2-MoE: a zero-width shared expert adds exactly 0; unselected layers stay dense (mlp_only_layers).
    return transformers.Qwen2MoeConfig(
        num_experts=experts, moe_intermediate_size=c.intermediate_size, shared_expert_intermediate_size=0,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense_layers, qkv_bias=True,
        use_sliding_window=c.use_sliding_window, sliding_window=c.sliding_window,
        max_window_layers=c.max_window_layers, layer_types=c.layer_types, **common,
    )


def upcycle_causal_lm(source: Path, family: Family, args, dtype) -> tuple[nn.Module, Callable[[Path], None]]:
    import transformers

    dense = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True).eval()
    layers = dense.model.layers
    names = [f"model.layers.{i}.mlp" for i in range(len(layers))]
    selected = [i for i, name in enumerate(names) if args.match is None or re.search(args.match, name)]
    if not selected:
        raise CliError(f"--match {args.match!r} selects none of {names[0]} .. {names[-1]}")
    config = moe_config(dense.config, family, args.experts, args.top_k,
                        [i for i in range(len(layers)) if i not in selected])
    with torch.device("meta"):
        moe = transformers.AutoModelForCausalLM.from_config(config)
    state = dense.state_dict()
    new_state = {key: state[key] for key in moe.state_dict() if key in state}
    for i in progress(selected, "upcycling layers"):
        try:
            mlp = read_dense_mlp(layers[i].mlp)
        except UpcycleError as exc:
            raise CliError(f"{names[i]}: {exc}") from None
        if not mlp.glu or mlp.b1 is not None or mlp.b2 is not None:
            raise CliError(f"{names[i]}: a {mlp.layout} MLP with biases has no {family.target} expert layout")
        prefix = f"{names[i]}."
        router = TopKRouter(config.hidden_size, args.experts, args.top_k, device=mlp.w1.device, dtype=mlp.w1.dtype)
        new_state[prefix + "gate.weight"] = router.weight.detach()
        new_state[prefix + "experts.gate_up_proj"] = mlp.w1.detach().expand(args.experts, *mlp.w1.shape).clone()
        new_state[prefix + "experts.down_proj"] = mlp.w2.detach().expand(args.experts, *mlp.w2.shape).clone()
        if family.target == "qwen2_moe":
            for key in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                        "shared_expert.down_proj.weight", "shared_expert_gate.weight"):
                new_state[prefix + key] = torch.zeros(moe.get_parameter(prefix + key).shape, dtype=mlp.w1.dtype)
    missing = sorted(set(moe.state_dict()) - set(new_state))
    if missing:
        raise CliError(f"no source tensor for {missing[:5]} in {family.target}; unsupported {family.model_type} variant")
    moe.load_state_dict(new_state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in any state dict: the dense model's are the same.
    dense_buffers = dict(dense.named_buffers())
    for name, buffer in list(moe.named_buffers()):
        if buffer.is_meta:
            if name not in dense_buffers:
                raise CliError(f"{family.target} buffer {name} has no counterpart in the {family.model_type} model")
            owner, _, child = name.rpartition(".")
            moe.get_submodule(owner)._buffers[child] = dense_buffers[name].clone()
    moe.eval()
    probe = torch.randint(0, config.vocab_size, (2, PROBE_TOKENS), generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad():
        check_probe(dense(input_ids=probe).logits, moe(input_ids=probe).logits, moe.dtype)

    def write(destination: Path) -> None:
        with atomic_directory(destination, overwrite=args.force) as staging:
            moe.save_pretrained(staging)

    return moe, write


# ---- CLIP vision / LLaVA projector -> this package's format

def as_sequential(module: nn.Module) -> nn.Module:
    """A LLaVA projector (linear_1, act, linear_2) as the Sequential(Linear, act, Linear) it computes;
    the upcycle's own probe checks that it does."""
    if {"linear_1", "act", "linear_2"} <= set(module._modules):
        return nn.Sequential(module.linear_1, module.act, module.linear_2)
    return module


def upcycle_in_place(source: Path, family: Family, args, dtype) -> tuple[nn.Module, Callable[[Path], None]]:
    import transformers

    config = transformers.AutoConfig.from_pretrained(source)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise CliError(f"--model {source}: transformers has no architecture {architecture!r}")
    model = model_class.from_pretrained(source, dtype=dtype, use_safetensors=True).eval()
    pattern = re.compile(args.match or family.default_match)
    names = [name for name, _ in model.named_modules() if name and pattern.search(name)]
    names = [n for n in names if not any(n.startswith(other + ".") for other in names)]  # outermost only
    if not names:
        raise CliError(f"--match {pattern.pattern!r} selects no module of {architecture}")
    probe = make_probe(model, family, names)
    with torch.no_grad():
        expected = probe(model)
    for name in progress(names, "upcycling layers"):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        try:
            moe = upcycle(as_sequential(getattr(parent, child)), args.experts, args.top_k)
        except UpcycleError as exc:
            raise CliError(f"{name}: {str(exc).splitlines()[0]}") from None
        setattr(parent, child, moe.eval())
    with torch.no_grad():
        check_probe(expected, probe(model), dtype_of(model))

    def write(destination: Path) -> None:  # --force replaces --out whole, as for the transformers models
        with atomic_directory(destination, overwrite=args.force) as staging:
            save_upcycled(model, staging)  # the manifest's base: the model's class and config (transformers_base)

    return model, write


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def make_probe(model: nn.Module, family: Family, names: list[str]) -> Callable[[nn.Module], Tensor]:
    """A fixed input and how to read the output it is compared on."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    dtype = dtype_of(model)
    if family.model_type == "clip_vision_model":
        size = model.config.image_size
        pixels = torch.randn(2, 3, size, size, generator=generator).to(dtype)
        return lambda m: m(pixel_values=pixels).last_hidden_state
    # Anything else: the selected modules themselves, each on random inputs of its width.
    inputs = {}
    for name in names:
        first = next(p for p in model.get_submodule(name).parameters() if p.dim() >= 2)
        width = first.shape[-1]
        inputs[name] = torch.randn(2, PROBE_TOKENS, width, generator=generator).to(dtype)
    return lambda m: torch.cat([m.get_submodule(n)(x).flatten() for n, x in inputs.items()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cumo-upcycle", description="Co-upcycle a local Hugging Face checkpoint into a sparse MoE checkpoint.",
        epilog=f"Supported: {supported_list()}.",
    )
    parser.add_argument("--model", required=True, type=Path, help="source checkpoint directory (safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="destination directory")
    parser.add_argument("--experts", type=int, default=4, help="experts per MoE (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--match", default=None, help="regex (re.search) on module names to upcycle")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"need 1 <= --top-k <= --experts, got --top-k {args.top_k} --experts {args.experts}")
    if args.match is not None:
        try:
            re.compile(args.match)
        except re.error as exc:
            parser.error(f"--match {args.match!r} is not a regex: {exc}")
    return args


def run(args: argparse.Namespace) -> None:
    config = check_source(args.model)
    check_destination(args.model, args.out, args.force)
    family = FAMILIES[config["model_type"]]
    dtype = DTYPES[args.dtype] if args.dtype else "auto"
    upcycle_model_fn = upcycle_in_place if family.target == "cumo" else upcycle_causal_lm
    model, write = upcycle_model_fn(args.model, family, args, dtype)
    write(args.out)
    kind = "transformers " + family.target if family.target != "cumo" else "cumo (load with cumo_layers.load_upcycled)"
    print(f"wrote {args.out} ({kind}): {args.experts} experts, top-{args.top_k}, {dtype_of(model)}")


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    args = parse_args(argv)
    try:
        run(args)
    except (CliError, CheckpointError, UpcycleError, FileExistsError, OSError, SafetensorError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, SafetensorError):  # transformers reading --model's weights
            message = f"--model {args.model}: a weights file is truncated or corrupt ({message})"
        print(f"cumo-upcycle: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
