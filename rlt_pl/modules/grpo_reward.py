"""The reward interface of `GRPOModule`: a `Reward` scores a generation batch into a `RewardResult`; `TaskReward` is
the verifiable one (a benchmark's grader). Re-exported by `rlt_pl.modules.grpo`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlt_pl.generation import GenerationOutput
from rlt_pl.tasks.base import Task

if TYPE_CHECKING:
    from rlt_pl.modules.grpo import GRPOModule


@dataclass
class RewardResult:
    """Rewards of one generation batch: `rewards` [N] plus per-completion metrics [N] and batch counters."""

    rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)  # extra per-completion text for the sample table


class Reward(ABC):
    """A reward over a generation batch. `needs_policy_logprobs`: it consumes the policy's sampled-id log-probs."""

    needs_policy_logprobs: bool = False

    @abstractmethod
    def __call__(
        self, module: GRPOModule, rows: Sequence[dict], gen: GenerationOutput, policy_logprobs: Tensor | None
    ) -> RewardResult: ...


class TaskReward(Reward):
    """Verifiable reward: 1 if the benchmark's grader accepts the answer, else 0 (plus an optional format bonus).

    Args:
        task: the grader (e.g. `rlt_pl.tasks.countdown.CountdownTask`).
        format_reward: added when the completion contains an extractable answer.
    """

    def __init__(self, task: Task, format_reward: float = 0.0) -> None:
        self.task = task
        self.format_reward = format_reward

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        correct, formatted = [], []
        for row, text in zip(rows, gen.texts):
            answer, ok = self.task.grade(text, row)
            correct.append(float(ok))
            formatted.append(float(answer is not None))
        c, f = torch.tensor(correct), torch.tensor(formatted)
        return RewardResult(c + self.format_reward * f, {"accuracy": c, "formatted": f})


__all__ = ["Reward", "RewardResult", "TaskReward"]
