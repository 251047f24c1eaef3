"""Distillation data: teacher traces (JSONL shards from `TraceWriter`, a JSONL/JSON/Parquet file, or any Hub
dataset in the same schema: id, question, solution, thought, answer), with evaluation delegated to a benchmark
DataModule (`eval_data`) so one `fit` both distils and reports held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loader import resumable_loader
from rlt_pl.datamodules.loading import RowError, read_local_rows, require_str
from rlt_pl.datamodules.multi import MultiBenchmarkDataModule
from rlt_pl.tasks.base import Task


class TracesDataModule(RowDataModule):
    """Reasoning traces for student distillation.

    Args:
        data_path: a directory of `shard-*.jsonl` files or a single file.
        eval_data: benchmark DataModule (or several in a MultiBenchmarkDataModule) whose val/test loaders and
            graders are used for evaluation.
        batch_size: rows per batch.
        seed: shuffle seed.
        answer_only: drop the thought (answer-only baseline: question → solution).
        length_bucketing: batch traces of similar length together (less padding; order still seeded/resumable).
        hf_path: load from the Hub instead (same schema, split `train`).
    """

    name = "traces"

    def __init__(
        self,
        data_path: str | None = None,
        eval_data: RowDataModule | MultiBenchmarkDataModule | None = None,
        batch_size: int = 8,
        seed: int = 0,
        answer_only: bool = False,
        length_bucketing: bool = False,
        hf_path: str | None = None,
        limit: int | None = None,
    ) -> None:
        if data_path is None and hf_path is None:
            raise ValueError("data.init_args: give data_path (trace shards) or hf_path")
        self.eval_data = eval_data
        self.answer_only = answer_only
        self.length_bucketing = length_bucketing
        self.missing_thought: list[str] = []  # ids of traces without a thought (they train answer-only)
        self._id_kinds: dict[str, str] = {}
        super().__init__(
            data_path=data_path,
            batch_size=batch_size,
            seed=seed,
            hf_path=hf_path,
            limit=limit,
            stage_splits={"train": "all"},
        )

    def build_task(self) -> Task | None:
        return self.eval_data.task if isinstance(self.eval_data, RowDataModule) else None

    def _load_raw(self) -> list:
        if self.data_path is None:
            return self.load_hub_rows()
        path = Path(self.data_path).expanduser().resolve()
        if path.is_dir():
            shards = sorted(path.glob("shard-*.jsonl"))
            if not shards:
                raise FileNotFoundError(f"traces: no shard-*.jsonl files in {path}")
            return [row for shard in shards for row in read_local_rows(shard)]
        return super()._load_raw()

    def normalize(self, raw: dict, index: int) -> dict:
        thought = raw.get("thought")
        if thought is not None and not isinstance(thought, str):
            raise RowError("field 'thought' must be a string")
        if "id" in raw and raw["id"] is None:
            raise RowError("id is null")
        rid = raw.get("id", f"trace-{index}")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise RowError(f"id is {type(rid).__name__}, expected a string or an integer")
        kinds = self._id_kinds.setdefault(str(rid), type(rid).__name__)
        if kinds != type(rid).__name__:
            raise RowError(f"id {rid!r} ({type(rid).__name__}) collides with id {str(rid)!r} ({kinds}) as text")
        metadata = raw.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise RowError(f"field 'metadata' is {type(metadata).__name__}, expected an object")
        answer = "" if raw.get("answer") is None else raw["answer"]
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise RowError(f"field 'answer' is {type(answer).__name__}, expected a string or a number")
        if not self.answer_only and not (thought or "").strip():
            self.missing_thought.append(str(rid))
        row = {
            "id": str(rid),
            "question": require_str(raw, "question"),
            "solution": require_str(raw, "solution"),
            "answer": str(answer),
            "thought": "" if self.answer_only else (thought or ""),
            "metadata": metadata or {},
        }
        return row

    def setup(self, stage: str | None = None) -> None:
        if self.rows is None:
            self._id_kinds = {}
            self.missing_thought = []
        super().setup(stage)
        if self.missing_thought:
            shown = ", ".join(self.missing_thought[:10])
            rank_zero_warn(
                f"traces: {len(self.missing_thought)} rows have no thought and train answer-only: {shown}"
                + (" ..." if len(self.missing_thought) > 10 else "")
            )
        if self.eval_data is not None:
            self.eval_data.setup(stage)

    def data_stats(self) -> dict[str, float]:
        """The base stats plus ``data/traces/missing_thought`` (rows that train answer-only)."""
        stats = super().data_stats()
        stats["data/traces/missing_thought"] = float(len(self.missing_thought))
        return stats

    def train_dataloader(self):
        rows = self.rows_for("train")
        lengths = [len(r["question"]) + len(r["thought"] or "") + len(r["solution"]) for r in rows]
        return resumable_loader(
            rows,
            self.batch_size,
            self.seed,
            num_workers=self.num_workers,
            lengths=lengths if self.length_bucketing else None,
        )

    def val_dataloader(self):
        if self.eval_data is None:
            return []
        return self.eval_data.val_dataloader()

    def test_dataloader(self):
        if self.eval_data is None:
            raise ValueError("traces: testing needs data.init_args.eval_data (a benchmark DataModule)")
        return self.eval_data.test_dataloader()
