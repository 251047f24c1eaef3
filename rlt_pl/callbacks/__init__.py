"""Callbacks: the frozen-student reward, reference-model sync, trace writing, atomic checkpoints. YAML may name them
by the short path, e.g. ``class_path: rlt_pl.callbacks.StudentRewardCallback``.

Names resolve on first access (PEP 562): ``rlt_pl.modules`` and these callbacks import each other's submodules, and a
lazy package lets either be imported first in a fresh interpreter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlt_pl.lazy import lazy_exports

_EXPORTS = {
    "AtomicModelCheckpoint": "rlt_pl.callbacks.checkpoint",
    "ReferenceSyncCallback": "rlt_pl.callbacks.ref_sync",
    "StudentRewardCallback": "rlt_pl.callbacks.student_reward",
    "TraceWriter": "rlt_pl.callbacks.trace_writer",
}

__all__ = [
    "AtomicModelCheckpoint",
    "ReferenceSyncCallback",
    "StudentRewardCallback",
    "TraceWriter",
]

if TYPE_CHECKING:
    from rlt_pl.callbacks.checkpoint import AtomicModelCheckpoint
    from rlt_pl.callbacks.ref_sync import ReferenceSyncCallback
    from rlt_pl.callbacks.student_reward import StudentRewardCallback
    from rlt_pl.callbacks.trace_writer import TraceWriter


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
