"""Optimizers and learning-rate schedules selectable from YAML.

The paper uses torch-style AdamW (RL: lr 1e-6 constant, beta (0.9, 0.999), weight decay 0; teacher SFT: lr 1e-5,
cosine with warmup ratio 0.05, beta (0.9, 0.95), weight decay 1e-4; arXiv 2506.08388, §3.9). `AdamW8bit` and
`PagedAdamW8bit` wrap bitsandbytes' 8-bit optimizers (a departure that saves 6 B/param of optimizer state) and
refuse to start on a machine without CUDA unless `allow_cpu` is set. In YAML:

    optimizer: {class_path: rlt_pl.optim.AdamW8bit, init_args: {lr: 1.0e-6}}

Unlike Hugging Face's "constant" schedule, `constant` here honours a warmup if one is given (never dropped silently).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

ScheduleName = Literal["constant", "cosine", "linear"]


def __getattr__(name: str) -> object:
    """`AdamW8bit` / `PagedAdamW8bit` live in `rlt_pl.optim_8bit`, imported on first use: importing bitsandbytes
    logs CPU-backend warnings, and runs with torch's AdamW never need it."""
    if name in ("AdamW8bit", "PagedAdamW8bit"):
        from rlt_pl import optim_8bit

        return getattr(optim_8bit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def weight_decay_groups(model: torch.nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in two groups, as the HF Trainer builds them: biases and normalisation weights get no
    weight decay; the rest get `weight_decay` (None: the optimizer's own setting).

    Args:
        model: the trained model.
        weight_decay: decay of the first group; None leaves the key out so the optimizer's default applies.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()  # LayerNorm, RMSNorm, Qwen2RMSNorm, ...
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name.endswith("bias"):
                no_decay.add(id(p))
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = {"params": [p for p in trainable if id(p) not in no_decay]}
    if weight_decay is not None:
        decay["weight_decay"] = weight_decay
    groups = [decay, {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def resolve_warmup_steps(total_steps: int | None, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    """Warmup length from either an absolute count or a ratio of `total_steps` (rounded up, as HF does).

    Args:
        total_steps: optimizer steps of the run (needed for a ratio).
        warmup_steps: absolute warmup steps.
        warmup_ratio: fraction of `total_steps` in [0, 1).
    """
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("give warmup_steps or warmup_ratio, not both")
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return warmup_steps
    if warmup_ratio is None or warmup_ratio == 0:
        return 0
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if total_steps is None:
        raise ValueError("warmup_ratio needs total_steps")
    return math.ceil(warmup_ratio * total_steps)


def schedule_factor(step: int, name: ScheduleName, warmup_steps: int, total_steps: int | None) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based), as in HF `get_*_schedule_with_warmup`.

    Linear warmup `step / warmup_steps`; then constant 1, cosine `0.5 * (1 + cos(pi * progress))` or linear
    `1 - progress`, with `progress = (step - warmup) / (total - warmup)` clipped to [0, 1].

    Args:
        step: optimizer step.
        name: "constant", "cosine" or "linear".
        warmup_steps: linear warmup length.
        total_steps: total optimizer steps (unused by "constant").
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"schedule {name!r} needs total_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {name!r}; choose constant, cosine or linear")


class WarmupSchedule(LambdaLR):
    """A `LambdaLR` following `schedule_factor`; usable as a Lightning `LRSchedulerCallable` class_path.

    Args:
        optimizer: the wrapped optimizer.
        name: "constant" (paper RL), "cosine" (paper teacher SFT) or "linear".
        total_steps: total optimizer steps (e.g. `trainer.estimated_stepping_batches`); needed unless constant.
        warmup_steps: absolute warmup steps.
        warmup_ratio: warmup as a fraction of `total_steps` (paper SFT: 0.05).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: ScheduleName = "constant",
        total_steps: int | None = None,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
    ) -> None:
        if name not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr schedule name must be constant, cosine or linear, got {name!r}")
        if name != "constant" and (total_steps is None or total_steps <= 0):
            raise ValueError(f"lr schedule {name!r} needs total_steps > 0, got {total_steps}")
        self.name = name
        self.total_steps = total_steps
        self.warmup_steps = resolve_warmup_steps(total_steps, warmup_steps, warmup_ratio)
        super().__init__(optimizer, lambda step: schedule_factor(step, name, self.warmup_steps, total_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: ScheduleName = "constant",
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
) -> WarmupSchedule:
    """Build the learning-rate schedule (step it once per optimizer step: Lightning `interval: "step"`).

    Args:
        optimizer: the wrapped optimizer.
        name: "constant", "cosine" or "linear".
        total_steps: total optimizer steps; needed unless constant.
        warmup_steps: absolute warmup steps.
        warmup_ratio: warmup as a fraction of `total_steps`.
    """
    return WarmupSchedule(optimizer, name, total_steps, warmup_steps, warmup_ratio)
