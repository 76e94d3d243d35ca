"""transformers' own MoE blocks with experts_implementation "cumo" against "eager" and "grouped_mm".

    python -m benchmarks.transformers_experts [--rounds 7] [--tokens 512] [--train]

Each case is one transformers sparse-MoE block (router + experts) in bf16 on CPU, built from a config,
the same module (same weights, same input) timed under each implementation, round-robin. Ratios are
t(implementation) / t("cumo"): above 1.0 "cumo" is faster. Outputs are checked against "eager" first.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Callable, NamedTuple

import torch

from benchmarks.common import interleaved_times, median, read_bandwidth
from benchmarks.report import machine_line
from cumo_layers import register_transformers

IMPLEMENTATIONS = ("cumo", "eager", "grouped_mm")
DTYPE = torch.bfloat16
# bf16 outputs of different implementations differ by rounding; a layout error is O(1).
MAX_REL_DIFF = 5e-2


class Case(NamedTuple):
    name: str
    note: str
    build: Callable[[], torch.nn.Module]


def mixtral_block() -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(config)


def qwen3_moe_block() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8)
    return Qwen3MoeSparseMoeBlock(config)


CASES = [
    Case("mixtral-like", "D=1024, I=3584, E=8, top-2 (Mixtral 8x7B scaled to D=1024)", mixtral_block),
    Case("qwen3-moe-like", "D=1024, I=384, E=64, top-8 (Qwen3-30B-A3B scaled to D=1024)", qwen3_moe_block),
]


def prepared(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    block = case.build()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, param.shape[-1] ** -0.5)
    return block.to(DTYPE)


def set_implementation(block: torch.nn.Module, implementation: str) -> None:
    for module in block.modules():
        if hasattr(module, "config"):
            module.config._experts_implementation = implementation


def step_of(block: torch.nn.Module, implementation: str, x: torch.Tensor, train: bool) -> Callable[[], object]:
    def step() -> object:
        set_implementation(block, implementation)
        if not train:
            with torch.no_grad():
                return block(x)
        block.zero_grad(set_to_none=True)
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        return out

    return step


def output(block, implementation, x):
    set_implementation(block, implementation)
    with torch.no_grad():
        out = block(x)
    return (out[0] if isinstance(out, tuple) else out).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transformers_experts", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
    args = parser.parse_args(argv)
    register_transformers()
    mode = "train (fwd+bwd)" if args.train else "inference"
    print(f"# transformers experts: {mode}, bf16, CPU, {args.tokens} tokens, median of {args.rounds} rounds")
    print(f"# {datetime.date.today()}; {machine_line(read_bandwidth(torch.device('cpu')))}")
    print("| case | " + " | ".join(f"{name} ms" for name in IMPLEMENTATIONS)
          + " | eager / cumo | grouped_mm / cumo |")
    print("|---|" + "---|" * (len(IMPLEMENTATIONS) + 2))
    for case in CASES:
        block = prepared(case)
        x = torch.randn(1, args.tokens, block.experts.down_proj.shape[1], dtype=DTYPE)
        reference = output(block, "eager", x)
        for implementation in IMPLEMENTATIONS[1:] + IMPLEMENTATIONS[:1]:
            diff = float((output(block, implementation, x) - reference).abs().max() / reference.abs().max())
            if diff > MAX_REL_DIFF:
                raise SystemExit(f"{case.name}: {implementation} differs from eager by {diff:.3g} (relative)")
        steps = {name: step_of(block, name, x, args.train) for name in IMPLEMENTATIONS}
        for step in steps.values():  # warm-up
            step()
        times = {name: median(values) for name, values in interleaved_times(steps, args.rounds, x.device).items()}
        ms = " | ".join(f"{times[name] * 1e3:.1f}" for name in IMPLEMENTATIONS)
        print(f"| {case.name} ({case.note}) | {ms} | {times['eager'] / times['cumo']:.2f} | "
              f"{times['grouped_mm'] / times['cumo']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
