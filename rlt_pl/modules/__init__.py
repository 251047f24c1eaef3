"""LightningModules: GRPO (task rewards), the RLT teacher (RL with the student's reward), SFT (teacher warm-up and
student distillation). YAML may name them by the short path, e.g. ``class_path: rlt_pl.modules.TeacherRLModule``.

Names resolve on first access (PEP 562): ``rlt_pl.callbacks`` and these modules import each other's submodules, and a
lazy package lets either be imported first in a fresh interpreter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlt_pl.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
