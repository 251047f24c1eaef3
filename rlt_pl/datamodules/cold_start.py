"""Data of the cold-start RL mode (paper §5, "RL cold-start"; not in the authors' repo, arXiv 2506.08388).

The mode: a student is first distilled on RLT traces (`StudentDistillModule`, with `export_dir`), then trained with
verifiable-reward GRPO on a benchmark (`GRPOModule` + `TaskReward`). The RL policy is the distilled student: set the
GRPO stage's `model.init_args.model.name_or_path` to the distill stage's `model.init_args.export_dir` (see
`configs/experiment/cold_start_countdown_*.yaml`).

`ColdStartDataModule` wraps one benchmark DataModule (e.g. synthetic `CountdownDataModule`): its `train` rows are the
GRPO prompts and its `val`/`test` rows the held-out evaluation. The wrapped module keeps loading, validation and
malformed-row reporting; this class only picks the splits, optionally caps the number of training prompts and
exposes the benchmark's grader as `task` (what `TaskReward` should be given).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loader import resumable_loader
from rlt_pl.tasks.base import Task


class ColdStartDataModule(LightningDataModule):
    """GRPO prompts from a benchmark's train split; evaluation on its val/test splits.

    Args:
        benchmark: the wrapped benchmark DataModule (its `stage_splits` must feed `train`, e.g. CountdownDataModule).
        num_train_prompts: use only the first N training rows as prompts (None: all).
        batch_size: prompts per GRPO step (None: the benchmark's `batch_size`).
        seed: shuffle seed of the training prompts (None: the benchmark's `seed`).
    """

    def __init__(
        self,
        benchmark: RowDataModule,
        num_train_prompts: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if "train" not in benchmark.stage_splits:
            raise ValueError(
                f"data.init_args.benchmark ({type(benchmark).__name__}) has no train split in its stage_splits "
                f"{benchmark.stage_splits}; cold-start RL needs training prompts"
            )
        if num_train_prompts is not None and num_train_prompts < 1:
            raise ValueError(f"data.init_args.num_train_prompts must be >= 1 or null, got {num_train_prompts}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1 or null, got {batch_size}")
        self.benchmark = benchmark
        self.num_train_prompts = num_train_prompts
        self.batch_size = batch_size if batch_size is not None else benchmark.batch_size
        self.seed = seed if seed is not None else benchmark.seed

    @property
    def name(self) -> str:
        """The benchmark's name (metric keys: `test/<name>/pass@1`)."""
        return self.benchmark.name

    @property
    def task(self) -> Task:
        """The benchmark's grader."""
        return self.benchmark.task

    def prepare_data(self) -> None:
        """Let the benchmark download (no-op for synthetic or local data)."""
        self.benchmark.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Load and carve the benchmark's rows.

        Args:
            stage: Lightning stage (passed through).
        """
        self.benchmark.setup(stage)

    def train_rows(self) -> list[dict]:
        """The GRPO prompts: the benchmark's train rows, capped at `num_train_prompts`."""
        rows = self.benchmark.rows_for("train")
        if self.num_train_prompts is not None:
            if self.num_train_prompts > len(rows):
                raise ValueError(
                    f"data.init_args.num_train_prompts={self.num_train_prompts} exceeds the {len(rows)} training "
                    f"rows of {self.benchmark.name}"
                )
            rows = rows[: self.num_train_prompts]
        return rows

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) batches of training prompts; resumes mid-epoch exactly (see RowDataModule)."""
        return resumable_loader(self.train_rows(), self.batch_size, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        """The benchmark's validation rows."""
        return self.benchmark.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The benchmark's test rows."""
        return self.benchmark.test_dataloader()

    def data_stats(self) -> dict[str, float]:
        """The benchmark's row counts plus `data/<name>/train_prompts`."""
        stats = self.benchmark.data_stats()
        stats[f"data/{self.name}/train_prompts"] = float(len(self.train_rows()))
        return stats

    def log_data_stats(self, pl_module: LightningModule) -> dict[str, float]:
        """Send `data_stats()` to the module's logger.

        Args:
            pl_module: The LightningModule whose logger receives the stats.
        """
        stats = self.data_stats()
        if pl_module.logger is not None:
            pl_module.logger.log_metrics(stats, step=pl_module.global_step)
        return stats
