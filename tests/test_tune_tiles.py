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


def test_tune_times_each_candidate_through_the_tables_the_launchers_read(monkeypatch):
    """With stand-in problems whose 'time' depends on the tiles the launchers would read: the bucket
    where a candidate is clearly faster takes it, every other bucket keeps the static tiles, and the
    tables are the real ones again afterwards."""
    favourite = (16, 128, 64, 4, 3)

    def launch_cost(problem):
        config = tiles.gemm_config(1.0, torch.bfloat16, False, device=0)
        chosen = (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_warps"], config["num_stages"])
        tokens, _, _, _, experts, top_k, _ = problem
        return 0.5 if chosen == favourite and tokens * top_k / experts <= 16 else 1.0

    monkeypatch.setattr(tune_tiles, "time_device", lambda fn, iters: fn())
    cases = {problem: (lambda p=problem: launch_cost(p), lambda: 1.0) for problem in tune_tiles.PROBLEMS}
    table, speedups = tune_tiles.tune("gemm", cases, deadline=math.inf, log=lambda *a: None)
    assert table[0] == [16, *favourite] and speedups["16"] == 2.0
    assert table[1:] == [[None if b == math.inf else b, *rest] for b, *rest in tiles.GEMM_TABLE[1:]]
    tiles.check_table(table, "gemm")
    assert tiles.tables_for(-1) == (tiles.GEMM_TABLE, tiles.WEIGHT_GRAD_TABLE)


def test_the_budget_goes_largest_bucket_first_and_evenly(monkeypatch):
    """A clock that advances one second per problem timed: with 12 seconds for four buckets, the largest bucket
    (the training regimes', three problems: 3 s a candidate) is tuned first, within its share of 3 s."""
    clock = [0.0]

    def timing(fn, iters):
        clock[0] += 1.0
        return 1.0

    monkeypatch.setattr(tune_tiles.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(tune_tiles, "time_device", timing)
    cases = {problem: (lambda: None, lambda: None) for problem in tune_tiles.PROBLEMS if problem[0] * problem[5]
             / problem[4] > 256}  # only the largest bucket has problems: the others time nothing, quickly
    lines = []
    table, _ = tune_tiles.tune("gemm", cases, deadline=12.0, log=lines.append)
    assert lines[:2] == ["  gemm <= inf: out of time after 2 candidates",  # at 0 s and 3 s; 6 s is past 3 s
                         f"  gemm <= inf: 3 problems, 2 tiles timed, chose {tuple(tiles.GEMM_TABLE[-1][1:])} (1.00x "
                         f"the static {tuple(tiles.GEMM_TABLE[-1][1:])})"], lines
    assert [row[0] for row in table] == [16, 64, 256, None]  # the table in its order again


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the tuner would run")
def test_without_a_gpu_it_says_so():
    assert tune_tiles.main([]) == 2


def test_a_case_runs_under_the_interpreter(monkeypatch):
    """The launch sequences the tuner times, run once on CPU tensors through Triton's interpreter (fp32):
    every argument reaches its kernel (a GPU run is too scarce to find a wrong call)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moe_kernels.triton import LAUNCHES, reset_launch_counts

    for glu in (True, False):
        gemms, weight_grads = tune_tiles.make_case(6, 16, 8, 12, 4, 2, glu, device="cpu", dtype=torch.float32,
                                                   interpret=True)
        reset_launch_counts()
        gemms()
        weight_grads()
        # a training step's four grouped GEMMs (fc1, fc2, d pre-activation, input-gradient rows), two weight grads
        assert dict(LAUNCHES) == {"grouped_gemm_kernel": 4, "grouped_weight_grad_kernel": 2}, dict(LAUNCHES)


def test_each_bucket_is_precompiled_before_its_timings(monkeypatch):
    """tune hands the precompiler each bucket's candidates, static tiles first, and its problems' launch sequences
    before it times any of them."""
    events = []
    monkeypatch.setattr(tune_tiles, "time_device", lambda fn, iters: events.append("time") or 1.0)
    cases = {problem: (lambda: None, lambda: None) for problem in tune_tiles.PROBLEMS}

    def precompile(kind, candidates, steps, deadline, log):
        events.append(("precompile", kind, candidates[0], len(candidates), len(steps)))

    tune_tiles.tune("weight_grad", cases, deadline=math.inf, log=lambda *a: None, precompile=precompile)
    for bound, *static in tiles.WEIGHT_GRAD_TABLE[::-1]:  # largest bucket first
        problems = sum(tune_tiles.bucket_of(t * k / e, [64, math.inf]) == bound
                       for t, _, _, _, e, k, _ in tune_tiles.PROBLEMS)
        tried = len({tuple(static), *tune_tiles.weight_grad_candidates(bound)})
        assert events[0] == ("precompile", "weight_grad", tuple(static), tried, problems)
        timings = tried * problems  # each candidate on each of the bucket's problems
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
        gemms, _ = tune_tiles.make_case(64, 64, 32, 64, 8, 2, True, device="cpu", dtype=torch.bfloat16)
    target = GPUTarget("cuda", 90, 32)
    candidates = tune_tiles.gemm_candidates(16)[:2]
    jobs = set()
    for tiles_ in candidates:
        with tune_tiles.candidate_tables("gemm", tiles_):
            jobs |= {repr(job) for job in tune_tiles.recorded_specializations([gemms], target)}
    lines = []
    precompile = tune_tiles.Precompiler(2, target)
    try:
        precompile("gemm", candidates, [gemms], math.inf, lines.append)
    finally:
        precompile.close()
    assert lines == [f"  gemm: {len(jobs)} of {len(jobs)} specializations of 2 candidates compiled in 2 processes "
                     f"(0 failed)"], lines
    assert len(list(tmp_path.glob("*/*.cubin"))) == len(jobs)
