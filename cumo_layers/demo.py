"""`make demo`: CuMo's three-stage recipe end to end on CPU, then the paper's ablation on the toy task.

Tiny random-init towers (a CLIP ViT and a Llama-style LM) are written with ``save_pretrained`` and
loaded back as CuMoModel parts; the generated shapes task (coloured shapes at positions, questions
whose answer is in the image) is trained in three stages: the connector only, everything dense, then
CLIP and the connector co-upcycled to 4 experts top-2 with CuMo's bzloss. Each stage prints its loss,
held-out answer accuracy and time; then the expert load of every MoE layer and a table of three
third stages from the same stage-2 checkpoint with the same steps and seed: dense, MLP-MoE, and
MLP-MoE + CLIP-MoE + bzloss. The run starts fresh in build/cumo-demo (plot: build/cumo-demo/recipe.png).

Run: python -m cumo_layers.demo [extra flags of python -m cumo_layers.models.train]
"""

from __future__ import annotations

import sys
import time

from cumo_layers.models import train
from moe_kernels import ops

DEMO_ARGS = [
    "--out", "build/cumo-demo", "--fresh", "--ablation",
    # One thread: on an idle 2-core machine a second one makes a step about 25% faster (stage 3: 47 ->
    # 35 ms), but when other jobs hold the cores it makes it ten times slower (threads wait for each other).
    "--threads", "1",
]  # steps and learning rates: the recipe's defaults (150, 600, 400 steps; lr 1e-3)


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    backend = ops.resolve_backend("auto", "cpu").__name__
    print(f"cumo-moe demo: the CuMo recipe on CPU; MoE blocks on the 'auto' backend -> {backend}")
    train.main(DEMO_ARGS + argv)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
