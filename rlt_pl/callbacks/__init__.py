"""Callbacks: the frozen-student reward, reference-model sync, trace writing."""

from rlt_pl.callbacks.ref_sync import ReferenceSyncCallback
from rlt_pl.callbacks.student_reward import StudentRewardCallback

__all__ = ["ReferenceSyncCallback", "StudentRewardCallback"]
