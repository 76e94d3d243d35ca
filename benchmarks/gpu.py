"""``python -m benchmarks.gpu``: for GPU users. Validates every backend that runs on the device against
the reference (forward and backward, odd shapes, dropped slots), then times the regimes of
benchmarks.common against the dense-equivalent MLP, HF experts, plain torch._grouped_mm, and
ScatterMoE / MegaBlocks when they are installed. Exit status 1 if any validation fails.

``--device cpu`` runs the same on CPU (the validation of the compiled CPU backend, for instance).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    DENSE_PEER,
    MODES_BY_NAME,
    REGIMES,
    Peer,
    PeerSkipped,
    Problem,
    cumo_backend,
    disagreement,
    interleaved_times,
    make_problem,
    make_step,
    median,
    peak_memory_bytes,
    peers_for,
    rel_err,
)
from moe_kernels import ops
from tests.helpers import ODD_SHAPES, RTOL, assert_matches_reference, random_problem

ROUTINGS = ["random", "one_expert", "skip_experts", "dropped"]
ACTIVATIONS = [("gelu", False), ("silu", True), ("quick_gelu", False)]
ROUNDS = 10
GPU_MODES = ["infer-bf16", "train-bf16"]


def validate(device: torch.device) -> list[str]:
    """Every available backend against the reference; returns the failures (one line each)."""
    failures: list[str] = []
    for backend, reason in ops.available_backends(device).items():
        if backend == "torch":
            continue
        if reason is not None:
            print(f"validate {backend}: skipped ({reason})")
            continue

        def run_backend(*args, backend=backend):
            return ops.expert_mlp(*args, backend=backend)

        cases = 0
        for case, (shape, what) in enumerate(ODD_SHAPES):
            activation, glu = ACTIVATIONS[case % len(ACTIVATIONS)]
            for dtype in (torch.float32, torch.bfloat16):
                for routing in ROUTINGS:
                    torch.manual_seed(case)
                    inputs = list(random_problem(shape, dtype, device, glu=glu, bias=True,
                                                 routing="random" if routing == "dropped" else routing))
                    if routing == "dropped" and shape.tokens:
                        inputs[2] = inputs[2].clone()
                        inputs[2][::2, -1] = shape.experts  # id == E: a dropped slot
                    grad_out = torch.randn(shape.tokens, shape.d_out, device=device)
                    try:  # the tests' parity harness: fp32 tolerance table, bf16 by the low-precision rule
                        assert_matches_reference(run_backend, inputs, activation, glu, grad_out)
                    except AssertionError as exc:
                        failures.append(f"{backend} {dtype} {routing} {tuple(shape)} ({what}): {exc}")
                    cases += 1
        for tokens, experts, top_k in [(0, 8, 2), (37, 8, 2), (64, 64, 8)]:
            logits = torch.randn(tokens, experts, device=device)
            grad = torch.randn(tokens, top_k, device=device)
            results = []
            for name in (backend, "torch"):
                leaf = logits.clone().requires_grad_()
                weights, idx = ops.topk_gating(leaf, top_k, True, backend=name)
                if weights.requires_grad:
                    weights.backward(grad)
                results.append((weights, idx, leaf.grad))
            (weights, idx, dlogits), (ref_weights, ref_idx, ref_dlogits) = results
            what = f"{backend} topk_gating T={tokens} E={experts} k={top_k}"
            if not torch.equal(idx, ref_idx) or rel_err(weights, ref_weights) > RTOL[torch.float32]:
                failures.append(f"{what}: differs from the reference")
            if dlogits is None or rel_err(dlogits, ref_dlogits) > RTOL[torch.float32]:
                failures.append(f"{what}: gradient of the logits " + ("missing" if dlogits is None else "differs"))
        print(f"validate {backend}: {cases} expert_mlp cases (forward + backward), topk_gating (forward + backward); "
              f"{sum(f.startswith(backend + ' ') for f in failures)} failures")
    return failures


def scattermoe_peer(problem: Problem):
    """ScatterMoE's MLP / GLUMLP (github.com/shawntan/scattermoe) with our weights and our routing."""
    try:
        from scattermoe.mlp import GLUMLP, MLP
    except ImportError as exc:
        raise PeerSkipped(f"scattermoe not installed ({exc})")
    from moe_kernels.reference import ACTIVATIONS as ACT

    regime = problem.regime
    if regime.d_out != regime.d_model:
        raise PeerSkipped("ScatterMoE's MLP maps back to d_model: it needs d_out == d_model")
    if regime.glu:
        module = GLUMLP(regime.d_model, regime.hidden, regime.experts, regime.top_k, activation=ACT[regime.activation])
        gate, up = problem.w1.detach().chunk(2, dim=1)
        w1 = torch.cat([up, gate], dim=1)  # ScatterMoE's GLU chunk order is (up, gate): a reordered copy
    else:
        module = MLP(regime.d_model, regime.hidden, regime.experts, regime.top_k, activation=ACT[regime.activation])
        w1 = problem.w1.detach()
    module = module.to(device=problem.x.device, dtype=problem.x.dtype)
    for linear, weight in ((module.experts, w1), (module.output_experts, problem.w2.detach())):
        # ScatterMoE has stored weights as [E, out, in] and, in older versions, [E, in, out].
        linear.weight.data = weight if linear.weight.shape == weight.shape else weight.transpose(1, 2).contiguous()

    def forward(x: Tensor) -> Tensor:
        logits = F.linear(x, problem.router_weight)
        weights, idx = ops.topk_gating(logits, regime.top_k, True, backend="torch")
        return module(x, weights.to(x.dtype), idx)

    return forward


def megablocks_peer(problem: Problem):
    """MegaBlocks' dropless MoE (dMoE, grouped GEMM) with our weights; its router gets our router weight
    and renormalised top-k weights, so the routing is the same."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError as exc:
        raise PeerSkipped(f"megablocks not installed ({exc})")
    from moe_kernels.reference import ACTIVATIONS as ACT

    regime = problem.regime
    if regime.d_out != regime.d_model:
        raise PeerSkipped("MegaBlocks' experts map back to d_model: they need d_out == d_model")
    args = Arguments(hidden_size=regime.d_model, ffn_hidden_size=regime.hidden, moe_num_experts=regime.experts,
                     moe_top_k=regime.top_k, mlp_type="glu" if regime.glu else "mlp", mlp_impl="grouped",
                     activation_fn=ACT[regime.activation], moe_normalize_expert_weights=1.0,
                     bf16=problem.x.dtype == torch.bfloat16, fp16=False, device=problem.x.device)
    module = dMoE(args).to(device=problem.x.device, dtype=problem.x.dtype)
    h, e = regime.hidden, regime.experts
    w1 = problem.w1.detach()
    mlp = module.experts.mlp
    if regime.glu:
        mlp.w1.data = w1[:, :h].reshape(e * h, -1).contiguous()   # gate
        mlp.v1.data = w1[:, h:].reshape(e * h, -1).contiguous()   # up
    else:
        mlp.w1.data = w1.reshape(e * h, -1).contiguous()
    mlp.w2.data = problem.w2.detach().transpose(1, 2).reshape(e * h, -1).contiguous()
    module.router.layer.weight.data = problem.router_weight.detach()
    if module.experts.bias is not None:
        module.experts.bias.data.zero_()

    def forward(x: Tensor) -> Tensor:
        out = module(x.unsqueeze(1))
        return (out[0] if isinstance(out, tuple) else out).squeeze(1)

    return forward


GPU_PEERS = [Peer("scattermoe", scattermoe_peer, "#bcbd22"), Peer("megablocks", megablocks_peer, "#7f7f7f")]


def benchmark(device: torch.device, modes: list[str], rounds: int) -> None:
    peers = [p for p in peers_for(device.type)] + (GPU_PEERS if device.type == "cuda" else [])
    for regime in REGIMES:
        for mode_name in modes:
            mode = MODES_BY_NAME[mode_name]
            if mode.training and not regime.train:
                continue
            problem = make_problem(regime, mode, device)
            reference = make_step(cumo_backend("torch")(problem), problem)()
            reference_grads = {k: None if g is None else g.clone() for k, g in problem.moe_grads().items()}
            steps, notes = {}, {}
            for peer in peers:
                try:
                    step = make_step(peer.build(problem), problem)
                    out = step()
                except PeerSkipped as exc:
                    notes[peer.name] = f"skipped: {exc}"
                    continue
                except Exception as exc:  # reported, never replaced
                    notes[peer.name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    continue
                if peer.name != DENSE_PEER:
                    err, wrong = disagreement(out, problem.moe_grads(), reference, reference_grads)
                    notes[peer.name] = f"wrong: {wrong}" if wrong else f"err {err:.1e}"
                    if wrong:
                        continue
                else:
                    notes[peer.name] = ""
                steps[peer.name] = step
            times = {n: median(t) for n, t in interleaved_times(steps, rounds, device).items()}
            print(f"\n{regime.name} / {mode.name}: T={regime.tokens} D={regime.d_model} H={regime.hidden} "
                  f"E={regime.experts} k={regime.top_k}; median of {rounds}")
            dense = times.get(DENSE_PEER)
            for peer in peers:
                if peer.name in times:
                    problem.clear_grads()
                    peak = peak_memory_bytes(steps[peer.name], device) / 2**20
                    ratio = f"{times[peer.name] / dense:6.2f}x dense" if dense else ""
                    print(f"  {peer.name:18s} {1e3 * times[peer.name]:9.3f} ms {ratio}  peak {peak:8.1f} MiB  "
                          f"{notes[peer.name]}")
                else:
                    print(f"  {peer.name:18s} {notes[peer.name]}")
            del problem, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default=",".join(GPU_MODES))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--validate-only", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device visible (torch.cuda.is_available() is False); nothing to run. "
              "Use --device cpu to validate the CPU backends.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; backends: {ops.available_backends(device)}")
    start = time.perf_counter()
    failures = validate(device)
    for line in failures:
        print(f"FAIL {line}")
    if not args.validate_only:
        benchmark(device, args.modes.split(","), args.rounds)
    print(f"\n{len(failures)} validation failures; {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
