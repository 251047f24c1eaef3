"""GPQA-Diamond (``Idavidrein/gpqa``, subset ``gpqa_diamond``, split ``train``, 198 questions).

The dataset is **gated**: accept its terms on https://huggingface.co/datasets/Idavidrein/gpqa while logged in, then
export ``HF_TOKEN`` (or run ``huggingface-cli login``) before ``prepare_data``. Options are shuffled deterministically
per question by ``GPQATask`` (seeded by Record ID + ``seed``); the row's ``answer`` is the correct letter.
"""

from __future__ import annotations

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import RowError, make_row, require_str
from rlt_pl.tasks.gpqa import GPQATask

INCORRECT_FIELDS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


class GPQADiamondDataModule(RowDataModule):
    """GPQA-Diamond rows as 4-option multiple choice.

    Args:
        data_path: Local file in the Hub schema instead of the (gated) Hub.
        batch_size: Rows per batch.
        num_workers: DataLoader workers.
        limit: Use only the first ``limit`` rows.
        seed: Loader seed and option-shuffle seed.
        stage_splits: Stage → split mapping (default: all rows for val/test/predict).
        hf_path: Override of the Hub id.
    """

    name = "gpqa_diamond"
    default_hf_path = "Idavidrein/gpqa"
    hf_subset = "gpqa_diamond"
    hf_split = "train"

    def build_task(self) -> GPQATask:
        """Letter grader with this module's shuffle seed."""
        return GPQATask(name=self.name, seed=self.seed)

    def load_hub_rows(self) -> list:
        """Load the gated dataset, turning auth failures into an actionable error."""
        try:
            return super().load_hub_rows()
        except Exception as err:
            text = f"{type(err).__name__}: {err}"
            if any(s in text.lower() for s in ("gated", "401", "403", "auth", "token", "access")):
                raise RuntimeError(
                    f"{self.hf_path} ({self.hf_subset}) is gated: accept its terms on the Hugging Face Hub and set "
                    f"HF_TOKEN (or `huggingface-cli login`), or pass data.init_args.data_path. Cause: {text}"
                ) from err
            raise

    def raw_id(self, raw: object, index: int) -> str:
        """``Record ID`` when present, else ``gpqa_diamond-<index>``.

        Args:
            raw: Raw row.
            index: Position.
        """
        if isinstance(raw, dict) and isinstance(raw.get("Record ID"), str) and raw["Record ID"].strip():
            return raw["Record ID"].strip()
        return super().raw_id(raw, index)

    def normalize(self, raw: dict, index: int) -> dict:
        """Map a GPQA row to the common schema with shuffled options.

        Args:
            raw: Hub row.
            index: Position.
        """
        rid = require_str(raw, "Record ID").strip()
        correct = require_str(raw, "Correct Answer").strip()
        incorrect = [require_str(raw, f).strip() for f in INCORRECT_FIELDS]
        if len({correct, *incorrect}) != 4:
            raise RowError("answer options are not four distinct strings")
        options, letter = self.task.shuffle_options(rid, correct, incorrect)
        explanation = raw.get("Explanation")
        domain = raw.get("High-level domain")
        return make_row(
            id=rid,
            question=require_str(raw, "Question").strip(),
            answer=letter,
            solution=explanation.strip() if isinstance(explanation, str) and explanation.strip() else correct,
            metadata={
                "options": options,
                "correct_text": correct,
                "domain": domain if isinstance(domain, str) else None,
                "subdomain": raw.get("Subdomain") if isinstance(raw.get("Subdomain"), str) else None,
            },
        )
