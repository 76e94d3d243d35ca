"""The offline tile tuner's choices (benchmarks/tune_tiles.py), without a GPU: buckets, candidates, and
when a candidate replaces the static tiles."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import tune_tiles
from moe_kernels.triton import tiles


def test_buckets_are_the_static_tables():
    assert tune_tiles.BOUNDS == [row[0] for row in tiles.GEMM_TABLE]
    buckets = [tune_tiles.bucket_of(r) for r in (0.125, 16, 17, 64, 256, 257, 1e6)]
    assert buckets == [16, 16, 64, 64, 256, math.inf, math.inf]
    assert {tune_tiles.bucket_of(t * k / e) for t, _, _, _, e, k, _ in tune_tiles.PROBLEMS} == set(tune_tiles.BOUNDS)


def test_candidates_are_valid_table_rows():
    for bound in tune_tiles.BOUNDS:
        for kind, candidates in (("gemm", tune_tiles.gemm_candidates(bound)),
                                 ("weight_grad", tune_tiles.weight_grad_candidates(bound))):
            assert candidates and len(set(candidates)) == len(candidates)
            for c in candidates:  # each one passes the loader's checks
                tiles.check_table([[None, *c]], kind)
    assert all(c[0] == 16 for c in tune_tiles.gemm_candidates(16))  # thin tiles for decode-like buckets


def test_choose_keeps_the_static_tiles_unless_clearly_beaten():
    static, other = (16, 64, 128, 4, 4), (16, 128, 64, 4, 3)
    assert tune_tiles.choose({static: 1.0, other: 0.99}, static) == (static, 1.0)  # within the margin
    chosen, speedup = tune_tiles.choose({static: 1.0, other: 0.8}, static)
    assert chosen == other and abs(speedup - 1.25) < 1e-9
    chosen, speedup = tune_tiles.choose({other: 0.8}, static)  # the static tiles failed to run
    assert chosen == other and math.isnan(speedup)


def stand_in_cases(cost) -> dict:
    """case_kernels' shape for every problem, each kernel's 'launch' returning ``cost(problem, kernel name)``."""
    names = (*tune_tiles.GEMMS, *tune_tiles.WEIGHT_GRADS)
    return {problem: {name: (lambda p=problem, n=name: cost(p, n), (1, 1, 1)) for name in names}
            for problem in tune_tiles.PROBLEMS}


def test_tune_times_each_candidate_through_the_tables_the_launchers_read(monkeypatch):
    """With stand-in problems whose 'time' depends on the tiles the launchers would read: the epilogue and bucket
    where a candidate is clearly faster take it (the d pre-activation's table, at up to 16 rows per expert), every
    other table and bucket keeps the static tiles, and the tables are the real ones again afterwards."""
    from moe_kernels.triton import expert_launches as ex

    favourite = (16, 128, 64, 4, 3)
    epilogue = {"fc1": ex.EPILOGUE_ACTIVATION, "d_pre": ex.EPILOGUE_ACTIVATION_GRAD}

    def launch_cost(problem, name):
        config = tiles.gemm_config(1.0, torch.bfloat16, False, device=0, epilogue=epilogue.get(name, 0))
        chosen = (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_warps"], config["num_stages"])
        tokens, _, _, _, experts, top_k, _ = problem
        return 0.5 if name == "d_pre" and chosen == favourite and tokens * top_k / experts <= 16 else 1.0

    monkeypatch.setattr(tune_tiles, "time_device", lambda fn, iters: fn())
    tables, speedups = tune_tiles.tune("gemm", stand_in_cases(launch_cost), deadline=math.inf, log=lambda *a: None)
    static = [[None if b == math.inf else b, *rest] for b, *rest in tiles.GEMM_TABLE]
    assert tables["activation_grad"] == [[16, *favourite], *static[1:]] and speedups["activation_grad"]["16"] == 2.0
    assert tables["plain"] == tables["activation"] == static
    assert tiles.check_gemm_tables(tables)
    assert tiles.tables_for(-1) == (tiles.GEMM_TABLE, tiles.WEIGHT_GRAD_TABLE)


def test_the_budget_goes_largest_bucket_first_and_evenly(monkeypatch):
    """A clock that advances one second per kernel timed: with 48 seconds for four buckets, the largest bucket
    (the training regimes', three problems of four GEMMs: 12 s a candidate) is tuned first, within its share of
    12 s."""
    clock = [0.0]

    def timing(fn, iters):
        clock[0] += 1.0
        return 1.0

    monkeypatch.setattr(tune_tiles.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(tune_tiles, "time_device", timing)
    cases = {problem: kernels for problem, kernels in stand_in_cases(lambda p, n: None).items()
             if problem[0] * problem[5] / problem[4] > 256}  # only the largest bucket has problems
    lines = []
    tables, _ = tune_tiles.tune("gemm", cases, deadline=48.0, log=lines.append)
    static = tuple(tiles.GEMM_TABLE[-1][1:])
    assert lines[:4] == ["  gemm <= inf: out of time after 2 candidates",  # at 0 s and 12 s; 24 s is past 12 s
                         *[f"  gemm {group} <= inf: 3 problems, 2 tiles timed, chose {static} (1.00x the static "
                           f"{static})" for group in ("plain", "activation", "activation_grad")]], lines
    assert [row[0] for row in tables["plain"]] == [16, 64, 256, None]  # the table in its order again


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the tuner would run")
def test_without_a_gpu_it_says_so():
    assert tune_tiles.main([]) == 2


def test_a_case_runs_under_the_interpreter(monkeypatch):
    """The kernels the tuner times, run once on CPU tensors through Triton's interpreter (fp32): every argument
    reaches its kernel (a GPU run is too scarce to find a wrong call)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moe_kernels.triton import LAUNCHES, reset_launch_counts

    for glu in (True, False):
        kernels = tune_tiles.case_kernels(6, 16, 8, 12, 4, 2, glu, device="cpu", dtype=torch.float32,
                                          interpret=True)
        assert list(kernels) == [*tune_tiles.GEMMS, *tune_tiles.WEIGHT_GRADS]
        reset_launch_counts()
        for launch, _ in kernels.values():
            launch()
        # a training step's four grouped GEMMs (fc1, fc2, d pre-activation, input-gradient rows), two weight grads
        assert dict(LAUNCHES) == {"grouped_gemm_kernel": 4, "grouped_weight_grad_kernel": 2}, dict(LAUNCHES)


def test_each_bucket_is_precompiled_before_its_timings(monkeypatch):
    """tune hands the precompiler each bucket's candidates, static tiles first, and every launch of its problems
    before it times any of them."""
    events = []
    monkeypatch.setattr(tune_tiles, "time_device", lambda fn, iters: events.append("time") or 1.0)

    def precompile(kind, candidates, steps, deadline, log):
        events.append(("precompile", kind, candidates[0], len(candidates), len(steps)))

    tune_tiles.tune("weight_grad", stand_in_cases(lambda p, n: None), deadline=math.inf, log=lambda *a: None,
                    precompile=precompile)
    for bound, *static in tiles.WEIGHT_GRAD_TABLE[::-1]:  # largest bucket first
        problems = sum(tune_tiles.bucket_of(t * k / e, [64, math.inf]) == bound
                       for t, _, _, _, e, k, _ in tune_tiles.PROBLEMS)
        tried = len({tuple(static), *tune_tiles.weight_grad_candidates(bound)})
        assert events[0] == ("precompile", "weight_grad", tuple(static), tried, 2 * problems)  # two weight grads
        timings = tried * problems * 2  # each candidate on each kernel of each of the bucket's problems
        assert events[1:1 + timings] == ["time"] * timings
        events = events[1 + timings:]
    assert not events


def test_the_precompiler_fills_tritons_cache_for_the_gpu(monkeypatch, tmp_path):
    """Worker processes compile a candidate's recorded specializations for sm_90 (no GPU here) into the on-disk
    cache that the timing process's launches then read (a cubin per specialization)."""
    pytest.importorskip("triton")
    from tests.moe_kernels.test_triton_compiles import ptxas_missing

    if ptxas_missing():
        pytest.skip(ptxas_missing())
    from triton.backends.compiler import GPUTarget

    from moe_kernels.triton import runtime

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with monkeypatch.context() as patch:  # the case's own plan and rows: not launched here
        patch.setattr(runtime, "launch", lambda spec, interpret, *tensors: None)
        kernels = tune_tiles.case_kernels(64, 64, 32, 64, 8, 2, True, device="cpu", dtype=torch.bfloat16)
    gemms = [kernels[name][0] for name in tune_tiles.GEMMS]
    target = GPUTarget("cuda", 90, 32)
    candidates = tune_tiles.gemm_candidates(16)[:2]
    jobs = set()
    for tiles_ in candidates:
        with tune_tiles.candidate_tables("gemm", tiles_):
            jobs |= {repr(job) for job in tune_tiles.recorded_specializations(gemms, target)}
    lines = []
    precompile = tune_tiles.Precompiler(2, target)
    try:
        precompile("gemm", candidates, gemms, math.inf, lines.append)
    finally:
        precompile.close()
    assert lines == [f"  gemm: {len(jobs)} of {len(jobs)} specializations of 2 candidates compiled in 2 processes "
                     f"(0 failed)"], lines
    assert len(list(tmp_path.glob("*/*.cubin"))) == len(jobs)


def test_a_failing_precompile_leaves_the_timings_to_compile(monkeypatch):
    """Best effort: a recording that fails (a Triton whose JIT internals differ) or a broken pool is logged, and the
    tuner goes on."""
    precompile = tune_tiles.Precompiler.__new__(tune_tiles.Precompiler)
    precompile.workers, precompile.target = 2, None

    class BrokenPool:
        def submit(self, *args):
            raise RuntimeError("A process in the process pool was terminated abruptly")

    precompile.pool = BrokenPool()
    monkeypatch.setattr(tune_tiles, "recorded_specializations", lambda steps, target: [("kernel", {}, {}, {}, {})])
    lines = []
    precompile("gemm", [tune_tiles.gemm_candidates(16)[0]], [lambda: None], math.inf, lines.append)
    assert lines == ["  gemm: no precompile (RuntimeError: A process in the process pool was terminated abruptly)"]
    monkeypatch.setattr(tune_tiles, "recorded_specializations", lambda steps, target: 1 / 0)
    lines.clear()
    precompile("gemm", [tune_tiles.gemm_candidates(16)[0]], [lambda: None], math.inf, lines.append)
    assert lines == ["  gemm: no precompile (ZeroDivisionError: division by zero)"]
