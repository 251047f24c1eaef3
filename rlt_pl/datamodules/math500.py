"""MATH-500 (``HuggingFaceH4/MATH-500``, split ``test``): 500 MATH problems; subject/level kept for breakdowns."""

from __future__ import annotations

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import RowError, make_row, require_str
from rlt_pl.tasks.math import MathTask


class MATH500DataModule(RowDataModule):
    """MATH-500 benchmark rows (fields ``problem, solution, answer, subject, level, unique_id``).

    Args:
        timeout_seconds: math_verify time limit per comparison.
        **kwargs: `RowDataModule` arguments (data_path, batch_size, seed, stage_splits, hf_path, ...).
    """

    name = "math500"
    default_hf_path = "HuggingFaceH4/MATH-500"
    hf_split = "test"

    def __init__(self, timeout_seconds: int = 5, **kwargs) -> None:
        self.timeout_seconds = timeout_seconds
        super().__init__(**kwargs)

    def build_task(self) -> MathTask:
        """Math grader named ``math500``."""
        return MathTask(name=self.name, timeout_seconds=self.timeout_seconds)

    def raw_id(self, raw: object, index: int) -> str:
        """``unique_id`` when it is a string, else ``math500-<index>``.

        Args:
            raw: Raw row.
            index: Position.
        """
        if isinstance(raw, dict) and isinstance(raw.get("unique_id"), str) and raw["unique_id"]:
            return raw["unique_id"]
        return super().raw_id(raw, index)

    def normalize(self, raw: dict, index: int) -> dict:
        """Map a MATH-500 row to the common schema.

        Args:
            raw: Hub row.
            index: Position.
        """
        level = raw.get("level")
        if level is not None and (isinstance(level, bool) or not isinstance(level, int | str)):
            raise RowError(f"field 'level' is {type(level).__name__}, expected int")
        subject = raw.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise RowError(f"field 'subject' is {type(subject).__name__}, expected str")
        answer = require_str(raw, "answer").strip()
        return make_row(
            id=require_str(raw, "unique_id"),
            question=require_str(raw, "problem"),
            answer=answer,
            solution=require_str(raw, "solution", allow_empty=True) or answer,
            metadata={"subject": subject, "level": level},
        )
