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

    def launch_through_triton(self, name, grid, args, kwargs):
        self.through_triton.append(name)
        function = f"function of {name} #{len(self.through_triton)}"
        return SimpleNamespace(run=lambda *launch_args: self.launched.append(launch_args), function=function,
                               packed_metadata=("metadata", name))


def combine_args(rows: torch.Tensor, num_tokens: int = 3) -> tuple[tuple, dict]:
    """Arguments of expert_kernels.py's combine_kernel, as experts._combine passes them."""
    ids = torch.zeros(num_tokens * 2, dtype=torch.int64)
    out = torch.empty(num_tokens, rows.shape[1])
    args = (rows, ids, ids, rows, out, num_tokens, rows.shape[1], 4, rows.stride(0), rows.stride(1),
            out.stride(0), out.stride(1))
    return args, dict(TOP_K=2, APPLY_WEIGHTS=False, BLOCK_T=4, BLOCK_N=16)


def test_first_launch_goes_through_triton_then_the_bound_launcher_gets_args_and_constexprs():
    bound = Recording()
    args, kwargs = combine_args(torch.randn(6, 16))
    bound.launch("combine_kernel", (2, 3), args, kwargs)
    assert bound.through_triton == ["combine_kernel"] and bound.launched == []
    bound.launch("combine_kernel", (2, 3), args, kwargs)
    assert bound.through_triton == ["combine_kernel"]
    (launch_args,) = bound.launched
    grid, stream, function, metadata, hooks = launch_args[:3], launch_args[3], launch_args[4], launch_args[5], \
        launch_args[6:9]
    assert grid == (2, 3, 1) and stream == 1000 and function == "function of combine_kernel #1"
    assert metadata == ("metadata", "combine_kernel") and hooks == (None, None, None)
    # Every parameter of the real kernel, in signature order: the runtime arguments, then the constexprs.
    params = runtime.kernels(False).combine_kernel.params
    assert len(launch_args[9:]) == len(params)
    assert launch_args[9:9 + len(args)] == args
    assert launch_args[9 + len(args):] == tuple(kwargs[p.name] for p in params[len(args):])


@pytest.mark.parametrize("change", ["alignment", "integer", "dtype", "constexpr", "device"])
def test_a_launch_triton_would_specialize_differently_is_bound_again(change):
    bound = Recording()
    flat = torch.randn(6 * 16 + 1)
    rows = flat[:-1].view(6, 16)
    args, kwargs = combine_args(rows)
    bound.launch("combine_kernel", (1,), args, kwargs)
    if change == "alignment":  # 4 bytes past a 16-byte boundary
        args, kwargs = combine_args(flat[1:].view(6, 16))
        assert args[0].data_ptr() % 16 != 0
    elif change == "integer":
        args, kwargs = combine_args(rows, num_tokens=2)
    elif change == "dtype":
        args, kwargs = combine_args(rows.half())
    elif change == "constexpr":
        kwargs = {**kwargs, "BLOCK_T": 8}
    else:
        bound.driver.device = 1
    bound.launch("combine_kernel", (1,), args, kwargs)
    assert bound.through_triton == ["combine_kernel"] * 2 and bound.launched == []


def test_a_new_tensor_of_the_same_kind_reuses_the_binding():
    bound = Recording()
    for _ in range(3):
        args, kwargs = combine_args(torch.randn(6, 16))  # new storage each time, 16-byte aligned
        bound.launch("combine_kernel", (1,), args, kwargs)
    assert bound.through_triton == ["combine_kernel"] and len(bound.launched) == 2


def test_launch_hooks_and_the_switch_send_launches_through_triton(monkeypatch):
    bound = Recording()
    args, kwargs = combine_args(torch.randn(6, 16))
    bound.launch("combine_kernel", (1,), args, kwargs)
    hook = runtime.knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hook, "calls", [lambda *a: None])
    bound.launch("combine_kernel", (1,), args, kwargs)
    monkeypatch.setattr(hook, "calls", [])
    bound.enabled = False
    bound.launch("combine_kernel", (1,), args, kwargs)
    assert bound.through_triton == ["combine_kernel"] * 3 and bound.launched == []
    bound.enabled = True
    bound.launch("combine_kernel", (1,), args, kwargs)
    assert len(bound.launched) == 1


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CUMO_TRITON_BIND", "0")
    assert not runtime.BoundKernels().enabled
    monkeypatch.setenv("CUMO_TRITON_BIND", "1")
    assert runtime.BoundKernels().enabled


def test_bindings_are_bounded(monkeypatch):
    bound = Recording()
    monkeypatch.setattr(bound, "MAX_BOUND", 3)
    for tokens in range(1, 6):
        args, kwargs = combine_args(torch.randn(2 * tokens, 16), num_tokens=tokens)
        bound.launch("combine_kernel", (1,), args, kwargs)
    assert len(bound) == 3
    args, kwargs = combine_args(torch.randn(10, 16), num_tokens=5)  # the newest is kept
    bound.launch("combine_kernel", (1,), args, kwargs)
    assert len(bound.launched) == 1


def test_runtime_arguments_passed_by_keyword_are_refused():
    bound = Recording()
    args, kwargs = combine_args(torch.randn(6, 16))
    with pytest.raises(TypeError, match="positionally"):
        bound.launch("combine_kernel", (1,), args[:-1], {**kwargs, "stride_on": args[-1]})


def test_every_layer_launch_binds_once(monkeypatch):
    """A repeated forward and training step of the whole layer, on the compiled launch path with the
    launchers recorded: every kernel is bound on the first call and found again on the next (no key
    that changes per call), and every bound launch gets as many arguments as its kernel has parameters."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the backend take CPU tensors
    from cumo_layers import SparseMoEMLP

    bound = Recording()
    monkeypatch.setattr(runtime, "BOUND_KERNELS", bound)
    real_launch = runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda name, interpret, grid, *a, **k: real_launch(name, False, grid, *a,
                                                                                                **k))
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
    assert {"topk_gating_kernel", "grouped_gemm_kernel", "combine_kernel", "grouped_weight_grad_kernel",
            "topk_gating_backward_kernel"} <= set(first), first
    bound.launched.clear()
    forward_and_backward()
    assert bound.through_triton == first
    assert len(bound.launched) == launches_per_pass
    kernels = runtime.kernels(False)
    for launch_args in bound.launched:
        name = launch_args[4].split()[2]  # the fake CUfunction names its kernel
        assert len(launch_args) - 9 == len(getattr(kernels, name).params), name
