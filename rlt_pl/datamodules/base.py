"""Shared base of every dataset DataModule: load (Hub or local file), normalise rows, report malformed rows, serve
lists of row dicts (row schema and readers: ``loading.py``; samplers: ``samplers.py``; loader: ``loader.py``).

Hub data is fetched only in ``prepare_data`` (``datasets`` caches it; ``setup`` reads the cache). A local
``data_path`` (.json / .jsonl / .parquet, in the dataset's public schema) bypasses the Hub, which is what the tests use.
Malformed rows never crash deep inside a run and are never dropped silently: ``normalize`` raises ``RowError``, the
row is skipped, recorded in ``invalid_rows`` as ``(id, reason)`` and summarised in one warning.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from rlt_pl.datamodules.loader import is_padding, resumable_loader
from rlt_pl.datamodules.loading import RowError, nfc_row, read_local_rows
from rlt_pl.tasks.base import Task

__all__ = ["RowDataModule", "Stage", "is_padding"]

log = logging.getLogger(__name__)

Stage = Literal["train", "val", "test", "predict"]
_REPORT_IDS = 10


class RowDataModule(LightningDataModule):
    """Base DataModule over normalised rows; subclasses set the Hub id and implement ``normalize``.

    Args:
        data_path: Local .json/.jsonl/.parquet file in the dataset's public schema; ``None`` loads from the Hub.
        batch_size: Rows per batch.
        num_workers: DataLoader workers.
        limit: Use only the first ``limit`` raw rows (before normalisation); ``None`` uses all.
        seed: Seed of the train shuffle and of the val/test carving.
        val_size: Rows carved (after a seeded shuffle) into the ``"val"`` split.
        test_size: Rows carved into the ``"test"`` split; the remaining rows form ``"train"``.
        stage_splits: Which split (``train``/``val``/``test``/``all``) feeds each stage's dataloader; a stage that is
            absent has no dataloader.
        hf_path: Override of the Hub dataset id.
    """

    name: str = "rows"
    default_hf_path: str = ""
    hf_subset: str | None = None
    hf_split: str = "train"

    def __init__(
        self,
        data_path: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        seed: int = 0,
        val_size: int = 0,
        test_size: int = 0,
        stage_splits: dict[str, str] | None = None,
        hf_path: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.init_args.num_workers must be >= 0, got {num_workers}")
        if limit is not None and limit < 1:
            raise ValueError(f"data.init_args.limit must be >= 1 or null, got {limit}")
        if val_size < 0 or test_size < 0:
            raise ValueError(f"data.init_args.val_size/test_size must be >= 0, got {val_size}/{test_size}")
        self.data_path = data_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limit = limit
        self.seed = seed
        self.val_size = val_size
        self.test_size = test_size
        self.stage_splits: dict[str, str] = dict(stage_splits or self.default_stage_splits())
        for stage, split in self.stage_splits.items():
            if stage not in ("train", "val", "test", "predict") or split not in ("train", "val", "test", "all"):
                raise ValueError(f"data.init_args.stage_splits: bad entry {stage!r}: {split!r}")
        self.hf_path = hf_path or self.default_hf_path
        self.task: Task = self.build_task()
        self.rows: list[dict] | None = None
        self.splits: dict[str, list[dict]] = {}
        self.invalid_rows: list[tuple[str, str]] = []
        self.nfc_normalized = 0
        self.num_raw_rows = 0

    # ----------------------------------------------------------------------------------------- subclass hooks
    def build_task(self) -> Task:
        """The grader of this dataset."""
        raise NotImplementedError

    def default_stage_splits(self) -> dict[str, str]:
        """Benchmarks evaluate on all rows in val/test/predict."""
        return {"val": "all", "test": "all", "predict": "all"}

    def normalize(self, raw: dict, index: int) -> dict:
        """Turn a raw row into the common schema or raise ``RowError(reason)``.

        Args:
            raw: One raw row (a dict in the public schema).
            index: Its position in the raw data.
        """
        raise NotImplementedError

    def raw_id(self, raw: object, index: int) -> str:
        """Id used when reporting a malformed row (before it could be normalised).

        Args:
            raw: The raw row (may be anything).
            index: Its position.
        """
        return f"{self.name}-{index}"

    def load_hub_rows(self) -> list:
        """Load the Hub split as a list of dicts (cached by ``datasets`` after ``prepare_data``)."""
        from datasets import load_dataset

        return load_dataset(self.hf_path, self.hf_subset, split=self.hf_split).to_list()

    # ------------------------------------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        """Download the Hub dataset into the ``datasets`` cache (no-op with ``data_path``)."""
        if self.data_path is None:
            self.load_hub_rows()

    def setup(self, stage: str | None = None) -> None:
        """Load, normalise and carve the rows once.

        Args:
            stage: Lightning stage (unused: all splits are built together).
        """
        if self.rows is not None:
            return
        raws = self._load_raw()
        if self.limit is not None:
            raws = raws[: self.limit]
        self.num_raw_rows = len(raws)
        rows, invalid, seen, nfc = [], [], set(), 0
        for index, raw in enumerate(raws):
            rid = self.raw_id(raw, index)
            try:
                if isinstance(raw, RowError):
                    raise raw
                if not isinstance(raw, dict):
                    raise RowError(f"row is {type(raw).__name__}, expected an object")
                row = self.normalize(raw, index)
                rid = row["id"]
                row, changed = nfc_row(row)
                rid = row["id"]
                if rid in seen:
                    raise RowError("duplicate id")
            except RowError as err:
                invalid.append((rid, str(err)))
                continue
            nfc += changed
            seen.add(rid)
            rows.append(row)
        self.rows, self.invalid_rows, self.nfc_normalized = rows, invalid, nfc
        if nfc:
            log.info("%s: NFC-normalised the text of %d rows", self.name, nfc)
        if invalid:
            shown = ", ".join(f"{i} ({r})" for i, r in invalid[:_REPORT_IDS])
            more = f" and {len(invalid) - _REPORT_IDS} more" if len(invalid) > _REPORT_IDS else ""
            rank_zero_warn(f"{self.name}: skipped {len(invalid)} of {len(raws)} malformed rows: {shown}{more}")
        log.info("%s: %d valid rows of %d", self.name, len(rows), len(raws))
        self.splits = self._carve(rows)

    def _load_raw(self) -> list:
        if self.data_path is None:
            return self.load_hub_rows()
        path = Path(self.data_path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: data.init_args.data_path {self.data_path!r} ({path}) does not exist")
        return read_local_rows(path)

    def _carve(self, rows: list[dict]) -> dict[str, list[dict]]:
        if self.val_size + self.test_size > len(rows) or (
            self.val_size + self.test_size == len(rows) and "train" in self.stage_splits.values()
        ):
            raise ValueError(
                f"{self.name}: val_size={self.val_size} + test_size={self.test_size} leave no training rows "
                f"out of {len(rows)} valid rows"
            )
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        val = [rows[i] for i in sorted(order[: self.val_size])]
        test = [rows[i] for i in sorted(order[self.val_size : self.val_size + self.test_size])]
        train = [rows[i] for i in sorted(order[self.val_size + self.test_size :])]
        return {"train": train, "val": val, "test": test, "all": rows}

    # ---------------------------------------------------------------------------------------------- loaders
    def rows_for(self, stage: Stage) -> list[dict]:
        """The rows that feed ``stage``.

        Args:
            stage: ``train``, ``val``, ``test`` or ``predict``.
        """
        if self.rows is None:
            raise RuntimeError(f"{self.name}: call setup() before asking for {stage} rows")
        if stage not in self.stage_splits:
            raise ValueError(f"{self.name}: no split feeds stage {stage!r}; set data.init_args.stage_splits")
        rows = self.splits[self.stage_splits[stage]]
        if not rows:
            raise ValueError(f"{self.name}: split {self.stage_splits[stage]!r} for stage {stage!r} is empty")
        return rows

    def _loader(self, stage: Stage, shuffle: bool) -> DataLoader:
        return resumable_loader(self.rows_for(stage), self.batch_size, self.seed, shuffle, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) batches of training rows."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of validation rows in order; ``[]`` (no validation, sanity check included) when no split feeds
        ``val`` (e.g. a training set with ``val_size: 0``)."""
        if "val" not in self.stage_splits:
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of test rows in order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of prediction rows in order."""
        return self._loader("predict", shuffle=False)

    # ---------------------------------------------------------------------------------------------- logging
    def data_stats(self) -> dict[str, float]:
        """``data/<name>/rows``, ``invalid_rows``, ``nfc_normalized`` (rows whose text NFC changed), ``raw_rows``."""
        return {
            f"data/{self.name}/rows": float(len(self.rows or [])),
            f"data/{self.name}/invalid_rows": float(len(self.invalid_rows)),
            f"data/{self.name}/nfc_normalized": float(self.nfc_normalized),
            f"data/{self.name}/raw_rows": float(self.num_raw_rows),
        }

    def log_data_stats(self, pl_module: LightningModule) -> dict[str, float]:
        """Send ``data_stats()`` to the module's logger (callable from any hook, e.g. ``on_fit_start``).

        Args:
            pl_module: The LightningModule whose logger receives the stats.
        """
        stats = self.data_stats()
        if pl_module.logger is not None:
            pl_module.logger.log_metrics(stats, step=pl_module.global_step)
        return stats
