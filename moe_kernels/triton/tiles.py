"""Which tiles the Triton expert kernels launch with: a static table per kernel, keyed by the mean rows
per expert, and per GPU model a tuned table that replaces it when one ships in ``tuned/``.

No autotuning on the hot path: a first call never benchmarks, a new shape never stalls. The key is
the mean rows per expert (T*K/E, known from shapes without a sync): thin M tiles when experts see few
rows (decode, small batch), wide ones when they see many, the choice vLLM's tuned H200 table makes
(BLOCK_M 16 at M=1, 32 up to M=2048, 64 at 4096 for E=128). ``python3 -m benchmarks.tune_tiles`` on a
GPU times candidate tiles on the benchmark regimes and writes a table for that GPU model
(``tuned/<model>.json``; its GEMM tiles may differ per epilogue); the static table below is the default
everywhere else.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

# Fixed tiles under the interpreter: small, so that tests cross tile edges on tiny shapes.
INTERPRET_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
INTERPRET_WEIGHT_GRAD = dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_R=32)

# Grouped GEMM: (max rows per expert, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for 16-bit operands;
# fp32 (no tensor-core fast path here) halves BLOCK_K.
GEMM_TABLE = [
    (16, 16, 64, 128, 4, 4),
    (64, 32, 64, 128, 4, 4),
    (256, 64, 128, 64, 4, 4),
    (math.inf, 128, 128, 64, 8, 3),
]
# Weight gradients reduce over an expert's rows: (max rows per expert, BLOCK_P, BLOCK_Q, BLOCK_R, warps, stages).
WEIGHT_GRAD_TABLE = [
    (64, 64, 64, 32, 4, 2),
    (math.inf, 128, 128, 64, 8, 3),
]
GROUP_M = 8
TUNED_DIR = Path(__file__).with_name("tuned")
# A tuned GEMM table may hold one table per epilogue, named in the order of grouped_gemm_kernel's EPILOGUE codes
# (expert_launches.EPILOGUE_*): fc2 and the input-gradient rows (plain), fc1 (activation), the backward's
# d pre-activation (activation gradient), each tuned on its own GEMMs.
EPILOGUES = ("plain", "activation", "activation_grad")


def gemm_config(rows_per_expert: float, dtype: torch.dtype, glu: bool, device: int = -1, epilogue: int = 0) -> dict:
    """Launch settings of grouped_gemm_kernel (device: a CUDA device index, whose tuned table applies; epilogue:
    the kernel's EPILOGUE code, where that table has one per epilogue)."""
    table = tables_for(device)[0]
    if isinstance(table, dict):
        table = table[EPILOGUES[epilogue]]
    _, block_m, block_n, block_k, warps, stages = next(row for row in table if rows_per_expert <= row[0])
    if glu and block_n > 64:  # two accumulators (gate and up) per tile
        block_n = 64
    if dtype == torch.float32:
        block_k, stages = max(32, block_k // 2), min(stages, 3)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=warps,
                num_stages=stages)


def weight_grad_config(rows_per_expert: float, dtype: torch.dtype, device: int = -1) -> dict:
    """Launch settings of grouped_weight_grad_kernel (device as for gemm_config)."""
    table = tables_for(device)[1]
    _, block_p, block_q, block_r, warps, stages = next(row for row in table if rows_per_expert <= row[0])
    if dtype == torch.float32:
        block_p, block_q, block_r, warps, stages = 64, 64, 32, 4, 2
    return dict(BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_R=block_r, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def tables_for(device: int) -> tuple[list | dict, list]:
    """(GEMM table, or one per epilogue name; weight-gradient table) for CUDA device ``device``: the tuned ones of
    its GPU model when ``tuned/`` has them, else the static ones (also for device -1: no GPU)."""
    if device < 0:
        return GEMM_TABLE, WEIGHT_GRAD_TABLE
    path = TUNED_DIR / f"{tuned_name(torch.cuda.get_device_name(device))}.json"
    return load_tables(path) if path.exists() else (GEMM_TABLE, WEIGHT_GRAD_TABLE)


def reload_tables() -> None:
    """Forget the tables read so far and every launch built from them (runtime.shape_cache), so the
    next launch reads ``tuned/`` again: after a tuned table is installed, replaced or overridden."""
    from moe_kernels.triton import runtime

    tables_for.cache_clear()
    runtime.clear_shape_caches()


def tuned_name(device_name: str) -> str:
    """File stem of a GPU model's tuned table: 'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def load_tables(path: Path) -> tuple[list | dict, list]:
    """Read and check a tuned table; a malformed one raises ValueError naming the file and the entry.

    Format: {"gemm": [[max_rows, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages], ...] or such a table per epilogue,
    {"plain": [...], "activation": [...], "activation_grad": [...]}, "weight_grad": [[max_rows, BLOCK_P, BLOCK_Q,
    BLOCK_R, warps, stages], ...], ...} with max_rows strictly increasing and null (no bound) in the last row;
    any other keys (device, date, Triton version, measured speed-ups) are provenance."""
    try:
        data = json.loads(Path(path).read_text())
        return check_gemm_tables(data["gemm"]), check_table(data["weight_grad"], "weight_grad")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tuned tile table {path}: {exc}") from None


def check_gemm_tables(tables: list | dict) -> list | dict:
    """A tuned GEMM table (``check_table``), or one per epilogue: exactly the names of EPILOGUES."""
    if not isinstance(tables, dict):
        return check_table(tables, "gemm")
    if sorted(tables) != sorted(EPILOGUES):
        raise ValueError(f"gemm: one table per epilogue, {list(EPILOGUES)}, got {sorted(tables)}")
    return {name: check_table(tables[name], f"gemm.{name}") for name in EPILOGUES}


def check_table(rows: list, name: str) -> list[tuple]:
    """Rows of a tuned table as the static tables hold them (null bound -> inf), or ValueError."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{name}: expected a non-empty list of rows, got {rows!r}")
    table, previous = [], -math.inf
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 6:
            raise ValueError(f"{name}[{i}]: expected [max_rows, 3 block sizes, warps, stages], got {row!r}")
        bound = math.inf if row[0] is None else row[0]
        sizes = row[1:]
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= previous:
            raise ValueError(f"{name}[{i}]: max_rows must increase (null for no bound), got {row[0]!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            raise ValueError(f"{name}[{i}]: block sizes, warps and stages must be ints, got {sizes!r}")
        blocks, warps, stages = sizes[:3], sizes[3], sizes[4]
        if not all(b >= 16 and b & (b - 1) == 0 for b in blocks):  # tl.dot needs >= 16
            raise ValueError(f"{name}[{i}]: block sizes must be powers of two >= 16, got {blocks}")
        if warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
            raise ValueError(f"{name}[{i}]: warps must be a power of two <= 16 and stages in [1, 8], got "
                             f"{warps}, {stages}")
        table.append((bound, *sizes))
        previous = bound
    if table[-1][0] != math.inf:
        raise ValueError(f"{name}: the last row must have no bound (null), got {rows[-1][0]!r}")
    return table
