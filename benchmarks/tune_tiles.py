"""``python3 -m benchmarks.tune_tiles``: tune the Triton expert kernels' tile tables on this GPU, offline.

For each row-count bucket of moe_kernels/triton/tiles.py (mean rows per expert up to 16, 64, 256, and
above), it times candidate tiles on the problems whose mean rows per expert fall in the bucket (bf16):
a training step's four grouped GEMMs (fc1 with its gather and activation epilogue, fc2, the backward's
d pre-activation with its activation-gradient epilogue, and the input-gradient rows), each on its own, for
the GEMM tables, one per epilogue (fc1's; the d pre-activation's; fc2's and the input-gradient rows'), and the
two weight gradients for the other. A bucket keeps the static table's tiles unless a candidate is faster by
more than ``MARGIN`` over all of its problems. Times are medians of CUDA-event timings. The
budget is split two thirds to the GEMM table, one third to the weight gradients, and within each evenly
over the buckets, the largest first (the training regimes', where the kernels bound the step); a bucket
leaves the time it does not use to the next. Writes
``tuned_<model>.json`` to ``$OUT`` (or benchmarks/out); copy it to moe_kernels/triton/tuned/<model>.json
to ship it: from then on that GPU model launches with it (tests/moe_kernels/test_tiles.py checks every
shipped table). Each candidate's kernels compile once, a few seconds of CPU per candidate against well under a
second of timing: before a bucket's timings, worker processes compile every candidate's specializations for this
GPU into Triton's on-disk cache (``Precompiler``; half the bucket's time at most), so the timings load them.
``--budget-s`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks.gpu_timing import time_device

MARGIN = 0.03
REPS = 10  # CUDA-event timings per candidate and problem (their median counts)
BOUNDS = [16, 64, 256, math.inf]  # the buckets of tiles.GEMM_TABLE; WEIGHT_GRAD_TABLE splits at 64
# (T, D, H, O, E, K, GLU), bf16, SiLU with GLU, GELU without: decode, small batch, and the benchmark regimes'
# sizes in between (CuMo's CLIP MLP and its connector, whose output is 4096 wide).
PROBLEMS = [
    (1, 2048, 1024, 2048, 64, 8, True),
    (16, 1024, 512, 1024, 64, 8, True),
    (128, 2048, 1024, 2048, 64, 8, True),
    (512, 1024, 512, 1024, 64, 8, True),
    (2048, 1024, 512, 1024, 64, 8, True),
    (2304, 1024, 4096, 1024, 4, 2, False),
    (2304, 1024, 4096, 4096, 4, 2, False),
    (8192, 2048, 768, 2048, 128, 8, True),
]


def bucket_of(rows_per_expert: float, bounds: list[float] = BOUNDS) -> float:
    return next(bound for bound in bounds if rows_per_expert <= bound)


def gemm_candidates(bound: float) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tried for a GEMM bucket: thin M tiles for few rows."""
    block_ms = {16: [16], 64: [16, 32], 256: [32, 64]}.get(bound, [64, 128])
    block_ns = [64, 128] if bound <= 256 else [128, 256]
    block_ks = [64, 128] if bound <= 64 else [64]
    schedules = [(4, 3), (4, 4)] + ([(8, 3), (8, 4)] if bound > 64 else [(4, 5)])
    return [(m, n, k, w, s) for m, n, k, (w, s) in itertools.product(block_ms, block_ns, block_ks, schedules)]


def weight_grad_candidates(bound: float) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_P, BLOCK_Q, BLOCK_R, warps, stages) tried for a weight-gradient bucket."""
    blocks = [64, 128]
    block_rs = [32, 64] if bound <= 64 else [64]
    schedules = [(4, 2), (4, 3), (8, 3)] if bound <= 64 else [(4, 3), (8, 3), (8, 4)]
    return [(p, q, r, w, s) for p, q, r, (w, s) in itertools.product(blocks, blocks, block_rs, schedules)]


def choose(times: dict[tuple, float], static: tuple, margin: float = MARGIN) -> tuple[tuple, float]:
    """(chosen tiles, static time / chosen time): the fastest candidate if it beats the static tiles by
    more than ``margin``, else the static tiles. Candidates that failed have no entry in ``times``."""
    best = min(times, key=times.get)
    if static in times and times[best] * (1 + margin) >= times[static]:
        return static, 1.0
    return best, (times[static] / times[best]) if static in times else math.nan


# A training step's grouped kernels, in order: the four GEMMs the GEMM table serves, the two weight gradients.
GEMMS = ("fc1", "fc2", "d_pre", "dx_rows")
WEIGHT_GRADS = ("dw2", "dw1")
# The GEMMs each epilogue's table serves (moe_kernels.triton.tiles.EPILOGUES).
GEMM_GROUPS = {"plain": ("fc2", "dx_rows"), "activation": ("fc1",), "activation_grad": ("d_pre",)}


def case_kernels(tokens, d_in, hidden, d_out, experts, top_k, glu, device="cuda", dtype=torch.bfloat16,
                 interpret=False) -> dict[str, tuple[Callable[[], None], tuple[int, int, int]]]:
    """Operands of one problem and each grouped kernel of its training step, by name (``GEMMS``,
    ``WEIGHT_GRADS``): (launch, (m, k, n)), the kernel's FLOPs those of one dense [m, k] x [k, n] GEMM, 2*m*k*n
    (device, dtype, interpret: a CPU run under Triton's interpreter checks the plumbing in tests). The saved rows
    the weight gradients read hold real values."""
    from moe_kernels.reference import PLAIN_GLU
    from moe_kernels.triton import expert_launches as ex
    from moe_kernels.triton.routing import routing_plan_from_ids

    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(device=device, dtype=dtype)
    hidden1 = 2 * hidden if glu else hidden
    x = torch.randn(tokens, d_in, generator=gen, **kw)
    w1 = torch.randn(experts, hidden1, d_in, generator=gen, **kw) * d_in ** -0.5
    w2 = torch.randn(experts, d_out, hidden, generator=gen, **kw) * hidden ** -0.5
    ids = torch.rand(tokens, experts, generator=gen, device=device).argsort(dim=1)[:, :top_k].reshape(-1)
    weights = torch.rand(tokens * top_k, generator=gen, device=device)
    plan = routing_plan_from_ids(ids.contiguous(), experts, top_k, interpret)
    rows = tokens * top_k
    pre = torch.empty(rows, hidden1, **kw)
    hidden_rows = torch.empty(rows, hidden, **kw)
    out_rows = torch.empty(rows, d_out, **kw)
    grad_out = torch.randn(tokens, d_out, generator=gen, **kw)
    grad_pre, grad_x_rows = torch.empty(rows, hidden1, **kw), torch.empty(rows, d_in, **kw)
    grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
    spec, activation = (PLAIN_GLU, "silu") if glu else (None, "gelu")
    kernels = {
        "fc1": (lambda: ex.grouped_gemm(x, w1, (w1.stride(2), w1.stride(1)), plan, hidden_rows, hidden, interpret,
                                        gather=True, aux=pre, epilogue=ex.EPILOGUE_ACTIVATION, glu=spec,
                                        activation=activation, store_aux=True), (rows, d_in, hidden1)),
        "fc2": (lambda: ex.grouped_gemm(hidden_rows, w2, (w2.stride(2), w2.stride(1)), plan, out_rows, d_out,
                                        interpret, gather=False, row_scale=weights), (rows, hidden, d_out)),
        "d_pre": (lambda: ex.grouped_gemm(grad_out, w2, (w2.stride(1), w2.stride(2)), plan, grad_pre, hidden,
                                          interpret, gather=True, row_scale=weights, aux=pre,
                                          epilogue=ex.EPILOGUE_ACTIVATION_GRAD, glu=spec, activation=activation),
                  (rows, d_out, hidden)),
        "dx_rows": (lambda: ex.grouped_gemm(grad_pre, w1, (w1.stride(1), w1.stride(2)), plan, grad_x_rows, d_in,
                                            interpret, gather=False), (rows, hidden1, d_in)),
        "dw2": (lambda: ex.weight_grad(grad_out, hidden_rows, plan, grad_w2, None, interpret, gather_a=True,
                                       gather_b=False, row_scale=weights), (d_out, rows, hidden)),
        "dw1": (lambda: ex.weight_grad(pre, x, plan, grad_w1, None, interpret, gather_a=False, gather_b=True),
                (hidden1, rows, d_in)),
    }
    for name in GEMMS:
        kernels[name][0]()
    return kernels


@contextmanager
def candidate_tables(kind: str, tiles_: tuple) -> Iterator[None]:
    """Within the block the launchers read ``tiles_`` for every row count of ``kind``'s table ("gemm" or
    "weight_grad"); the launches built from other tiles are dropped on the way in, those built from these on the
    way out."""
    from moe_kernels.triton import runtime, tiles

    row = (math.inf, *tiles_)
    override = ([row], tiles.WEIGHT_GRAD_TABLE) if kind == "gemm" else (tiles.GEMM_TABLE, [row])
    real = tiles.tables_for
    tiles.tables_for = lambda device: override
    runtime.clear_shape_caches()
    try:
        yield
    finally:
        tiles.tables_for = real
        runtime.clear_shape_caches()


def recorded_specializations(steps: list[Callable[[], None]], target) -> list[tuple]:
    """What Triton's JIT would compile for ``target`` for every launch the steps make, launching nothing:
    (kernel name, signature, constexprs, attributes, options) each."""
    from benchmarks.kernel_resources import recording_gpu_launches, specialize

    with recording_gpu_launches() as recording:
        for step in steps:
            step()
    jobs = []
    for kernel, args, constexprs in recording.launches.values():
        source, options = specialize(kernel, args, constexprs, target)
        jobs.append((kernel.__name__, source.signature, source.constants, source.attrs, options))
    return jobs


def compile_specialization(job: tuple, target) -> None:
    """A worker's job: compile one recorded specialization for ``target`` into Triton's on-disk cache."""
    import triton
    from triton.compiler import ASTSource

    from moe_kernels.triton import runtime

    name, signature, constants, attrs, options = job
    triton.compile(ASTSource(getattr(runtime.kernels(False), name), signature, constants, attrs), target=target,
                   options=options)


class Precompiler:
    """Compiles every candidate's kernels for ``target`` in ``workers`` processes ahead of the timings, which then
    find them in Triton's cache instead of compiling one candidate at a time in the timing process. Best effort: a
    failure is logged and the timings compile what they miss as before."""

    SHARE = 0.5  # of a bucket's remaining time, at most, spent waiting for the workers

    def __init__(self, workers: int, target) -> None:
        self.workers, self.target = workers, target
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, kind: str, candidates: list[tuple], steps: list[Callable[[], None]], deadline: float,
                 log) -> None:
        try:
            jobs = {}
            for tiles_ in candidates:
                with candidate_tables(kind, tiles_):
                    jobs.update((repr(job), job) for job in recorded_specializations(steps, self.target))
            futures = [self.pool.submit(compile_specialization, job, self.target) for job in jobs.values()]
            timeout = self.SHARE * (deadline - time.perf_counter())
            done, pending = wait(futures, timeout=None if math.isinf(timeout) else max(0.0, timeout))
        except Exception as exc:  # a Triton whose JIT internals differ, a broken pool: the timings compile inline
            log(f"  {kind}: no precompile ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
            return
        for future in pending:
            future.cancel()
        failed = sum(future.exception() is not None for future in done)
        log(f"  {kind}: {len(done)} of {len(jobs)} specializations of {len(candidates)} candidates compiled in "
            f"{self.workers} processes ({failed} failed)")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def tune(kind: str, cases: dict, deadline: float, log,
         precompile: Precompiler | None = None) -> tuple[list | dict, dict]:
    """The tuned table of one kernel family and its speed-up over the static tiles per bucket: for "weight_grad"
    one table (both weight gradients summed); for "gemm" one table per epilogue (``GEMM_GROUPS``: its GEMMs summed),
    each candidate timed once per GEMM, so the three tables cost the timings of one. ``cases``: problem ->
    ``case_kernels``' dict."""
    from moe_kernels.triton import tiles

    static_table = tiles.GEMM_TABLE if kind == "gemm" else tiles.WEIGHT_GRAD_TABLE
    groups = GEMM_GROUPS if kind == "gemm" else {"weight_grad": WEIGHT_GRADS}
    bounds = [row[0] for row in static_table]
    candidates = gemm_candidates if kind == "gemm" else weight_grad_candidates
    rows: dict = {group: {} for group in groups}
    speedups: dict = {group: {} for group in groups}
    largest_first = static_table[::-1]
    for i, static_row in enumerate(largest_first):
        bound, static = static_row[0], tuple(static_row[1:])
        bucket_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(largest_first) - i)
        problems = [p for p in cases if bucket_of(p[0] * p[5] / p[4], bounds) == bound]  # T*K/E
        launches = {name: [cases[p][name][0] for p in problems] for names in groups.values() for name in names}
        tried = [static] + [c for c in candidates(bound) if c != static]
        if precompile is not None and problems:
            precompile(kind, tried, [launch for group in launches.values() for launch in group], bucket_deadline,
                       log)
        times: dict = {group: {} for group in groups}
        for count, tiles_ in enumerate(tried):
            if time.perf_counter() > bucket_deadline:
                log(f"  {kind} <= {bound}: out of time after {count} candidates")
                break
            with candidate_tables(kind, tiles_):
                for group, names in groups.items():
                    try:
                        times[group][tiles_] = sum(time_device(launch, REPS) for name in names
                                                   for launch in launches[name])
                    except Exception as exc:  # a tile that does not compile or fit: reported, skipped
                        log(f"  {kind} {group} <= {bound} {tiles_}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:100]}")
        for group in groups:
            chosen, speedup = choose(times[group], static) if times[group] else (static, math.nan)
            rows[group][bound] = [None if bound == math.inf else bound, *chosen]
            speedups[group][str(bound)] = round(speedup, 3)
            label = kind if kind == "weight_grad" else f"{kind} {group}"
            log(f"  {label} <= {bound}: {len(problems)} problems, {len(times[group])} tiles timed, chose {chosen} "
                f"({speedup:.2f}x the static {static})")
    tiles.reload_tables()
    tables = {group: [rows[group][row[0]] for row in static_table] for group in groups}
    gains = {group: {str(row[0]): speedups[group][str(row[0])] for row in static_table} for group in groups}
    return (tables, gains) if kind == "gemm" else (tables["weight_grad"], gains["weight_grad"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.tune_tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop trying candidates after this long")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_tiles: no CUDA device; tile tables are tuned on the GPU they are for")
        return 2
    import triton

    from moe_kernels.triton import tiles

    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    start = time.perf_counter()
    cases = {problem: case_kernels(*problem) for problem in PROBLEMS}
    print(f"tuning tiles on {device}; Triton {triton.__version__}, torch {torch.__version__}")
    result = {"device": device, "triton": triton.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "problems": PROBLEMS}
    from triton.runtime.driver import driver

    workers = max(1, min(16, (os.cpu_count() or 2) - 2))  # two cores left to the timing process
    precompile = Precompiler(workers, driver.active.get_current_target())
    try:
        for kind, share in (("gemm", 2 / 3), ("weight_grad", 1.0)):
            result[kind], result[f"{kind}_speedup_vs_static"] = tune(kind, cases, start + share * args.budget_s,
                                                                     print, precompile)
    finally:
        precompile.close()
    tiles.check_gemm_tables(result["gemm"])
    tiles.check_table(result["weight_grad"], "weight_grad")
    path = out / f"tuned_{tiles.tuned_name(device)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}; ship it as moe_kernels/triton/tuned/{tiles.tuned_name(device)}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
