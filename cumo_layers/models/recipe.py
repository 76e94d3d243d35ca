"""CuMo's three-stage recipe on the generated shapes task, one stage at a time, each resumable.

  stage 1  pre-training     the connector only (vision tower and LM frozen)       CuMo: lr 1e-3
  stage 2  pre-finetuning   everything, dense                                      CuMo: lr 2e-6
  stage 3  instruction-tune upcycle CLIP + connector (4 experts, top-2), train     CuMo: lr 2e-6..4e-6
                            everything with bzloss (per-sample top-1 balance 0.1, z 0.01)

Each stage starts from the previous stage's checkpoint and writes ``<out>/<stage>/`` atomically: the
model checkpoint (``model/``) and the stage's history (``history.json``: losses, aux losses, expert
load per MoE layer per step, held-out accuracy, seconds). A stage whose directory exists is finished
and is skipped on a rerun; an interrupted stage continues from its last mid-stage checkpoint
(``<out>/<stage>.partial/``, every ``checkpoint_every`` steps; see resume.py). Learning rates here
are far above CuMo's: these towers start from random init, not from CLIP and Mistral, and get a few
hundred steps instead of an epoch of real image-text data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cumo_layers.checkpoint import atomic_directory
from cumo_layers.models import data
from cumo_layers.models.model import PARTS, CuMoModel
from cumo_layers.models.resume import load_partial_model, partial_directory, restore_partial, save_partial
from cumo_layers.models.towers import save_tiny_towers

HISTORY_NAME = "history.json"
WARMUP_FRACTION = 0.03  # CuMo's (LLaVA's) warmup ratio, then cosine decay to 0
MAX_GRAD_NORM = 1.0
ANSWER_TOKENS = 3  # the longest answer (two words) and <eos>


@dataclass(frozen=True)
class Stage:
    """One training run: which parts train, and what is upcycled (and how) before it starts."""

    name: str
    trainable: tuple[str, ...]
    upcycle_vision: bool = False
    upcycle_connector: bool = False
    aux_losses: bool = True  # False: the MoE blocks train without bzloss (coefficients 0)

    @property
    def upcycles(self) -> bool:
        return self.upcycle_vision or self.upcycle_connector


STAGES = (
    Stage("stage1", ("connector",)),
    Stage("stage2", PARTS),
    Stage("stage3", PARTS, upcycle_vision=True, upcycle_connector=True),
)
# The paper's ablation rows, each a third stage from the same stage-2 checkpoint, same steps and seed.
ABLATION = (
    ("dense", Stage("ablation-dense", PARTS)),
    ("MLP-MoE", Stage("ablation-mlp-moe", PARTS, upcycle_connector=True, aux_losses=False)),
    ("MLP-MoE + CLIP-MoE + bzloss", STAGES[2]),
)


@dataclass
class RecipeConfig:
    """Everything a run depends on; ``learning_rates`` and ``steps`` are per stage name."""

    out: str = "build/cumo-run"
    seed: int = 0
    batch_size: int = 32
    train_size: int = 4096
    heldout_size: int = 512
    shapes_per_image: int = data.SHAPES_PER_IMAGE
    checkpoint_every: int = 100  # steps between mid-stage checkpoints (0: only at the end of a stage)
    learning_rates: dict[str, float] = field(default_factory=lambda: {"stage1": 1e-3, "stage2": 1e-3, "stage3": 1e-3})
    steps: dict[str, int] = field(default_factory=lambda: {"stage1": 150, "stage2": 600, "stage3": 400})
    num_experts: int = 4
    top_k: int = 2
    balance_loss: str = "cumo"
    balance_coef: float = 0.1
    z_coef: float = 0.01
    language_model: str = "llama"
    backend: str = "auto"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RecipeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown recipe settings {unknown}; the settings are {sorted(names)}")
        config = cls(**{**dataclasses.asdict(cls()), **values})
        config.check()
        return config

    def check(self) -> None:
        stage_names = {s.name for s in STAGES}
        for what in ("learning_rates", "steps"):
            table = getattr(self, what)
            if set(table) != stage_names:
                raise ValueError(f"{what} must name exactly the stages {sorted(stage_names)}, got {sorted(table)}")
            if any(not value > 0 for value in table.values()):
                raise ValueError(f"{what} must all be > 0, got {table}")
        for name in ("batch_size", "train_size", "heldout_size", "shapes_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def for_stage(self, stage: Stage) -> tuple[float, int]:
        """(learning rate, steps) of a stage; ablation runs use stage 3's."""
        key = stage.name if stage.name in self.steps else "stage3"
        return self.learning_rates[key], self.steps[key]


def prepare(model: CuMoModel, stage: Stage, config: RecipeConfig) -> CuMoModel:
    """Upcycle what the stage asks for (fresh routers from the seed; not again for a model resumed
    mid-stage) and set which parts train."""
    torch.manual_seed(config.seed)
    if stage.upcycles and model.moe is None:
        model.upcycle(config.num_experts, config.top_k, vision=stage.upcycle_vision,
                      connector=stage.upcycle_connector, balance_loss=config.balance_loss, backend=config.backend)
    model.balance_coef, model.z_coef = (config.balance_coef, config.z_coef) if stage.aux_losses else (0.0, 0.0)
    model.set_trainable(stage.trainable)
    return model


def warmup_cosine(total_steps: int):
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


@torch.no_grad()
def evaluate(model: CuMoModel, split: data.Split, batch_size: int = 128) -> dict[str, float]:
    """Held-out answer accuracy (greedy answer == the true answer, word for word) and the mean
    teacher-forced loss on the answer tokens."""
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        answers = model.generate(split.images[index], split.prompt_ids[index], split.prompt_mask[index],
                                 max_new_tokens=ANSWER_TOKENS, eos_token_id=data.EOS_ID)
        correct += sum(data.decode(row) == split.answers[i] for row, i in zip(answers, index.tolist()))
        loss_sum += float(model(**split.batch(index)).ce_loss) * len(index)
        count += len(index)
    model.train(was_training)
    return {"accuracy": correct / count, "loss": loss_sum / count, "samples": count}


def load_shares(model: CuMoModel) -> dict[str, list[float]]:
    """MoE block name -> each expert's share of its last forward's assignments."""
    return {name: (load.float() / load.sum().clamp_min(1)).tolist() for name, load in model.expert_loads().items()}


def train_stage(model: CuMoModel, stage: Stage, config: RecipeConfig, train: data.Split, heldout: data.Split,
                progress: bool = True, partial: Path | None = None) -> dict[str, Any]:
    """Run one prepared stage in place; returns its history (see the module docstring).

    partial: where the mid-stage state is kept every ``config.checkpoint_every`` steps; if it holds
    one, training continues from it (the model must then have been loaded from it too).
    """
    from tqdm.auto import tqdm

    lr, steps = config.for_stage(stage)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    batches = torch.Generator().manual_seed(config.seed + 1)  # the same batches in every variant of a stage
    history: dict[str, Any] = {"stage": stage.name, "lr": lr, "steps": steps, "trainable": list(stage.trainable),
                               "moe": model.moe, "loss": [], "ce_loss": [], "aux_losses": {}, "expert_load": {},
                               "train_seconds": 0.0}
    done = 0
    if partial is not None and partial.is_dir():
        done, history = restore_partial(partial, optimizer, schedule, batches)
    start, seconds_before = time.perf_counter(), history["train_seconds"]
    model.train()
    bar = tqdm(range(done, steps), initial=done, total=steps, desc=stage.name, disable=None if progress else True,
               leave=False, dynamic_ncols=True)
    for step in bar:
        output = model(**train.batch(torch.randint(len(train), (config.batch_size,), generator=batches)))
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history["loss"].append(output.loss.item())
        history["ce_loss"].append(output.ce_loss.item())
        for part, value in output.aux_losses.items():
            history["aux_losses"].setdefault(part, []).append(value.item())
        for layer, shares in load_shares(model).items():
            history["expert_load"].setdefault(layer, []).append(shares)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
        history["train_seconds"] = seconds_before + time.perf_counter() - start
        finished = step + 1
        if partial is not None and config.checkpoint_every and finished % config.checkpoint_every == 0 and finished < steps:
            save_partial(partial, model, optimizer, schedule, batches, finished, history)
    evaluation_start = time.perf_counter()
    history["heldout"] = evaluate(model, heldout)
    history["seconds"] = history["train_seconds"] + time.perf_counter() - evaluation_start
    return history


def stage_input(out: Path, stage: Stage, config: RecipeConfig) -> CuMoModel:
    """The model a stage starts from: the towers for stage 1, else the previous stage's checkpoint."""
    if stage.name == "stage1":
        vision, language = save_tiny_towers(out / "towers" / f"seed{config.seed}", seed=config.seed,
                                            model_type=config.language_model)
        torch.manual_seed(config.seed)  # the connector's init
        return CuMoModel.from_pretrained_parts(vision, language, image_token_id=data.IMAGE_ID)
    previous = "stage1" if stage.name == "stage2" else "stage2"
    return CuMoModel.from_pretrained(out / previous / "model")


def run_stage(stage: Stage, config: RecipeConfig, splits: tuple[data.Split, data.Split],
              progress: bool = True) -> tuple[dict[str, Any], bool]:
    """Train ``stage`` unless ``<out>/<stage>`` exists (continuing from ``<out>/<stage>.partial`` if
    an interrupted run left one); returns (its history, whether it was skipped)."""
    out = Path(config.out)
    directory = out / stage.name
    if directory.is_dir():
        return json.loads((directory / HISTORY_NAME).read_text()), True
    partial = partial_directory(directory)
    start = load_partial_model(partial) if partial.is_dir() else stage_input(out, stage, config)
    model = prepare(start, stage, config)
    history = train_stage(model, stage, config, *splits, progress=progress, partial=partial)
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging / "model")
        (staging / HISTORY_NAME).write_text(json.dumps(history) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return history, False


def make_splits(config: RecipeConfig) -> tuple[data.Split, data.Split]:
    """(train, held-out) from disjoint seeds."""
    shapes = config.shapes_per_image
    return (data.make_split(config.train_size, 2 * config.seed, shapes),
            data.make_split(config.heldout_size, 2 * config.seed + 1, shapes))


def final_expert_load(history: dict[str, Any], last: int = 20) -> dict[str, list[float]]:
    """Each MoE layer's mean expert shares over the last ``last`` steps of a stage."""
    return {layer: torch.tensor(shares[-last:]).mean(dim=0).tolist() for layer, shares in history["expert_load"].items()}
