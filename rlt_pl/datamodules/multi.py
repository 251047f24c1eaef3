"""Several benchmark DataModules evaluated in one ``validate``/``test``/``predict`` run (one dataloader each).

Lightning passes ``dataloader_idx`` to the step hooks; ``name_for(idx)`` / ``task_for(idx)`` map it back to the
benchmark, so metrics can be logged as ``test/<name>/pass@1``.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.tasks.base import Task


class MultiBenchmarkDataModule(LightningDataModule):
    """Wraps benchmark DataModules; evaluation stages return one dataloader per benchmark, in the given order.

    Args:
        datamodules: The benchmarks (distinct ``name`` each).
    """

    def __init__(self, datamodules: list[RowDataModule]) -> None:
        super().__init__()
        if not datamodules:
            raise ValueError("data.init_args.datamodules must name at least one benchmark")
        names = [dm.name for dm in datamodules]
        if len(set(names)) != len(names):
            raise ValueError(f"data.init_args.datamodules: benchmark names must be distinct, got {names}")
        self.datamodules = list(datamodules)
        self.names = names
        self.name = "+".join(names)

    def name_for(self, dataloader_idx: int) -> str:
        """Benchmark name of a dataloader index.

        Args:
            dataloader_idx: Index Lightning passes to the step hooks.
        """
        return self.datamodules[dataloader_idx].name

    def task_for(self, dataloader_idx: int) -> Task:
        """Grader of a dataloader index.

        Args:
            dataloader_idx: Index Lightning passes to the step hooks.
        """
        return self.datamodules[dataloader_idx].task

    def prepare_data(self) -> None:
        """Prepare every benchmark."""
        for dm in self.datamodules:
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Set up every benchmark.

        Args:
            stage: Lightning stage.
        """
        for dm in self.datamodules:
            dm.setup(stage)

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader per benchmark."""
        return [dm.val_dataloader() for dm in self.datamodules]

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader per benchmark."""
        return [dm.test_dataloader() for dm in self.datamodules]

    def predict_dataloader(self) -> list[DataLoader]:
        """One predict loader per benchmark."""
        return [dm.predict_dataloader() for dm in self.datamodules]

    def log_data_stats(self, pl_module: LightningModule) -> dict[str, float]:
        """Log every benchmark's data stats.

        Args:
            pl_module: Module whose logger receives them.
        """
        stats: dict[str, float] = {}
        for dm in self.datamodules:
            stats.update(dm.log_data_stats(pl_module))
        return stats
