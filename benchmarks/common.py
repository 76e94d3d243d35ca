"""What the benchmarks measure: one regimes table, one peers table, the shared weights and the timers.

Every peer runs the whole MoE MLP (router matmul + top-k gating + experts) on the *same* tensors:
expert weights ``w1 [E, H1, D]`` (H1 = 2H with GLU: gate rows then up rows) and ``w2 [E, O, H]``
are the layout of transformers v5 ``MixtralExperts.gate_up_proj`` / ``down_proj``, so the HF
modules are handed these very tensors, not copies. The dense-equivalent MLP (hidden = top_k * H,
same activation and GLU) is built from the first top_k experts and is the reference of every ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels import ops
from moe_kernels.reference import apply_activation, topk_gating

# batched_mm gathers one weight matrix per (token, slot): skip it past this many bytes of gathered weights.
BATCHED_MM_MAX_BYTES = 2 * 2**30
# A peer whose first (warm-up) call takes longer is not timed; the output says so.
MAX_CALL_S = 20.0
# Bytes read by the bandwidth probe (a large .sum(), as in the design's memory floor).
BANDWIDTH_PROBE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Regime:
    """One benchmarked shape. ``memory_bound``: also report the ratio to the weight-read floor."""

    name: str
    tokens: int
    d_model: int
    hidden: int
    d_out: int
    experts: int
    top_k: int
    activation: str
    glu: bool
    train: bool  # whether the training-step modes run for this regime
    memory_bound: bool = False
    note: str = ""


# The regimes of DESIGN.md. Expert MLPs have no biases so that the HF expert modules (which have
# none) compute exactly the same function; a bias add is O(T*K*H), negligible next to the GEMMs.
REGIMES = [
    Regime("cumo-clip", 2304, 1024, 4096, 1024, 4, 2, "quick_gelu", False, True,
           note="CuMo CLIP-MoE, ViT-L/14-336, 4 images"),
    Regime("cumo-connector", 2304, 1024, 4096, 4096, 4, 2, "gelu", False, True,
           note="CuMo MLP-MoE connector, out 4096"),
    Regime("fine-grained", 2048, 1024, 512, 1024, 64, 8, "silu", True, True,
           note="Qwen-MoE-like, scaled, SwiGLU"),
    Regime("small-batch", 16, 1024, 512, 1024, 64, 8, "silu", True, False, memory_bound=True,
           note="fine-grained experts, 16 tokens"),
    Regime("decode", 1, 2048, 1024, 2048, 64, 8, "silu", True, False, memory_bound=True,
           note="one token, SwiGLU"),
]
# GPU runs add issue 16's large batch (too big for a CPU run: 131072 expert rows).
GPU_REGIMES = REGIMES + [
    Regime("large", 16384, 2048, 768, 2048, 128, 8, "silu", True, True, note="T=16384, 128 experts, SwiGLU"),
]
REGIMES_BY_NAME = {regime.name: regime for regime in GPU_REGIMES}


class Mode(NamedTuple):
    name: str
    dtype: torch.dtype
    training: bool  # forward + backward (a training step without the optimizer) instead of inference


MODES = [
    Mode("infer-bf16", torch.bfloat16, False),
    Mode("infer-fp32", torch.float32, False),
    Mode("train-fp32", torch.float32, True),
    Mode("train-bf16", torch.bfloat16, True),
]
MODES_BY_NAME = {mode.name: mode for mode in MODES}


def regime_modes(regime: Regime) -> list[Mode]:
    return [mode for mode in MODES if regime.train or not mode.training]


class Problem(NamedTuple):
    """Weights and inputs shared by every peer of one (regime, mode).

    x: [T, D]; router_weight: [E, D]; w1: [E, H1, D]; w2: [E, O, H]; dense_w1: [K*H1, D];
    dense_w2: [O, K*H]; grad_out: [T, O] (training only). All in the mode's dtype.
    """

    regime: Regime
    mode: Mode
    x: Tensor
    router_weight: Tensor
    w1: Tensor
    w2: Tensor
    dense_w1: Tensor
    dense_w2: Tensor
    grad_out: Tensor | None

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return (self.x, self.router_weight, self.w1, self.w2, self.dense_w1, self.dense_w2)

    def moe_grads(self) -> dict[str, Tensor | None]:
        """The gradients a MoE training step leaves on the shared leaves (None where it left none)."""
        return {"x": self.x.grad, "router_weight": self.router_weight.grad, "w1": self.w1.grad, "w2": self.w2.grad}

    def moe_params(self) -> tuple[Tensor, ...]:
        """The parameters of every MoE peer: router and all experts."""
        return (self.router_weight, self.w1, self.w2)

    def dense_params(self) -> tuple[Tensor, ...]:
        return (self.dense_w1, self.dense_w2)

    def clear_grads(self) -> None:
        for tensor in self.leaves:
            tensor.grad = None


def make_problem(regime: Regime, mode: Mode, device: torch.device | str = "cpu", seed: int = 0) -> Problem:
    """Fresh random weights (fan-in scaled, every expert different) and inputs for one case."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t, d, h, o, e, k = regime.tokens, regime.d_model, regime.hidden, regime.d_out, regime.experts, regime.top_k
    h1 = 2 * h if regime.glu else h

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=mode.dtype)

    x = randn(t, d)
    router_weight = randn(e, d, scale=d**-0.5)
    # Low-precision logits tie often (bf16 keeps 8 bits), and top-k implementations break ties
    # differently; redraw the tokens whose top k+1 logits tie so every peer routes identically.
    for _ in range(100):
        top = F.linear(x, router_weight).float().topk(min(k + 1, e), dim=-1).values
        tied = (top[:, 1:] == top[:, :-1]).any(dim=-1).nonzero().flatten().to(x.device)
        if tied.numel() == 0:
            break
        x[tied] = randn(tied.numel(), d)
    w1 = randn(e, h1, d, scale=d**-0.5)
    w2 = randn(e, o, h, scale=h**-0.5)
    # Dense equivalent = the first K experts side by side: gate rows of all K, then up rows of all K.
    parts = 2 if regime.glu else 1
    dense_w1 = w1[:k].reshape(k, parts, h, d).transpose(0, 1).reshape(parts * k * h, d).contiguous()
    dense_w2 = w2[:k].permute(1, 0, 2).reshape(o, k * h).contiguous()
    grad_out = randn(t, o) if mode.training else None
    if mode.training:
        for tensor in (x, router_weight, w1, w2, dense_w1, dense_w2):
            tensor.requires_grad_(True)
    return Problem(regime, mode, x, router_weight, w1, w2, dense_w1, dense_w2, grad_out)


def routing_of(problem: Problem) -> tuple[Tensor, Tensor]:
    """The routing every peer computes: softmax in fp32, top-k, renormalised (Mixtral's router)."""
    with torch.no_grad():
        logits = F.linear(problem.x, problem.router_weight)
        return topk_gating(logits, problem.regime.top_k, normalize=True)


class PeerSkipped(Exception):
    """A peer cannot run this case; the message says why (printed, never silently substituted)."""


Forward = Callable[[Tensor], Tensor]


def dense_equivalent(problem: Problem) -> Forward:
    regime = problem.regime

    def forward(x: Tensor) -> Tensor:
        hidden = apply_activation(F.linear(x, problem.dense_w1), regime.activation, regime.glu)
        return F.linear(hidden, problem.dense_w2)

    return forward


def cumo_backend(backend: str) -> Callable[[Problem], Forward]:
    def build(problem: Problem) -> Forward:
        reason = ops.unavailable_reason(backend, problem.x.device)
        if reason is not None:
            raise PeerSkipped(f"backend {backend!r} unavailable: {reason}")
        regime = problem.regime

        def forward(x: Tensor) -> Tensor:  # the router's GEMM, gating and experts: what SparseMoEMLP runs in eval
            return ops.moe_mlp(x, problem.router_weight, problem.w1, None, problem.w2, None, regime.top_k, True,
                               regime.activation, regime.glu, backend=backend).out

        return forward

    return build


def plain_grouped_mm(problem: Problem) -> Forward:
    """Plain PyTorch: stable argsort by expert, gather, two torch._grouped_mm, unsort, weighted sum."""
    regime = problem.regime
    if not hasattr(torch, "_grouped_mm"):
        raise PeerSkipped("torch._grouped_mm does not exist in this torch")

    def forward(x: Tensor) -> Tensor:
        logits = F.linear(x, problem.router_weight)
        weights, idx = topk_gating(logits, regime.top_k, normalize=True)
        order = torch.argsort(idx.reshape(-1), stable=True)
        counts = torch.bincount(idx.reshape(-1), minlength=regime.experts)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        tokens = order // regime.top_k
        hidden = torch._grouped_mm(x[tokens], problem.w1.transpose(-2, -1), offs=offsets)
        hidden = apply_activation(hidden, regime.activation, regime.glu)
        rows = torch._grouped_mm(hidden, problem.w2.transpose(-2, -1), offs=offsets)
        unsorted = torch.empty_like(rows)
        unsorted[order] = rows
        per_slot = unsorted.view(x.shape[0], regime.top_k, regime.d_out) * weights.unsqueeze(-1)
        return per_slot.sum(dim=1).to(x.dtype)

    return forward


def _share(module: torch.nn.Module, name: str, tensor: Tensor) -> None:
    """Replace a parameter by our tensor itself (not a copy), so every peer reads the same memory."""
    del module._parameters[name]
    setattr(module, name, tensor)


def hf_experts(implementation: str) -> Callable[[Problem], Forward]:
    """transformers' MixtralTopKRouter + experts module (MixtralExperts for SwiGLU, NemotronHExperts
    for a plain fc1-act-fc2 MLP) with ``config._experts_implementation = implementation``."""

    def build(problem: Problem) -> Forward:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        regime = problem.regime
        if regime.d_out != regime.d_model:
            raise PeerSkipped("HF expert modules return [T, d_model]: they need d_out == d_model")
        if implementation == "batched_mm":
            s = regime.tokens * regime.top_k
            gathered = s * (problem.w1[0].numel() + problem.w2[0].numel()) * problem.w1.element_size()
            gathered *= 2 if problem.mode.training else 1  # and their gradients
            if gathered > BATCHED_MM_MAX_BYTES:
                raise PeerSkipped(f"batched_mm would gather {gathered / 2**30:.1f} GiB of expert weights "
                                  f"(one copy per token and slot; limit {BATCHED_MM_MAX_BYTES / 2**30:.0f} GiB)")
        config = SimpleNamespace(
            _experts_implementation=implementation,
            hidden_size=regime.d_model, intermediate_size=regime.hidden, moe_intermediate_size=regime.hidden,
            num_local_experts=regime.experts, n_routed_experts=regime.experts, num_experts_per_tok=regime.top_k,
            hidden_act=regime.activation, mlp_hidden_act=regime.activation, moe_latent_size=None,
        )
        with torch.device("meta"):
            experts = MixtralExperts(config) if regime.glu else NemotronHExperts(config)
            router = MixtralTopKRouter(config)
        _share(experts, "gate_up_proj" if regime.glu else "up_proj", problem.w1)
        _share(experts, "down_proj", problem.w2)
        _share(router, "weight", problem.router_weight)

        def forward(x: Tensor) -> Tensor:
            _, weights, idx = router(x)
            return experts(x, idx, weights)

        return forward

    return build


class Peer(NamedTuple):
    name: str
    build: Callable[[Problem], Forward]  # raises PeerSkipped when it cannot run the case
    color: str
    ours: bool = False


PEERS = [
    Peer("dense-equiv", dense_equivalent, "#444444"),
    Peer("cumo-torch", cumo_backend("torch"), "#1f77b4", ours=True),
    Peer("cumo-cpu", cumo_backend("cpu"), "#d62728", ours=True),
    Peer("cumo-triton", cumo_backend("triton"), "#ff7f0e", ours=True),
    Peer("cumo-cuda", cumo_backend("cuda"), "#e377c2", ours=True),
    Peer("hf-eager", hf_experts("eager"), "#2ca02c"),
    Peer("hf-grouped_mm", hf_experts("grouped_mm"), "#9467bd"),
    Peer("hf-batched_mm", hf_experts("batched_mm"), "#8c564b"),
    Peer("torch-grouped_mm", plain_grouped_mm, "#17becf"),
]
PEERS_BY_NAME = {peer.name: peer for peer in PEERS}
REFERENCE_PEER = "cumo-torch"  # the oracle's output every other peer's output is compared with
DENSE_PEER = "dense-equiv"


def peers_for(device_type: str) -> list[Peer]:
    """The peers that make sense on a device type (our CPU backend on CPU, Triton/CUDA on GPU)."""
    skip = {"cpu": {"cumo-triton", "cumo-cuda"}, "cuda": {"cumo-cpu"}}.get(device_type, set())
    return [peer for peer in PEERS if peer.name not in skip]


def make_step(forward: Forward, problem: Problem) -> Callable[[], Tensor]:
    """One timed unit: inference (no autograd) or a training step (forward + backward of all leaves)."""
    if not problem.mode.training:
        def step() -> Tensor:
            with torch.no_grad():
                return forward(problem.x)
        return step

    def train_step() -> Tensor:
        problem.clear_grads()
        out = forward(problem.x)
        out.backward(problem.grad_out)
        return out.detach()

    return train_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(steps: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, run round-robin (one call of each per round) so that machine
    noise (other processes, frequency changes) hits every implementation alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes held by tensors allocated during one call, above what existed before it
    (parameters and inputs excluded; outputs, activations, workspaces and gradients included).

    CPU: replay the allocator's alloc/free events recorded by torch.profiler(profile_memory=True);
    every ATen CPU tensor goes through that allocator. CUDA: the caching allocator's peak counter.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def read_bandwidth(device: torch.device, repeats: int = 7) -> float:
    """Bytes per second of a large .sum(): the memory read rate that memory-bound floors divide by."""
    probe = torch.ones(BANDWIDTH_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    probe.sum()
    times = interleaved_times({"sum": probe.sum}, repeats, device)["sum"]
    return BANDWIDTH_PROBE_BYTES / median(times)


def expert_bytes(regime: Regime, dtype: torch.dtype) -> int:
    """Bytes of one expert's weights (w1 and w2)."""
    h1 = 2 * regime.hidden if regime.glu else regime.hidden
    return (h1 * regime.d_model + regime.d_out * regime.hidden) * torch.empty((), dtype=dtype).element_size()


def weight_floor_bytes(problem: Problem) -> int:
    """Bytes of the distinct experts this batch touches: what a memory-bound MoE must read."""
    _, idx = routing_of(problem)
    return int(idx.unique().numel()) * expert_bytes(problem.regime, problem.mode.dtype)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Max abs error relative to the max magnitude of the expected tensor."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.detach().double().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


# Agreement with the reference peer's output, same dtype, same weights (bf16 paths round differently).
AGREEMENT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def disagreement(out: Tensor, grads: dict[str, Tensor | None], reference: Tensor,
                 reference_grads: dict[str, Tensor | None]) -> tuple[float, str]:
    """Worst relative error of a peer's output (and, after a training step, of its gradients) against
    the reference's, and a sentence when it is out of tolerance or a gradient is missing (else "")."""
    worst = rel_err(out, reference)
    problems = []
    for name, expected in reference_grads.items():
        if expected is None:
            continue
        if grads.get(name) is None:
            problems.append(f"no gradient for {name}")
            continue
        worst = max(worst, rel_err(grads[name], expected))
    if not worst <= AGREEMENT_RTOL[reference.dtype]:
        problems.append(f"differs from the reference by {worst:.2g}")
    return worst, "; ".join(problems)
