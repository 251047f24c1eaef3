"""Countdown (``Jiayi-Pan/Countdown-Tasks-3to4``, split ``train``: fields ``target``, ``nums``) or a fully offline
seeded synthetic set from ``generate_countdown``. Train/val/test are carved by a seeded shuffle (``val_size`` /
``test_size`` rows); ids are ``countdown-<index>`` in the source order, so they are stable for a given source.
"""

from __future__ import annotations

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import RowError, make_row
from rlt_pl.tasks.countdown import CountdownTask, format_countdown_question, generate_countdown


class CountdownDataModule(RowDataModule):
    """Countdown problems; ``answer`` is the target as a string, ``metadata`` holds ``nums`` and ``target``.

    Args:
        data_path: Local file in the Hub schema instead of the Hub (ignored when ``synthetic``).
        batch_size: Rows per batch.
        num_workers: DataLoader workers.
        limit: Use only the first ``limit`` raw rows.
        seed: Seed of the carving, the train shuffle and the synthetic generator.
        val_size: Rows carved into ``val``.
        test_size: Rows carved into ``test``.
        stage_splits: Stage → split mapping (default train/val/test/predict=test).
        hf_path: Override of the Hub id.
        synthetic: Generate problems offline instead of loading a dataset.
        num_examples: Synthetic problems to generate.
        num_numbers: Numbers per synthetic problem.
        max_number: Synthetic numbers are drawn from ``1..max_number``.
        max_expression_chars: Grader's limit on answer length.
    """

    name = "countdown"
    default_hf_path = "Jiayi-Pan/Countdown-Tasks-3to4"
    hf_split = "train"

    def __init__(
        self,
        data_path: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        seed: int = 0,
        val_size: int = 128,
        test_size: int = 512,
        stage_splits: dict[str, str] | None = None,
        hf_path: str | None = None,
        synthetic: bool = False,
        num_examples: int = 4096,
        num_numbers: int = 3,
        max_number: int = 20,
        max_expression_chars: int = 200,
    ) -> None:
        if synthetic and (num_examples < 1 or num_numbers < 2 or max_number < 1):
            raise ValueError("data.init_args: synthetic countdown needs num_examples>=1, num_numbers>=2, max_number>=1")
        self.synthetic = synthetic
        self.num_examples = num_examples
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.max_expression_chars = max_expression_chars
        super().__init__(
            data_path=data_path,
            batch_size=batch_size,
            num_workers=num_workers,
            limit=limit,
            seed=seed,
            val_size=val_size,
            test_size=test_size,
            stage_splits=stage_splits,
            hf_path=hf_path,
        )

    def build_task(self) -> CountdownTask:
        """Countdown grader."""
        return CountdownTask(name=self.name, max_expression_chars=self.max_expression_chars)

    def default_stage_splits(self) -> dict[str, str]:
        """Carved train/val/test; predict on test."""
        return {"train": "train", "val": "val", "test": "test", "predict": "test"}

    def prepare_data(self) -> None:
        """Download the Hub data unless synthetic or local."""
        if not self.synthetic:
            super().prepare_data()

    def _load_raw(self) -> list:
        if self.synthetic:
            return generate_countdown(self.num_examples, self.num_numbers, self.max_number, self.seed)
        return super()._load_raw()

    def normalize(self, raw: dict, index: int) -> dict:
        """Validate ``target`` (int) and ``nums`` (non-empty list of positive ints).

        Args:
            raw: Raw row.
            index: Position.
        """
        target, nums = raw.get("target"), raw.get("nums")
        if target is None or nums is None:
            raise RowError(f"missing field {'target' if target is None else 'nums'!r}")
        if isinstance(target, bool) or not isinstance(target, int):
            raise RowError(f"field 'target' is {type(target).__name__}, expected int")
        if not isinstance(nums, list) or not nums:
            raise RowError("field 'nums' must be a non-empty list")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in nums):
            raise RowError("field 'nums' must hold positive ints")
        solution = raw.get("solution")
        return make_row(
            id=f"{self.name}-{index}",
            question=format_countdown_question(nums, target),
            answer=str(target),
            solution=solution if isinstance(solution, str) and solution else str(target),
            metadata={"nums": list(nums), "target": target},
        )
