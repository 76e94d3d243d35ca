"""Expert parallelism over torch.distributed: each rank holds a contiguous block of the experts.

``expert_parallel(moe, group)`` turns a SparseMoEMLP into an ``ExpertParallelMoEMLP``: rank r of the
group (size W) keeps experts ``[r * E/W, (r+1) * E/W)``; the router is replicated. A forward:

1. gating: the replicated router on the rank's own tokens;
2. count exchange: one ``all_gather`` of the rank's per-(choice, expert) assignment counts and its token
   count (the only host synchronisation: uneven all-to-all needs its split sizes on the host);
3. capacity (if set) as one process holding every rank's tokens, concatenated in rank order, would apply
   it: ``expert_capacity(capacity_factor, T_global, K, E)`` with GShard priority (every first choice of
   every rank before any second choice, then rank order, then token order). Each rank derives its drops
   from the gathered counts without further communication;
4. dispatch: the kept token rows, sorted by expert (hence by destination rank), go through
   ``all_to_all_single`` with uneven splits;
5. experts: ``moe_kernels.ops.expert_mlp`` on the received rows with the local expert slice;
6. return: the reverse all-to-all brings each row's expert output home;
7. combine: the router-weighted sum of each token's K outputs, in token order.

Gradients follow one convention, the one autograd through collectives gives naturally: **the single-process
loss is the sum over ranks of each rank's loss**. Concretely, with ``L_r`` the loss a rank backpropagates:
expert slices receive the gradient of ``sum_r L_r`` (the all-to-all's backward brings every rank's
contribution), replicated parameters (the router, everything outside the MoE) receive their rank's part and
must be summed over ranks: ``data_parallel`` (DDP with a summing comm hook, expert slices excluded) or
``sum_replicated_gradients`` does that. The aux losses follow the same convention: ``last_balance_loss``,
``last_z_loss`` and ``last_aux_loss`` hold this rank's *share*; summed over ranks they equal (value and
gradient) the losses of one process holding all tokens and all experts. So a rank's task loss should be
its share too, e.g. ``sum of per-token losses / global token count``. ``last_expert_load`` is the global
load (identical on every rank). Every rank must run every forward and backward of the layer, even with 0
tokens: the collectives pair up across ranks. Equality with one process needs ``router_jitter=0`` (each rank
draws its own jitter). With ``balance_loss="cumo"`` (per-sample losses) pass ``[B, N, D]`` inputs: the
single-process reference is the concatenation of the ranks' batches; a 2-D input counts as one sample per
rank. The small count tensors copied back to the device go with ``non_blocking=True``, so the ``.cpu()`` of
the gathered counts stays the forward's only wait on the device.
"""

from __future__ import annotations

import copy
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cumo_layers.checkpoint import CheckpointError, read_config, read_tensors, write_checkpoint
from cumo_layers.moe import SparseMoEMLP
from cumo_layers.router import cumo_balance_weights, expert_load, switch_balance_scale
from cumo_layers.serialization import moe_settings
from moe_kernels import ops
from moe_kernels.reference import combine
from moe_kernels.routing import build_routing_plan, expert_capacity

EXPERT_PARAMETERS = ("w1", "b1", "w2", "b2")
SLICE_DIRECTORY = "experts-{first:05d}-{end:05d}"
SLICE_PATTERN = re.compile(r"experts-(\d{5})-(\d{5})")
PHASES = ("gating", "all_to_all", "experts", "combine")


def all_to_all_rows(rows: Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> Tensor:
    """Uneven all-to-all of rows, differentiable.

    rows: [sum(send_counts), ...] -> [sum(recv_counts), ...]. The first send_counts[0] rows go to rank 0, the
    next send_counts[1] to rank 1, and so on; the result holds what rank 0 sent here, then rank 1's, ... (recv_counts
    rows each). Backward is the same exchange with the splits swapped.
    """
    return _AllToAllRows.apply(rows, send_counts, recv_counts, group)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, send_counts: list[int], recv_counts: list[int], group) -> Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        received = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        dist.all_to_all_single(
            received, rows.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group
        )
        return received

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_to_all_rows(grad, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


class ExpertParallelMoEMLP(SparseMoEMLP):
    """The expert-parallel form of a SparseMoEMLP (build it with ``expert_parallel``).

    x: [..., in_features] (this rank's tokens, any count, 0 included) -> [..., out_features].
    Parameters: ``router.weight`` [E, in] (replicated), and this rank's slice of the experts
    ``w1`` [E_local, H1, in], ``b1`` [E_local, H1] | None, ``w2`` [E_local, out, H], ``b2`` [E_local, out] | None,
    experts ``[first_expert, first_expert + num_local_experts)``. ``num_experts`` stays the global E.
    Set ``phase_times`` to a dict to accumulate host seconds per phase (``PHASES``) over forwards.
    """

    def __init__(self, moe: SparseMoEMLP, group: dist.ProcessGroup | None = None) -> None:
        # SparseMoEMLP.__init__ would allocate all E experts: take the settings from ``moe`` instead.
        nn.Module.__init__(self)
        for name, value in vars(moe).items():
            if not name.startswith("_"):  # the layer's settings; parameters and submodules follow
                setattr(self, name, value)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("expert_parallel needs an initialised process group (init_process_group)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"rank {dist.get_rank()} is not a member of the group it was asked to split experts over")
        _check_same_layer_on_every_rank(moe, group, self.world_size)
        if moe.num_experts % self.world_size:
            raise ValueError(
                f"expert parallelism needs num_experts divisible by the group size: {moe.num_experts} experts "
                f"over {self.world_size} ranks"
            )
        self.num_local_experts = moe.num_experts // self.world_size
        self.first_expert = self.rank * self.num_local_experts
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        self.router = copy.deepcopy(moe.router)
        for name in EXPERT_PARAMETERS:
            full = getattr(moe, name)
            sliced = None if full is None else nn.Parameter(full.detach()[local].clone(), full.requires_grad)
            setattr(self, name, sliced)
        self.phase_times: dict[str, float] | None = None

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if self.phase_times is None:
            yield
            return
        start = time.perf_counter()
        yield
        self.phase_times[name] = self.phase_times.get(name, 0.0) + time.perf_counter() - start

    def _choice_keys(self, top_k_idx: Tensor) -> Tensor:
        """top_k_idx: [T, K] -> [K, T] int64 key ``k * E + expert`` of each assignment, choice-major (the
        GShard priority order of capacity)."""
        choices = torch.arange(top_k_idx.shape[1], device=top_k_idx.device).unsqueeze(1)
        return top_k_idx.t() + self.num_experts * choices

    def _exchange_counts(self, top_k_idx: Tensor, num_samples: int) -> Tensor:
        """top_k_idx: [T, K] -> [W, K*E + 2] int64 on the host: every rank's assignments per (choice, expert),
        then its token and sample counts. The one host synchronisation of the forward."""
        num_tokens, top_k = top_k_idx.shape
        choice_keys = self._choice_keys(top_k_idx)
        sizes = torch.tensor([num_tokens, num_samples], dtype=torch.int64).to(top_k_idx.device, non_blocking=True)
        local = torch.cat([expert_load(choice_keys, top_k * self.num_experts), sizes])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        return torch.stack(gathered).cpu()

    def _kept_counts(self, choice_counts: Tensor, capacity: int | None) -> Tensor:
        """choice_counts: [W, K, E] -> [W, K, E] assignments kept under ``capacity`` (all if None).

        Expert e's assignments in priority order are (choice, rank, token); the block of (k, s) starts after
        every earlier choice of every rank and after choice k of the ranks before s, and keeps what fits.
        """
        if capacity is None:
            return choice_counts
        per_choice = choice_counts.sum(0)  # [K, E]
        before_choice = per_choice.cumsum(0) - per_choice
        before_rank = choice_counts.cumsum(0) - choice_counts
        start = before_choice.unsqueeze(0) + before_rank
        return torch.minimum((capacity - start).clamp(min=0), choice_counts)

    def _drop_over_capacity(self, top_k_idx: Tensor, kept: Tensor) -> Tensor:
        """top_k_idx: [T, K]; kept: [K, E] this rank's kept count per (choice, expert) -> [T, K] with the
        assignments past it (in token order) set to E (dropped)."""
        num_tokens, top_k = top_k_idx.shape
        keys = self._choice_keys(top_k_idx).reshape(-1)
        plan = build_routing_plan(keys.unsqueeze(1), top_k * self.num_experts)
        rank_in_key = plan.slot_rows - plan.expert_offsets[keys]
        allowed = kept.reshape(-1).to(keys.device, non_blocking=True)[keys]
        flat = top_k_idx.t().reshape(-1)
        flat = torch.where(rank_in_key < allowed, flat, torch.full_like(flat, self.num_experts))
        return flat.view(top_k, num_tokens).t().contiguous()

    def _set_aux_losses(self, logits: Tensor, top_k_idx: Tensor, global_load: Tensor,
                        tokens: tuple[int, int], samples: tuple[int, int]) -> None:
        """This rank's shares (local, global counts in ``tokens`` and ``samples``) of the balance and z losses
        of one process holding every token, through the router's balance weights and ``ops.router_losses``.

        z: a mean over all tokens, so the local mean scaled by T_local / T_global. Switch balance
        ``E * sum_e f_e P_e``: the weights of the *global* load and token count. CuMo's balance: a mean over
        samples (each sample on one rank), so the local weights times S_local / S_global.
        """
        router = self.router
        (num_tokens, global_tokens), (num_samples, global_samples) = tokens, samples
        dtype = torch.promote_types(logits.dtype, torch.float32)
        scale = 1.0
        if global_tokens == 0:
            weights = logits.new_zeros(1, self.num_experts, dtype=dtype)
        elif router.balance_loss == "cumo":
            weights = cumo_balance_weights(top_k_idx, self.num_experts, max(num_samples, 1), dtype)
            scale = num_samples / global_samples
        else:  # the global load as it is, scaled in the loss kernel
            weights = global_load.to(logits.device, non_blocking=True).unsqueeze(0)
            scale = switch_balance_scale(global_tokens, top_k_idx.shape[1], self.num_experts)
        router.last_balance_loss, router.last_z_loss, router.last_aux_loss = ops.router_losses(
            logits, weights, num_tokens / max(global_tokens, 1), router.balance_loss_coef, router.z_loss_coef,
            backend=router.backend, balance_scale=scale)

    def forward(self, x: Tensor) -> Tensor:
        x, w1, b1, w2, b2 = self._checked_inputs(x)
        tokens = x.reshape(-1, self.in_features)
        num_tokens, top_k, world = tokens.shape[0], self.top_k, self.world_size
        # Samples (CuMo's balance loss): the leading dim of a [B, N, D] input, else the rank's tokens are one.
        num_samples = x.shape[0] if x.dim() == 3 else int(num_tokens > 0)

        with self._phase("gating"):
            # The load and losses are counted over every rank below: the router's own would be thrown away.
            route = (self.router(tokens, num_samples=max(num_samples, 1)) if self._router_runs_as_module()
                     else self.router.gate(tokens))
            exchanged = self._exchange_counts(route.top_k_idx, num_samples)
            choice_counts = exchanged[:, :-2].view(world, top_k, self.num_experts)
            global_tokens, global_samples = exchanged[:, -2:].sum(0).tolist()
            capacity = None
            if self.capacity_factor is not None:
                capacity = expert_capacity(self.capacity_factor, global_tokens, top_k, self.num_experts)
            kept = self._kept_counts(choice_counts, capacity)  # [W, K, E]
            top_k_idx = route.top_k_idx
            if capacity is not None:
                top_k_idx = self._drop_over_capacity(top_k_idx, kept[self.rank])
            if self.training:
                self._set_aux_losses(route.logits, route.top_k_idx, choice_counts.sum((0, 1)),
                                     (num_tokens, global_tokens), (num_samples, global_samples))
            else:
                self.router.clear_losses()
            kept_per_expert = kept.sum(1)  # [W, E]
            self.last_expert_load = kept_per_expert.sum(0).to(tokens.device, non_blocking=True)
            by_rank = kept_per_expert.view(world, world, self.num_local_experts)  # [source, owner, local expert]
            send_counts = by_rank[self.rank].sum(1).tolist()
            recv_per_expert = by_rank[:, self.rank]  # [source, local expert]
            recv_counts = recv_per_expert.sum(1).tolist()
            plan = build_routing_plan(top_k_idx, self.num_experts)

        with self._phase("all_to_all"):
            # Kept rows are sorted by global expert id, hence grouped by owner rank in rank order.
            send_rows = tokens.index_select(0, plan.sorted_tokens[: sum(send_counts)])
            received = all_to_all_rows(send_rows, send_counts, recv_counts, self.group)

        with self._phase("experts"):
            local_expert = torch.arange(self.num_local_experts, device=tokens.device).repeat(world)
            local_idx = local_expert.repeat_interleave(
                recv_per_expert.reshape(-1).to(tokens.device, non_blocking=True), output_size=received.shape[0]
            )
            unit_weights = received.new_ones((received.shape[0], 1), dtype=route.top_k_weights.dtype)
            expert_rows = ops.expert_mlp(
                received, unit_weights, local_idx.unsqueeze(1), w1, b1, w2, b2,
                activation=self.activation, glu=self.glu, backend=self.backend,
            )

        with self._phase("all_to_all"):
            returned = all_to_all_rows(expert_rows, recv_counts, send_counts, self.group)

        with self._phase("combine"):
            dropped_rows = returned.new_zeros((num_tokens * top_k - returned.shape[0], self.out_features))
            out = combine(torch.cat([returned, dropped_rows]), route.top_k_weights, top_k_idx, plan)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, experts=[{self.first_expert}, {self.first_expert + self.num_local_experts}) "
            f"of {self.num_experts}, rank={self.rank}/{self.world_size}"
        )


def expert_parallel(moe: SparseMoEMLP, group: dist.ProcessGroup | None = None) -> ExpertParallelMoEMLP:
    """The expert-parallel form of ``moe`` in ``group`` (default: the world): this rank keeps its contiguous
    block of E / group size experts (ValueError unless divisible), the router is copied (replicated).

    Every rank must pass a module with the same weights (same seed, or load a checkpoint). The returned
    module's forward takes this rank's tokens; see the module docstring for the gradient convention.
    """
    if not isinstance(moe, SparseMoEMLP) or isinstance(moe, ExpertParallelMoEMLP):
        raise TypeError(f"expert_parallel expects a SparseMoEMLP, got {type(moe).__name__}")
    return ExpertParallelMoEMLP(moe, group)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every expert slice of every expert-parallel layer."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoEMLP):
            names += [f"{prefix}.{n}" if prefix else n for n in EXPERT_PARAMETERS if getattr(module, n) is not None]
    return names


def sum_replicated_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce (sum) the gradients of every parameter except the expert slices: after it every rank holds
    the single-process gradient of every parameter it has. Call after backward, when not using DDP."""
    experts = set(expert_parameter_names(model))
    for name, param in model.named_parameters():
        if name not in experts and param.grad is not None:
            dist.all_reduce(param.grad, group=group)


def _sum_gradients_hook(group, bucket):
    """DDP comm hook: sum the bucket over ranks (DDP's default averages; our losses are per-rank shares).
    No annotations: DDP compares them with dist.GradBucket, and this module's annotations are strings."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel`` over ``group`` for a model holding expert-parallel layers of the same group.

    The expert slices are left out of DDP (``_set_params_and_buffers_to_ignore_for_model``): each rank owns
    its slice, whose gradient the all-to-all's backward has already completed. The other parameters are
    all-reduced by DDP with a summing comm hook, so each rank's loss must be its share of the single-process
    loss (see the module docstring); the gradients are then the single-process ones on every rank.
    """
    from torch.nn.parallel import DistributedDataParallel

    group_size = dist.get_world_size(group)
    for module in model.modules():
        if isinstance(module, ExpertParallelMoEMLP) and module.world_size != group_size:
            raise ValueError(
                f"data_parallel needs the expert-parallel group to span the data-parallel group "
                f"({module.world_size} != {group_size} ranks); replicated expert slices are not supported"
            )
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    wrapped = DistributedDataParallel(model, process_group=group, **ddp_kwargs)
    wrapped.register_comm_hook(group, _sum_gradients_hook)
    return wrapped


def _check_same_layer_on_every_rank(moe: SparseMoEMLP, group: dist.ProcessGroup | None, world_size: int) -> None:
    """Every rank of the group wraps the same layer: its settings and dtype, gathered once when the layer is built
    (as DDP checks its parameters' shapes). A mismatch found later would surface inside a collective of the
    first forward: a gloo abort on one rank and a reset connection on the others, or an NCCL hang."""
    mine = {**_layer_config(moe), "dtype": str(moe.w1.dtype)}
    everyone: list[dict[str, Any]] = [{} for _ in range(world_size)]
    dist.all_gather_object(everyone, mine, group=group)
    differing = [name for name in mine if any(other[name] != mine[name] for other in everyone)]
    if differing:
        per_rank = "; ".join(f"{name}: {[other[name] for other in everyone]}" for name in differing)
        raise ValueError(f"expert_parallel: every rank must wrap the same layer, but by rank {per_rank}")


def _layer_config(moe: SparseMoEMLP) -> dict[str, Any]:
    """SparseMoEMLP constructor arguments that rebuild ``moe``; the backend is the loader's choice."""
    return {name: value for name, value in moe_settings(moe).items() if name != "backend"}


def save_expert_slice(moe: ExpertParallelMoEMLP, directory: str | os.PathLike) -> Path:
    """Each rank writes its expert slice (and the router) to ``directory/experts-<first>-<end>/`` (safetensors
    + JSON, atomic); returns after every rank of the group has written. Use a fresh ``directory`` per save."""
    end = moe.first_expert + moe.num_local_experts
    path = Path(directory) / SLICE_DIRECTORY.format(first=moe.first_expert, end=end)
    tensors = {name: getattr(moe, name) for name in EXPERT_PARAMETERS if getattr(moe, name) is not None}
    tensors["router.weight"] = moe.router.weight
    write_checkpoint(path, tensors, {"layer": _layer_config(moe), "first_expert": moe.first_expert, "end_expert": end})
    dist.barrier(group=moe.group)
    return path


def _read_experts(
    directory: str | os.PathLike, first: int = 0, end: int | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The layer config and tensors of experts [first, end) (default: all) plus the router, gathered from the
    slices in ``directory`` whatever world size wrote them; CheckpointError if the slices do not tile [0, E)."""
    slices = sorted(
        (int(m.group(1)), int(m.group(2)), p)
        for p in Path(directory).iterdir() if (m := SLICE_PATTERN.fullmatch(p.name)) and p.is_dir()
    )
    if not slices:
        example = SLICE_DIRECTORY.format(first=0, end=0)
        raise CheckpointError(f"{directory} holds no expert slices ({example}-style directories)")
    layer = read_config(slices[0][2])["layer"]
    bounds = [0] + [b for lo, hi, _ in slices for b in (lo, hi)] + [layer["num_experts"]]
    if any(bounds[i] != bounds[i + 1] for i in range(0, len(bounds), 2)):
        ranges = [s[:2] for s in slices]
        raise CheckpointError(f"the expert slices in {directory} do not tile [0, {layer['num_experts']}): {ranges}")
    end = layer["num_experts"] if end is None else end
    pieces: dict[str, list[Tensor]] = {}
    router_weight = None
    for lo, hi, path in slices:
        if hi <= first or lo >= end:
            continue
        if read_config(path)["layer"] != layer:
            raise CheckpointError(f"{path} was saved from a different layer than {slices[0][2]}")
        tensors = read_tensors(path)
        router_weight = tensors.pop("router.weight")
        for name, tensor in tensors.items():
            pieces.setdefault(name, []).append(tensor[max(first, lo) - lo: min(end, hi) - lo])
    tensors = {name: torch.cat(parts) for name, parts in pieces.items()}
    tensors["router.weight"] = router_weight
    return layer, tensors


def load_expert_slice(moe: ExpertParallelMoEMLP, directory: str | os.PathLike) -> None:
    """Fill this rank's expert slice and the router from the slices in ``directory``, saved by any world size
    (re-sliced to this one). CheckpointError if the saved layer differs from ``moe``."""
    end = moe.first_expert + moe.num_local_experts
    layer, tensors = _read_experts(directory, moe.first_expert, end)
    if layer != _layer_config(moe):
        diff = {k: (layer.get(k), v) for k, v in _layer_config(moe).items() if layer.get(k) != v}
        raise CheckpointError(f"{directory} holds a different layer (saved, expected): {diff}")
    with torch.no_grad():
        for name, param in [(n, getattr(moe, n)) for n in EXPERT_PARAMETERS] + [("router.weight", moe.router.weight)]:
            if param is not None:
                param.copy_(tensors[name])


def load_sparse_moe(directory: str | os.PathLike, **kwargs: Any) -> SparseMoEMLP:
    """A single-process SparseMoEMLP rebuilt from every expert slice in ``directory``.

    kwargs go to SparseMoEMLP (e.g. ``backend``, ``device``); the weights keep their saved dtype.
    """
    layer, tensors = _read_experts(directory)
    moe = SparseMoEMLP(**layer, dtype=tensors["w1"].dtype, **kwargs)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            param.copy_(tensors[name])
    return moe
