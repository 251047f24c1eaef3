"""Samplers whose order depends only on ``(seed, epoch)``: a plain seeded shuffle split across ranks by global
batch, and a length-bucketing variant, so a resumed run can rebuild any epoch's order."""

from __future__ import annotations

from torch.utils.data import DistributedSampler, Sampler


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
