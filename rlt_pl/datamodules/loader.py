"""The resumable DataLoader over lists of row dicts: Lightning checkpoints it mid-epoch and a resumed run skips the
batches already consumed; padding copies that even out the ranks' batch counts are marked (``is_padding``)."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from rlt_pl.datamodules.samplers import EpochShuffleSampler, LengthBucketSampler
from rlt_pl.distributed import world

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
