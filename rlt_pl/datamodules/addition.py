"""Synthetic addition rows (offline): a fixed held-out set and a disjoint training set.

Rows carry `question` "358+467", `answer`/`solution` "825" and a reference `thought` drawn from an explanation mix
(e.g. 50% good scratchpads, 25% leaks, 25% noise for the teacher's SFT warm-up; empty for an answer-only baseline).
Splits: `train` (training questions), `val` (held-out, also used for `test`).
"""

from __future__ import annotations

import random

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import make_row
from rlt_pl.tasks.addition import EXPLANATION_KINDS, AdditionTask, generate_additions, make_explanation


class AdditionDataModule(RowDataModule):
    """Addition problems with scratchpad explanations.

    Args:
        num_train: training problems.
        num_heldout: held-out problems (val/test), excluded from training.
        min_digits: smallest operand size in digits (training rows).
        max_digits: largest operand size in digits.
        heldout_digits: operand size of the held-out problems.
        explanation_mix: class → probability of the reference explanation (`good`, `leak`, `noise`, `other`,
            `wrong`, or `none` for an empty explanation = answer-only).
        seed: data seed (the held-out set depends only on `heldout_seed`).
        heldout_seed: seed of the held-out set, shared by every stage of a pipeline.
        batch_size: rows per batch.
        stage_splits: stage → split (default train/val/test=val/predict=train).
    """

    name = "addition"

    def __init__(
        self,
        num_train: int = 2000,
        num_heldout: int = 200,
        min_digits: int = 3,
        max_digits: int = 3,
        heldout_digits: int = 3,
        explanation_mix: dict[str, float] | None = None,
        seed: int = 0,
        heldout_seed: int = 12345,
        batch_size: int = 8,
        stage_splits: dict[str, str] | None = None,
        limit: int | None = None,
    ) -> None:
        mix = dict(explanation_mix or {"good": 1.0})
        unknown = set(mix) - set(EXPLANATION_KINDS) - {"none"}
        if unknown or not mix or any(p < 0 for p in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"data.init_args.explanation_mix: bad classes/weights {mix}")
        if not all(0 <= p < float("inf") for p in mix.values()):
            raise ValueError(f"data.init_args.explanation_mix: weights must be finite and >= 0, got {mix}")
        if num_train < 0 or num_heldout < 0:
            raise ValueError(f"data.init_args.num_train/num_heldout must be >= 0, got {num_train}/{num_heldout}")
        if heldout_digits < 1:
            raise ValueError(f"data.init_args.heldout_digits must be >= 1, got {heldout_digits}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError("data.init_args: need 1 <= min_digits <= max_digits")
        self.num_train, self.num_heldout = num_train, num_heldout
        self.min_digits, self.max_digits, self.heldout_digits = min_digits, max_digits, heldout_digits
        self.explanation_mix = mix
        self.heldout_seed = heldout_seed
        super().__init__(batch_size=batch_size, seed=seed, stage_splits=stage_splits, limit=limit)

    def build_task(self) -> AdditionTask:
        return AdditionTask()

    def default_stage_splits(self) -> dict[str, str]:
        return {"train": "train", "val": "val", "test": "val", "predict": "train"}

    def prepare_data(self) -> None:
        """Nothing to download."""

    def _row(self, a: int, b: int, split: str, index: int, rng: random.Random) -> dict:
        kinds, weights = zip(*self.explanation_mix.items())
        kind = rng.choices(kinds, weights)[0]
        thought = "" if kind == "none" else make_explanation(kind, a, b, rng)
        return make_row(
            id=f"add-{split}-{index}",
            question=f"{a}+{b}",
            answer=str(a + b),
            solution=str(a + b),
            thought=thought,
            metadata={"a": a, "b": b, "kind": kind},
        )

    def _load_raw(self) -> list:
        heldout = generate_additions(self.num_heldout, self.heldout_digits, self.heldout_digits, self.heldout_seed)
        exclude = {f"{a}+{b}" for a, b in heldout}
        train = generate_additions(self.num_train, self.min_digits, self.max_digits, self.seed, exclude)
        rng = random.Random(self.seed + 1)
        return [self._row(a, b, "train", i, rng) for i, (a, b) in enumerate(train)] + [
            self._row(a, b, "heldout", i, random.Random(i)) | {"metadata": {"a": a, "b": b, "kind": "heldout"}}
            for i, (a, b) in enumerate(heldout)
        ]

    def normalize(self, raw: dict, index: int) -> dict:
        return raw

    def _carve(self, rows: list[dict]) -> dict[str, list[dict]]:
        train = [r for r in rows if r["id"].startswith("add-train-")]
        val = [r for r in rows if r["id"].startswith("add-heldout-")]
        return {"train": train, "val": val, "test": val, "all": rows}
