"""The benchmark tooling itself (not timings): phase spans of the cpu backend, the report's memory metrics."""

import pytest
import torch

from benchmarks.common import MODES_BY_NAME, Regime, cumo_backend, make_problem, make_step
from moe_kernels import cpu

needs_cpu_backend = pytest.mark.skipif(cpu.unavailable_reason(torch.device("cpu")) is not None,
                                       reason="CPU backend unavailable")


@needs_cpu_backend
@pytest.mark.parametrize("tokens,mode,expected,absent", [
    (256, "infer-fp32", {"cumo::gather_rows", "cumo::fc1", "cumo::activation", "cumo::fc2", "cumo::combine"},
     {"cumo::small_expert"}),
    (2, "infer-bf16", {"cumo::small_expert", "cumo::combine"}, {"cumo::fc1"}),
    (256, "train-fp32", {"cumo::fc1", "cumo::bwd_fc2_dgrad", "cumo::bwd_activation", "cumo::bwd_wgrad",
                         "cumo::bwd_fc1_dgrad"}, {"cumo::small_expert"}),
])
def test_phase_spans(tokens, mode, expected, absent):
    """The C++ ops record their phases in torch.profiler (worker threads included), as benchmarks.phases reads them."""
    from benchmarks.phases import phase_times

    if "cumo::small_expert" in expected and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the small-row path needs AVX-512")
    regime = Regime("tiny", tokens, 32, 16, 32, 4, 2, "silu", True, True)
    problem = make_problem(regime, MODES_BY_NAME[mode])
    spans = phase_times(make_step(cumo_backend("cpu")(problem), problem), rounds=1)
    assert expected <= set(spans), sorted(spans)
    assert not absent & set(spans), sorted(spans)


def test_activation_memory_metric():
    """Training memory less the parameter gradients, relative to the dense equivalent's."""
    from benchmarks.report import CaseResult, PeerResult

    case = CaseResult("fine-grained", "train-fp32", 1, None, {
        "dense-equiv": PeerResult("ok", times=[1.0], peak_bytes=300, param_grad_bytes=100),
        "cumo-cpu": PeerResult("ok", times=[1.1], peak_bytes=900, param_grad_bytes=800),
    })
    assert case.ratio("cumo-cpu", "dense-equiv", "peak") == 3.0
    assert case.ratio("cumo-cpu", "dense-equiv", "activation") == 0.5


def test_gpu_timing_layer_training_step_runs_a_whole_step(monkeypatch):
    """gpu_timing.layer_training_time on the CPU (torch backend, timers stubbed): the step it times is a
    forward and a backward of the layer with its router losses, every leaf getting a gradient."""
    from benchmarks import common, gpu_timing

    seen = []

    def timer(step, iters):
        step()
        seen.append(iters)
        return 1.0

    monkeypatch.setattr(gpu_timing, "time_device", timer)
    monkeypatch.setattr(gpu_timing, "time_host", timer)
    monkeypatch.setitem(common.REGIMES_BY_NAME, "tiny", Regime("tiny", 5, 16, 8, 12, 4, 2, "silu", True, True))
    grads = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(real_grad(*a, **k)) or grads[-1])
    result = gpu_timing.layer_training_time(lambda *parts: None, ("tiny",), device="cpu", backend="torch")
    assert result == {"tiny": {"device_ms": 1.0, "host_us": 1.0}} and len(seen) == 2
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads[0])


def test_gpu_timing_gemm_breakdown_times_each_kernel_beside_a_matmul(monkeypatch):
    """gpu_timing.gemm_breakdown on the CPU (Triton's interpreter, fp32, tiny regimes, timers stubbed): each of the
    six grouped kernels of a training step is launched and timed, each beside a torch.mm of its m x k x n."""
    pytest.importorskip("triton")
    from benchmarks import common, gpu_timing
    from moe_kernels.triton import LAUNCHES, reset_launch_counts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shapes = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: shapes.append((*a.shape, b.shape[1])) or real_mm(a, b))
    monkeypatch.setattr(gpu_timing, "time_device", lambda fn, iters: (fn(), 0.5)[1])
    for name in ("cumo-clip", "cumo-connector", "fine-grained", "large"):
        monkeypatch.setitem(common.REGIMES_BY_NAME, name, Regime(name, 6, 16, 8, 12, 4, 2, "silu", True, True))
    reset_launch_counts()
    result = gpu_timing.gemm_breakdown(lambda *parts: None, device="cpu", dtype=torch.float32, interpret=True)
    assert set(result) == {"cumo-clip", "cumo-connector", "fine-grained", "large"}
    kernels = result["large"]
    assert list(kernels) == ["fc1", "fc2", "d_pre", "dx_rows", "dw2", "dw1"]
    assert [k["mkn"] for k in kernels.values()] == [[12, 16, 16], [12, 8, 12], [12, 12, 8], [12, 16, 16],
                                                    [12, 12, 8], [16, 12, 16]]  # 12 rows, H1 = 16 (GLU)
    assert shapes == [tuple(k["mkn"]) for k in kernels.values()] * 4
    assert all(k["x_mm"] == 1.0 and k["tflops"] == round(2 * 12 * 16 * 16 / 0.5 / 1e9, 1)
               for k in [kernels["fc1"], kernels["dx_rows"]])
    # per regime: the case's plan (one block) and its four GEMMs once, then each of the six kernels timed once
    assert dict(LAUNCHES) == {"routing_one_block_kernel": 4, "grouped_gemm_kernel": 32,
                              "grouped_weight_grad_kernel": 8}, dict(LAUNCHES)


def test_gpu_summary_reads_a_run_against_issue_16s_targets():
    """benchmarks.gpu_summary on a report shaped like gpu_check.json: the regime table's ratios, and each target
    MET, NOT MET or not measured from the rows it needs."""
    from benchmarks import gpu_summary

    def row(regime, mode, peer, ms, graph=None):
        return {"regime": regime, "mode": mode, "peer": peer, "device_ms": ms, "host_us": 100.0, "graph_ms": graph}

    clip, decode = ("cumo-clip", "train-bf16"), ("decode", "infer-bf16")
    report = {"device": "GPU", "layer_decode": {"triton": {"host_us": 96.6}}, "timings": [
        row(*decode, "dense-equiv", 0.067, 0.039), row(*decode, "cumo-triton", 0.118, 0.061),
        row(*decode, "torch-grouped_mm", 0.459),
        row(*clip, "dense-equiv", 0.615), row(*clip, "cumo-triton", 1.261), row(*clip, "torch-grouped_mm", 1.985),
        row(*clip, "hf-grouped_mm", 2.681),
        row("large", "infer-bf16", "dense-equiv", 2.0), row("large", "infer-bf16", "cumo-triton", 2.2),
        row("large", "infer-bf16", "torch-grouped_mm", 3.0),  # past T = 2304: no speed-up target
    ]}
    lines = {target.what: target for target in gpu_summary.targets(report)}
    assert lines["decode forward, eager"].met and lines["layer decode host time"].met
    assert lines["cumo-clip training step"].met is False and abs(lines["cumo-clip training step"].value - 2.05) < 0.01
    assert lines["large forward, eager"].met  # 1.1x dense
    assert lines["small batch (T=16) forward, eager"].met is None  # not timed in this report
    assert lines["decode infer-bf16: speed-up over torch-grouped_mm"].met
    assert lines["cumo-clip train-bf16: speed-up over torch-grouped_mm"].met is False
    assert lines["cumo-clip train-bf16: speed-up over hf-grouped_mm"].met
    assert not any("large" in what and "speed-up" in what for what in lines)
    table = gpu_summary.regime_table(report)
    assert "| decode | infer-bf16 | 0.067 | 0.118 (100) | 1.76 | 0.061 (1.56x) | 0.459 |  | 3.89 |  |" in table, table
    assert "MET: decode forward, eager: 0.118 ms (target <= 0.15)" in gpu_summary.summary(report)
    assert gpu_summary.kernel_table(report) == ""  # no kernels timed alone in this report
    report["gemms"] = {"cumo-clip": {"fc1": {"tflops": 401.2, "x_mm": 1.31}, "dw2": {"tflops": 250.0, "x_mm": 2.0}}}
    assert gpu_summary.kernel_table(report).splitlines()[-1] == "| cumo-clip | 401 (1.31) | 250 (2.00) |"
