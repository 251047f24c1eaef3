"""Bespoke-Stratos-17k (``bespokelabs/Bespoke-Stratos-17k``: ``system``, ``conversations=[{from, value}]``) and
custom reasoning datasets, parsed per arXiv 2506.08388

- question ``q`` = ``conversations[0].value`` (``from == "user"``), kept verbatim;
- thought ``θ`` = text strictly between the first ``<|begin_of_thought|>`` and the next ``<|end_of_thought|>``;
- solution ``s`` = text strictly between the first solution tag pair, verbatim incl. its ``"\\n\\n"`` paddings;
- ``answer`` = last ``\\boxed{}`` of ``s`` if any, else ``s.strip()``.

Custom rows (§1.9, §6.1): columns ``prompt`` or ``question``, ``solution``, optional ``reasoning_trace`` (falls back to
the solution, as in the authors' code). Unlike the authors, the Bespoke ``"\\n\\n"`` padding is applied explicitly
(``"\\n\\n" + text.strip() + "\\n\\n"``) so that custom rows have the same shape as Bespoke rows.
"""

from __future__ import annotations

from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import RowError, make_row, require_str
from rlt_pl.tasks.base import last_boxed
from rlt_pl.tasks.math import MathTask

THOUGHT_TAGS = ("<|begin_of_thought|>", "<|end_of_thought|>")
SOLUTION_TAGS = ("<|begin_of_solution|>", "<|end_of_solution|>")
PADDING = "\n\n"


def between(text: str, start: str, end: str) -> str:
    """Text strictly between the first ``start`` and the first ``end`` after it.

    Args:
        **kwargs: `RowDataModule` arguments (data_path, batch_size, seed, stage_splits, hf_path, ...).
    """
    i = text.find(start)
    if i == -1:
        raise RowError(f"missing tag {start}")
    j = text.find(end, i + len(start))
    if j == -1:
        raise RowError(f"missing tag {end} after {start}")
    return text[i + len(start) : j]


def pad(text: str) -> str:
    """Bespoke-style padding ``"\\n\\n" + text.strip() + "\\n\\n"``.

    Args:
        text: Unpadded content.
    """
    return PADDING + text.strip() + PADDING


class BespokeStratosDataModule(RowDataModule):
    """Questions, reference thoughts and solutions for teacher SFT/RL and student distillation.

    Args:
        data_path: Local file (Bespoke schema or custom columns) instead of the Hub.
        batch_size: Rows per batch.
        num_workers: DataLoader workers.
        limit: Use only the first ``limit`` raw rows.
        seed: Seed of the train shuffle and of the carving.
        val_size: Rows carved into ``val``.
        test_size: Rows carved into ``test``.
        stage_splits: Stage → split mapping (default: train on ``train``, predict on ``all``).
        hf_path: Override of the Hub id (any dataset with Bespoke or custom columns).
        timeout_seconds: math_verify time limit of the attached math grader.
    """

    name = "bespoke_stratos"
    default_hf_path = "bespokelabs/Bespoke-Stratos-17k"
    hf_split = "train"

    def __init__(self, timeout_seconds: int = 5, **kwargs) -> None:
        self.timeout_seconds = timeout_seconds
        super().__init__(**kwargs)

    def build_task(self) -> MathTask:
        """Math grader (Bespoke answers are boxed; code rows simply never match)."""
        return MathTask(name=self.name, timeout_seconds=self.timeout_seconds)

    def default_stage_splits(self) -> dict[str, str]:
        """Train on the carved train split (all rows by default); predict over all rows."""
        splits = {"train": "train", "predict": "all"}
        if self.val_size:
            splits["val"] = "val"
        if self.test_size:
            splits["test"] = "test"
        return splits

    def normalize(self, raw: dict, index: int) -> dict:
        """Parse a Bespoke row (``conversations``) or a custom row (``prompt``/``question`` + ``solution``).

        Args:
            raw: Raw row.
            index: Position.
        """
        rid = f"{self.name}-{index}"
        if "conversations" in raw:
            question, thought, solution = self._parse_conversations(raw["conversations"])
        elif "prompt" in raw or "question" in raw:
            question = require_str(raw, "prompt" if "prompt" in raw else "question")
            raw_solution = require_str(raw, "solution")
            trace = raw.get("reasoning_trace")
            if trace is not None and (not isinstance(trace, str) or not trace.strip()):
                raise RowError("field 'reasoning_trace' must be a non-empty str when present")
            solution, thought = pad(raw_solution), pad(trace if trace is not None else raw_solution)
        else:
            raise RowError("neither 'conversations' nor 'prompt'/'question' columns")
        if not solution.strip():
            raise RowError("empty solution between solution tags")
        if not thought.strip():
            raise RowError("empty thought between thought tags")
        boxed = last_boxed(solution)
        answer = boxed.strip() if boxed is not None and boxed.strip() else solution.strip()
        return make_row(id=rid, question=question, answer=answer, solution=solution, thought=thought)

    @staticmethod
    def _parse_conversations(conversations: object) -> tuple[str, str, str]:
        """``(question, thought, solution)`` from a Bespoke ``conversations`` list.

        Args:
            conversations: ``[{"from": "user", "value": q}, {"from": "assistant", "value": a}]``.
        """
        if not isinstance(conversations, list) or len(conversations) < 2:
            raise RowError("'conversations' must be a list of at least two messages")
        user, assistant = conversations[0], conversations[1]
        if not isinstance(user, dict) or not isinstance(assistant, dict):
            raise RowError("'conversations' entries must be objects with 'from'/'value'")
        if user.get("from") != "user":
            raise RowError(f"conversations[0].from is {user.get('from')!r}, expected 'user'")
        if assistant.get("from") != "assistant":
            raise RowError(f"conversations[1].from is {assistant.get('from')!r}, expected 'assistant'")
        question = require_str(user, "value")
        trace = require_str(assistant, "value")
        return question, between(trace, *THOUGHT_TAGS), between(trace, *SOLUTION_TAGS)
