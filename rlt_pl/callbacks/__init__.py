"""Callbacks: the frozen-student reward, reference-model sync, trace writing, atomic checkpoints. YAML may name them
by the short path, e.g. ``class_path: rlt_pl.callbacks.StudentRewardCallback``.

Names resolve on first access (PEP 562): ``rlt_pl.modules`` and these callbacks import each other's submodules, and a
lazy package lets either be imported first in a fresh interpreter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
