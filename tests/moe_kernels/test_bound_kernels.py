"""The Triton backend's bound launch path (runtime.BoundKernels), checked without a GPU: which launches
go through Triton and which call a bound launcher, what the launcher receives, and that the key never
lets a binary run on arguments it was not specialized for. The GPU tests and `make gpu-check` run it
for real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from moe_kernels.triton import runtime  # noqa: E402


class FakeDriver:
    device = 0

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int) -> int:
        return 1000 + device


class Recording(runtime.BoundKernels):
    """Triton's path and the bound launchers recorded, not run."""

    def __init__(self):
        super().__init__(driver=FakeDriver())
        self.through_triton: list[str] = []
        self.launched: list[tuple] = []

    def launch_through_triton(self, spec, tensors):
        self.through_triton.append(spec.name)
        function = f"function of {spec.name} #{len(self.through_triton)}"
        return SimpleNamespace(run=lambda *launch_args: self.launched.append(launch_args), function=function,
                               packed_metadata=("metadata", spec.name))


def combine_args(rows: torch.Tensor, num_tokens: int = 3, grid: tuple = (1,), **constexprs) -> tuple:
    """(Launch, tensors) of expert_kernels.py's combine_kernel, as expert_launches.combine builds them."""
    ids = torch.zeros(num_tokens * 2, dtype=torch.int64)
    out = torch.empty(num_tokens, rows.shape[1])
    spec = runtime.Launch("combine_kernel", grid, (num_tokens, rows.shape[1], 4, *rows.stride(), *out.stride()),
                          dict(TOP_K=2, APPLY_WEIGHTS=False, BLOCK_T=4, BLOCK_N=16) | constexprs)
    return spec, (rows, ids, ids, rows, out)


def test_first_launch_goes_through_triton_then_the_bound_launcher_gets_args_and_constexprs():
    bound = Recording()
    spec, tensors = combine_args(torch.randn(6, 16), grid=(2, 3))
    bound.launch(spec, tensors)
    assert bound.through_triton == ["combine_kernel"] and bound.launched == []
    bound.launch(spec, tensors)
    assert bound.through_triton == ["combine_kernel"]
    (launch_args,) = bound.launched
    grid, stream, function, metadata, hooks = launch_args[:3], launch_args[3], launch_args[4], launch_args[5], \
        launch_args[6:9]
    assert grid == (2, 3, 1) and stream == 1000 and function == "function of combine_kernel #1"
    assert metadata == ("metadata", "combine_kernel") and hooks == (None, None, None)
    # Every parameter of the real kernel, in signature order: the runtime arguments, then the constexprs.
    params = runtime.kernels(False).combine_kernel.params
    assert len(launch_args[9:]) == len(params)
    runtime_args = (*[t.data_ptr() for t in tensors], *spec.scalars)  # the tensors as their addresses
    assert launch_args[9:9 + len(runtime_args)] == runtime_args
    assert launch_args[9 + len(runtime_args):] == tuple(spec.constexprs[p.name] for p in params[len(runtime_args):])


@pytest.mark.parametrize("change", ["alignment", "which tensor is misaligned", "dtype", "launch", "device"])
def test_a_launch_triton_would_specialize_differently_is_bound_again(change):
    bound = Recording()
    flat = torch.randn(6 * 16 + 1)
    rows = flat[:-1].view(6, 16)
    spec, tensors = combine_args(rows)
    if change == "which tensor is misaligned":  # the rows misaligned, then the output instead
        tensors = (flat[1:].view(6, 16), *tensors[1:])
    bound.launch(spec, tensors)
    if change == "alignment":  # 4 bytes past a 16-byte boundary
        tensors = combine_args(flat[1:].view(6, 16))[1]
        assert tensors[0].data_ptr() % 16 != 0
    elif change == "which tensor is misaligned":
        out = torch.randn(3 * 16 + 1)[1:].view(3, 16)
        tensors = (rows, *tensors[1:4], out)
        assert tensors[0].data_ptr() % 16 == 0 and out.data_ptr() % 16 != 0
    elif change == "dtype":
        tensors = combine_args(rows.half())[1]
    elif change == "launch":  # another Launch: other scalars, constexprs or grid (equal contents included)
        spec = combine_args(rows)[0]
    else:
        bound.driver.device = 1
    bound.launch(spec, tensors)
    assert bound.through_triton == ["combine_kernel"] * 2 and bound.launched == []


def test_new_tensors_of_the_same_kind_reuse_the_binding():
    bound = Recording()
    spec = combine_args(torch.randn(6, 16))[0]
    for _ in range(3):
        bound.launch(spec, combine_args(torch.randn(6, 16))[1])  # new storage each time, 16-byte aligned
    assert bound.through_triton == ["combine_kernel"] and len(bound.launched) == 2


def test_launch_hooks_and_the_switch_send_launches_through_triton(monkeypatch):
    bound = Recording()
    spec, tensors = combine_args(torch.randn(6, 16))
    bound.launch(spec, tensors)
    hook = runtime.knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hook, "calls", [lambda *a: None])
    bound.launch(spec, tensors)
    monkeypatch.setattr(hook, "calls", [])
    bound.enabled = False
    bound.launch(spec, tensors)
    assert bound.through_triton == ["combine_kernel"] * 3 and bound.launched == []
    bound.enabled = True
    bound.launch(spec, tensors)
    assert len(bound.launched) == 1


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CUMO_TRITON_BIND", "0")
    assert not runtime.BoundKernels().enabled
    monkeypatch.setenv("CUMO_TRITON_BIND", "1")
    assert runtime.BoundKernels().enabled


def test_bindings_are_bounded(monkeypatch):
    bound = Recording()
    monkeypatch.setattr(bound, "MAX_BOUND", 3)
    launches = [combine_args(torch.randn(2 * tokens, 16), num_tokens=tokens) for tokens in range(1, 6)]
    for spec, tensors in launches:
        bound.launch(spec, tensors)
    assert len(bound) == 3
    bound.launch(*launches[-1])  # the newest is kept
    assert len(bound.launched) == 1


def test_runtime_arguments_passed_by_keyword_are_refused():
    bound = Recording()
    spec, tensors = combine_args(torch.randn(6, 16))
    *scalars, last = spec.scalars
    with pytest.raises(TypeError, match="positionally"):
        bound.launch(runtime.Launch(spec.name, spec.grid, tuple(scalars), spec.constexprs | {"stride_on": last}),
                     tensors)


def test_every_layer_launch_binds_once(monkeypatch):
    """A repeated forward and training step of the whole layer, on the compiled launch path with the
    launchers recorded: every kernel is bound on the first call and found again on the next (no key
    that changes per call), and every bound launch gets as many arguments as its kernel has parameters."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the backend take CPU tensors
    from cumo_layers import SparseMoEMLP

    bound = Recording()
    monkeypatch.setattr(runtime, "BOUND_KERNELS", bound)
    real_launch = runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda spec, interpret, *tensors: real_launch(spec, False, *tensors))
    layer = SparseMoEMLP(32, 16, num_experts=8, top_k=2, activation="silu", glu=True, bias=True, backend="triton")
    x = torch.randn(5, 32, requires_grad=True)

    def forward_and_backward():
        layer(x).sum().backward()
        with torch.no_grad():
            layer.eval()(x)
        layer.train()

    forward_and_backward()
    first = list(bound.through_triton)
    launches_per_pass = len(first) + len(bound.launched)
    assert {"route_blocks_kernel", "grouped_gemm_kernel", "combine_kernel", "grouped_weight_grad_kernel",
            "topk_gating_backward_kernel"} <= set(first), first
    bound.launched.clear()
    forward_and_backward()
    assert bound.through_triton == first
    assert len(bound.launched) == launches_per_pass
    kernels = runtime.kernels(False)
    for launch_args in bound.launched:
        name = launch_args[4].split()[2]  # the fake CUfunction names its kernel
        assert len(launch_args) - 9 == len(getattr(kernels, name).params), name


def test_fp32_launches_follow_the_tf32_switch(monkeypatch):
    """torch.backends.cuda.matmul.allow_tf32 is read on every launch: a Launch built while it was off
    (fp32 accuracy) is not reused once the user turns it on, nor the other way round."""
    from moe_kernels.routing import build_routing_plan
    from moe_kernels.triton.expert_launches import grouped_gemm

    x, w = torch.randn(2, 16), torch.randn(3, 8, 16)
    plan = build_routing_plan(torch.tensor([[0, 1], [1, 2]]), 3)
    seen = []
    monkeypatch.setattr(runtime, "launch", lambda spec, interpret, *tensors: seen.append(spec))
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's module: monkeypatch cannot undo it
    try:
        for allow in (False, True, False):
            torch.backends.cuda.matmul.allow_tf32 = allow
            grouped_gemm(x, w, (w.stride(2), w.stride(1)), plan, torch.empty(4, 8), 8, False, gather=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert [spec.constexprs["DOT_PRECISION"] for spec in seen] == ["ieee", "tf32", "ieee"]
    assert seen[0] is seen[2]  # the same shape and switch: the same Launch, bound once
