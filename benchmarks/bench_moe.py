"""pytest-benchmark suite: every (regime, mode) of benchmarks.common against every peer.

Run: ``pytest benchmarks --benchmark-only`` (or ``pytest --benchmark`` to add it to the tests).
Each (regime, mode) is one pytest-benchmark group, so its table compares the peers on the same
weights. Before timing, each peer's output (and, in training modes, its gradients) is checked against
the reference backend's: a peer that computes something else fails instead of being timed. Narrow the run with ``-k``, e.g.
``-k "decode and infer-bf16"``.
"""

from __future__ import annotations

import functools
import time

import pytest

from benchmarks.common import (
    DENSE_PEER,
    MAX_CALL_S,
    MODES_BY_NAME,
    PEERS_BY_NAME,
    REGIMES,
    REGIMES_BY_NAME,
    PeerSkipped,
    cumo_backend,
    disagreement,
    make_problem,
    make_step,
    peers_for,
    regime_modes,
)

ROUNDS = 3  # pedantic rounds per benchmark: the large regimes take seconds per call on a CPU

# Peers vary fastest, so the one cached problem serves all peers of a case before the next is built.
CASES = [
    pytest.param(regime.name, mode.name, peer.name, id=f"{regime.name}-{mode.name}-{peer.name}")
    for regime in REGIMES
    for mode in regime_modes(regime)
    for peer in peers_for("cpu")
]


@functools.lru_cache(maxsize=1)
def shared_case(regime_name: str, mode_name: str):
    """The problem of one case with the reference backend's output and gradients (one case is kept at a
    time: they are large)."""
    problem = make_problem(REGIMES_BY_NAME[regime_name], MODES_BY_NAME[mode_name])
    reference = make_step(cumo_backend("torch")(problem), problem)()
    reference_grads = {k: None if g is None else g.clone() for k, g in problem.moe_grads().items()}
    return problem, reference, reference_grads


@pytest.mark.parametrize("regime_name, mode_name, peer_name", CASES)
def test_moe(benchmark, regime_name: str, mode_name: str, peer_name: str) -> None:
    problem, reference, reference_grads = shared_case(regime_name, mode_name)
    try:
        step = make_step(PEERS_BY_NAME[peer_name].build(problem), problem)
    except PeerSkipped as exc:
        pytest.skip(str(exc))
    start = time.perf_counter()
    out = step()
    elapsed = time.perf_counter() - start
    if peer_name != DENSE_PEER:
        _, wrong = disagreement(out, problem.moe_grads(), reference, reference_grads)
        assert not wrong, f"{peer_name}: {wrong}"
    del out
    if elapsed > MAX_CALL_S:
        pytest.skip(f"too slow to time here: one call took {elapsed:.1f} s > {MAX_CALL_S:g} s")
    benchmark.group = f"{regime_name} {mode_name}"
    benchmark.extra_info.update(regime=regime_name, mode=mode_name, peer=peer_name)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
