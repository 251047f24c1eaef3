"""LightningModules: GRPO (task rewards), the RLT teacher (RL with the student's reward), SFT (teacher warm-up and
student distillation). YAML may name them by the short path, e.g. ``class_path: rlt_pl.modules.TeacherRLModule``.

Names resolve on first access (PEP 562): ``rlt_pl.callbacks`` and these modules import each other's submodules, and a
lazy package lets either be imported first in a fresh interpreter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "CausalLMModule": "rlt_pl.modules.base",
    "GRPOModule": "rlt_pl.modules.grpo",
    "Reward": "rlt_pl.modules.grpo",
    "RewardResult": "rlt_pl.modules.grpo",
    "TaskReward": "rlt_pl.modules.grpo",
    "RLTReward": "rlt_pl.modules.teacher_rl",
    "TeacherRLModule": "rlt_pl.modules.teacher_rl",
    "SFTModule": "rlt_pl.modules.sft",
    "StudentDistillModule": "rlt_pl.modules.sft",
    "TeacherSFTModule": "rlt_pl.modules.sft",
}

__all__ = [
    "CausalLMModule",
    "GRPOModule",
    "RLTReward",
    "Reward",
    "RewardResult",
    "SFTModule",
    "StudentDistillModule",
    "TaskReward",
    "TeacherRLModule",
    "TeacherSFTModule",
]

if TYPE_CHECKING:
    from rlt_pl.modules.base import CausalLMModule
    from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult, TaskReward
    from rlt_pl.modules.sft import SFTModule, StudentDistillModule, TeacherSFTModule
    from rlt_pl.modules.teacher_rl import RLTReward, TeacherRLModule


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
