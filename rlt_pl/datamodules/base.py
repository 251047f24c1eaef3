"""Shared base of every dataset DataModule: load (Hub or local file), normalise rows, report malformed rows, serve
lists of row dicts.

Row schema (every DataModule yields it)::

    {"id": str, "question": str, "answer": str, "solution": str, "thought": str | None, "metadata": dict}

Hub data is fetched only in ``prepare_data`` (``datasets`` caches it; ``setup`` reads the cache). A local
``data_path`` (.json / .jsonl / .parquet, in the dataset's public schema) bypasses the Hub, which is what the tests use.
Malformed rows never crash deep inside a run and are never dropped silently: ``normalize`` raises ``RowError``, the
row is skipped, recorded in ``invalid_rows`` as ``(id, reason)`` and summarised in one warning.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rlt_pl.distributed import world
from rlt_pl.spans import nfc_text
from rlt_pl.tasks.base import Task

log = logging.getLogger(__name__)

Stage = Literal["train", "val", "test", "predict"]
_REPORT_IDS = 10


class RowError(ValueError):
    """A raw row cannot be normalised; the message is the reason that gets reported."""


def require_str(raw: dict, key: str, allow_empty: bool = False) -> str:
    """Fetch ``raw[key]`` as a string or raise ``RowError`` naming the field.

    Args:
        raw: Raw row.
        key: Field name.
        allow_empty: Accept empty / whitespace-only strings.
    """
    if key not in raw or raw[key] is None:
        raise RowError(f"missing field {key!r}")
    value = raw[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} is {type(value).__name__}, expected str")
    if not allow_empty and not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def make_row(
    id: str, question: str, answer: str, solution: str, thought: str | None = None, metadata: dict | None = None
) -> dict:
    """Build a row in the common schema.

    Args:
        id: Unique row id.
        question: Question text as stored in the dataset.
        answer: Gradeable ground truth.
        solution: Reference solution text (or the answer).
        thought: Reference reasoning, if any.
        metadata: Extra per-row facts (subject, level, options, ...).
    """
    return {
        "id": id,
        "question": question,
        "answer": answer,
        "solution": solution,
        "thought": thought,
        "metadata": metadata or {},
    }


def parse_jsonl_line(line: bytes, lineno: int) -> object:
    """One JSONL line -> the decoded value, or a ``RowError`` saying why it cannot be read (invalid UTF-8, bad JSON,
    nesting too deep, an integer beyond Python's digit limit) so one bad line is reported, never fatal.

    Args:
        line: the raw bytes of the line.
        lineno: its 1-based number (for the message).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RowError(f"line {lineno} is not valid UTF-8 (byte {err.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return RowError(f"line {lineno} is not valid JSON: {err.msg}")
    except RecursionError:
        return RowError(f"line {lineno} is not valid JSON: nested too deeply")
    except ValueError as err:
        return RowError(f"line {lineno} is not valid JSON: {err}")


def nfc_row(row: dict) -> tuple[dict, bool]:
    """NFC-normalise a common-schema row's text (top-level strings and string metadata values).

    Returns the row and whether anything changed. Raises ``RowError`` for a string that is not valid Unicode text
    (a lone surrogate from a ``\\udXXX`` escape), which would crash a tokenizer later.

    Args:
        row: a normalised row.
    """
    changed = False

    def fix(key: str, value: object) -> object:
        nonlocal changed
        if not isinstance(value, str):
            return value
        try:
            nfc = nfc_text(key, value)
        except ValueError as err:
            raise RowError(str(err)) from err
        changed |= nfc != value
        return nfc

    out = {k: fix(k, v) for k, v in row.items()}
    if isinstance(out.get("metadata"), dict):
        out["metadata"] = {k: fix(f"metadata.{k}", v) for k, v in out["metadata"].items()}
    return out, changed


def read_local_rows(path: Path) -> list:
    """Read raw rows from a .json (list of objects, or ``{"data": [...]}``), .jsonl or .parquet file.

    Undecodable JSONL lines are returned as ``RowError`` instances so they are reported, not dropped.

    Args:
        path: Existing file.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out: list = []
        for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            out.append(parse_jsonl_line(line, lineno))
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError) as err:
            raise ValueError(f"data.init_args.data_path {str(path)!r} is not a readable JSON file: {err}") from err
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data_path suffix {suffix!r} (use .json, .jsonl or .parquet)")


PADDING_KEY = "_padding"


def is_padding(row: dict) -> bool:
    """Whether `row` is a duplicate that only keeps the ranks' batch counts equal (evaluation must skip it)."""
    return bool(row.get(PADDING_KEY, False))


class _Rows(Dataset):
    """A list of row dicts as a map-style dataset; index `len + i` is a padding copy of row `i` (`is_padding`)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if index >= len(self.rows):
            return {**self.rows[index - len(self.rows)], PADDING_KEY: True}
        return self.rows[index]


def collate_rows(batch: list[dict]) -> list[dict]:
    """Keep a batch as the list of row dicts.

    Args:
        batch: Rows picked by the sampler.
    """
    return list(batch)


class EpochShuffleSampler(DistributedSampler):
    """Seeded shuffle whose order depends only on ``(seed, epoch)``, so a resumed run can rebuild any epoch's order.

    Epoch 0 gives the same order as ``RandomSampler`` with a ``Generator`` seeded ``seed``. Lightning calls
    ``set_epoch`` before each epoch.

    With several ranks the global order is cut into global batches of ``global_batch`` rows and rank ``r`` takes
    the ``r``-th slice of each (rows ``[r·b, (r+1)·b)`` with ``b = global_batch / num_replicas``), so the ranks
    together see exactly the single-process batches. An incomplete last global batch is filled with padding copies
    (``is_padding``: training uses them like Lightning's ``DistributedSampler`` does; evaluation skips them). It is
    a ``DistributedSampler``, so Lightning does not wrap it in another one.

    Args:
        num_rows: Dataset length.
        seed: Shuffle seed.
        shuffle: ``False`` yields ``0..num_rows-1`` in order.
        num_replicas: Number of ranks sharing each global batch.
        rank: This rank.
        global_batch: Rows per global batch (all ranks); needed when ``num_replicas > 1``.
    """

    def __init__(
        self,
        num_rows: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        global_batch: int | None = None,
    ) -> None:
        Sampler.__init__(self)
        self.num_rows, self.seed, self.shuffle, self.epoch = num_rows, seed, shuffle, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.global_batch = global_batch or num_replicas
        if self.global_batch % num_replicas:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {num_replicas} ranks")
        self.drop_last = False

    def _global_order(self) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def _padded_len(self) -> int:
        b = self.global_batch
        return -(-self.num_rows // b) * b if self.num_replicas > 1 else self.num_rows

    def _rank_slice(self, order: list[int]) -> list[int]:
        if self.num_replicas == 1:
            return order
        total = self._padded_len()
        order = order + [self.num_rows + order[j % len(order)] for j in range(total - len(order))]
        b, local = self.global_batch, self.global_batch // self.num_replicas
        lo = self.rank * local
        return [i for start in range(0, total, b) for i in order[start + lo : start + lo + local]]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields.

        Args:
            epoch: Epoch number (0-based).
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return self._padded_len() // self.num_replicas

    def __iter__(self):
        return iter(self._rank_slice(self._global_order()))


class LengthBucketSampler(EpochShuffleSampler):
    """Seeded shuffle, then rows of similar length grouped into the same batch (less padding, faster SFT).

    Each window of ``batch_size * window_batches`` shuffled rows is sorted by length and cut into batches, and the
    batches of the epoch are shuffled. The order still depends only on ``(seed, epoch)``, so resume stays exact.

    Args:
        lengths: Per-row length (any proxy, e.g. characters).
        batch_size: The loader's batch size.
        seed: Shuffle seed.
        window_batches: Batches per sorting window (larger: less padding, less randomness).
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        window_batches: int = 32,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(len(lengths), seed, True, num_replicas, rank, batch_size)
        self.lengths, self.batch_size, self.window = lengths, batch_size, batch_size * window_batches

    def __iter__(self):
        return iter(self._rank_slice(self._global_order()))

    def _global_order(self) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=lambda i: self.lengths[i])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) < self.batch_size]  # kept last so batching stays aligned
        perm = torch.randperm(len(full), generator=generator).tolist()
        return [i for k in perm for i in full[k]] + [i for b in partial for i in b]


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch (it is ``_Stateful``: ``state_dict``/``load_state_dict``).

    The state is ``{"epoch", "batches"}``: the batches handed out in the current epoch. It counts batches leaving the
    loader's iterator, which Lightning's fetcher does not prefetch for sized loaders, so at a checkpoint it equals
    the batches consumed (worker prefetching happens below this count). On resume the next iteration of the same
    epoch skips that many batches of the epoch's (reproducible) order; rows are in memory, so skipping is cheap.
    Needs a sampler whose order depends only on the epoch (``EpochShuffleSampler``).
    """

    _epoch: int = 0
    _batches: int = 0
    _skip: tuple[int, int] | None = None  # (epoch, batches) restored from a checkpoint, applied once

    def _sampler_epoch(self) -> int:
        return self.sampler.epoch if isinstance(self.sampler, EpochShuffleSampler) else 0  # incl. LengthBucketSampler

    def __iter__(self):
        return self._counted(super().__iter__())

    def _counted(self, iterator):
        epoch, skip = self._sampler_epoch(), 0
        if self._skip is not None and self._skip[0] == epoch and self._skip[1] < len(self):
            skip = self._skip[1]
        self._skip = None
        for _ in range(skip):
            next(iterator)
        self._epoch, self._batches = epoch, skip
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches handed out in it (saved by Lightning in ``loops.fit_loop.state_dict.combined_loader``)."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume: the next iteration of the saved epoch starts after the saved number of batches.

        Args:
            state_dict: Output of ``state_dict``.
        """
        if set(state_dict) != {"epoch", "batches"}:
            raise ValueError(f"ResumableDataLoader: unexpected loader state {state_dict!r} in the checkpoint")
        self._skip = (int(state_dict["epoch"]), int(state_dict["batches"]))
        self._epoch, self._batches = self._skip


def resumable_loader(
    rows: list[dict],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    lengths: list[int] | None = None,
) -> ResumableDataLoader:
    """A DataLoader over rows that resumes mid-epoch at the right batch with the same shuffle.

    ``batch_size`` is the global batch: with several ranks (a torch.distributed process group) each rank's loader
    yields ``batch_size / world_size`` rows per batch (see ``EpochShuffleSampler``).

    Its ``generator`` (used by torch only for the workers' base seed) is seeded too, so creating an iterator never
    draws from torch's global RNG, which generation uses (exact resume restores that stream).

    Args:
        rows: Row dicts.
        batch_size: Rows per batch.
        seed: Shuffle seed.
        shuffle: Shuffle per epoch (``EpochShuffleSampler``) or keep the order.
        num_workers: DataLoader workers.
        lengths: per-row lengths: bucket rows of similar length into batches (`LengthBucketSampler`).
    """
    import torch

    rank, world_size = world()
    if batch_size % world_size:
        raise ValueError(
            f"data.init_args.batch_size={batch_size} is the global batch (all ranks together) and must be divisible "
            f"by the number of ranks ({world_size})"
        )
    if lengths is not None and shuffle:
        sampler = LengthBucketSampler(lengths, batch_size, seed, num_replicas=world_size, rank=rank)
    else:
        sampler = EpochShuffleSampler(len(rows), seed, shuffle, world_size, rank, batch_size)
    return ResumableDataLoader(
        _Rows(rows),
        batch_size=batch_size // world_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_rows,
        generator=torch.Generator().manual_seed(seed),
    )


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
