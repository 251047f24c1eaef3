"""AIME 2024 (``HuggingFaceH4/aime_2024``, split ``train``, 30 problems).

Public schema checked on the Hub card: ``id`` (int64), ``problem``, ``solution``, ``answer`` (string), ``url``,
``year`` (string). It is the 2024 subset of ``AI-MO/aimo-validation-aime``, which SkyThought filters the same way
(arXiv 2506.08388); pass ``hf_path="AI-MO/aimo-validation-aime"`` with ``year="2024"`` to use that source instead.
"""

from __future__ import annotations

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import RowError, make_row, require_str
from rlt_pl.tasks.math import MathTask


class AIME24DataModule(RowDataModule):
    """AIME 2024 rows; answers are integers 0–999 stored as strings.

    Args:
        year: Keep only rows whose ``year`` (or ``url``) mentions this year; ``None`` keeps all. Rows filtered out
            this way are not counted as malformed.
        timeout_seconds: math_verify time limit per comparison.
        **kwargs: `RowDataModule` arguments (data_path, batch_size, seed, stage_splits, hf_path, ...).
    """

    name = "aime24"
    default_hf_path = "HuggingFaceH4/aime_2024"
    hf_split = "train"

    def __init__(self, year: str | None = None, timeout_seconds: int = 5, **kwargs) -> None:
        self.year = year
        self.timeout_seconds = timeout_seconds
        super().__init__(**kwargs)

    def build_task(self) -> MathTask:
        """Math grader named ``aime24``."""
        return MathTask(name=self.name, timeout_seconds=self.timeout_seconds)

    def _load_raw(self) -> list:
        raws = super()._load_raw()
        if self.year is None:
            return raws
        return [r for r in raws if not isinstance(r, dict) or self.year in f"{r.get('year', '')} {r.get('url', '')}"]

    def raw_id(self, raw: object, index: int) -> str:
        """``aime24-<id>`` when the row has an id, else ``aime24-<index>``.

        Args:
            raw: Raw row.
            index: Position.
        """
        if isinstance(raw, dict) and isinstance(raw.get("id"), int | str) and str(raw["id"]).strip():
            return f"{self.name}-{raw['id']}"
        return super().raw_id(raw, index)

    def normalize(self, raw: dict, index: int) -> dict:
        """Map an AIME row to the common schema.

        Args:
            raw: Hub row.
            index: Position.
        """
        if "id" not in raw or isinstance(raw["id"], bool) or not isinstance(raw["id"], int | str):
            raise RowError("missing or non-int/str field 'id'")
        answer = raw.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        answer = require_str({"answer": answer}, "answer").strip()
        return make_row(
            id=self.raw_id(raw, index),
            question=require_str(raw, "problem"),
            answer=answer,
            solution=require_str(raw, "solution", allow_empty=True) or answer,
            metadata={"year": str(raw.get("year", "")), "url": str(raw.get("url", ""))},
        )
