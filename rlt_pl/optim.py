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
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import bitsandbytes as bnb
import torch
from torch.optim.lr_scheduler import LambdaLR

ScheduleName = Literal["constant", "cosine", "linear"]


def _check_cuda(name: str, allow_cpu: bool) -> None:
    if not allow_cpu and not torch.cuda.is_available():
        raise RuntimeError(
            f"optimizer {name} needs CUDA; set init_args.allow_cpu: true to run bitsandbytes' CPU path "
            "or use torch.optim.AdamW"
        )


class AdamW8bit(bnb.optim.AdamW8bit):
    """bitsandbytes 8-bit AdamW that fails fast without CUDA.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper RL: 1e-6).
        betas: Adam moment decay rates.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay (paper RL: 0).
        min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes default 4096).
        allow_cpu: permit construction without CUDA (bitsandbytes' slow CPU path; for tests and debugging).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        allow_cpu: bool = False,
    ) -> None:
        _check_cuda(type(self).__name__, allow_cpu)
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
        )


class PagedAdamW8bit(bnb.optim.PagedAdamW8bit):
    """bitsandbytes paged 8-bit AdamW (state pages to host memory under pressure); fails fast without CUDA.

    With `allow_cpu` and no CUDA it warns and runs un-paged, i.e. as `AdamW8bit`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper RL: 1e-6).
        betas: Adam moment decay rates.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay (paper RL: 0).
        min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes default 4096).
        allow_cpu: permit construction without CUDA (falls back to un-paged AdamW8bit).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        allow_cpu: bool = False,
    ) -> None:
        _check_cuda(type(self).__name__, allow_cpu)
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
        )
        if not torch.cuda.is_available():
            warnings.warn("PagedAdamW8bit: no CUDA, paging is off (runs as AdamW8bit on CPU)", stacklevel=2)
            self.is_paged = False


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
