"""GPQA(-Diamond) multiple-choice grader: deterministic option shuffling and robust letter extraction.

Prompt follows SkyThought's GPQA template in spirit (arXiv 2506.08388): the options are listed as ``A) ... D)`` and the
model is asked to box only the letter. The correct answer's position is decided by a seeded shuffle per question
(sha256 of ``"{seed}:{question_id}"``), so it is the same on every machine, process and run.
"""

from __future__ import annotations

import hashlib
import random
import re

from rlt_pl.tasks.base import Task, last_boxed

LETTERS = ("A", "B", "C", "D")

_BOX_LETTER_RE = re.compile(r"^\W*(?:\\text\w*\{)?\W*([A-Da-d])\W*\}?\W*$")
_ANSWER_IS_RE = re.compile(
    r"(?i:answer|choice|option)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:\-]?\s*(?i:option\s*)?[\s(*\[]*([A-D])\b"
)
_ANSWER_COLON_RE = re.compile(r"(?i:answer)\s*:\s*[\s(*\[]*([a-dA-D])\b")
_TRAILING_RE = re.compile(r"(?:^|[\s(*\[])\(?\**([A-D])\**\)?\**\s*\.?\s*$")


class GPQATask(Task):
    """Four-option multiple choice graded by the extracted letter.

    Args:
        name: Task name used in metric keys.
        seed: Seed mixed into every per-question shuffle.
    """

    def __init__(self, name: str = "gpqa_diamond", seed: int = 0) -> None:
        self.name = name
        self.seed = seed

    def shuffle_options(self, question_id: str, correct: str, incorrect: list[str]) -> tuple[list[str], str]:
        """Shuffle the correct answer among the incorrect ones, deterministically per question.

        Args:
            question_id: Stable question id (GPQA "Record ID").
            correct: Correct answer text.
            incorrect: The three incorrect answer texts.

        Returns:
            ``(options, correct_letter)`` with ``options[LETTERS.index(correct_letter)] == correct``.
        """
        if len(incorrect) != len(LETTERS) - 1:
            raise ValueError(f"GPQA needs {len(LETTERS) - 1} incorrect answers, got {len(incorrect)}")
        digest = hashlib.sha256(f"{self.seed}:{question_id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        order = list(range(len(LETTERS)))
        rng.shuffle(order)
        pool = [correct, *incorrect]
        options = [pool[i] for i in order]
        return options, LETTERS[order.index(0)]

    def format_question(self, row: dict) -> str:
        """Question, the four lettered options, and the instruction to box only the letter.

        Args:
            row: Normalised row whose ``metadata["options"]`` holds the four shuffled option texts.
        """
        options = row["metadata"]["options"]
        lines = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, options))
        return (
            "Return your final response within \\boxed{} and only include the letter choice (A, B, C, or D) as your "
            f"final response. {row['question']}\n\n{lines}"
        )

    def extract_answer(self, response: str) -> str | None:
        """The chosen letter, upper-cased, or ``None``.

        Tried in order: the last ``\\boxed{}`` holding a lone letter (``\\boxed{C}``, ``\\boxed{(c)}``,
        ``\\boxed{\\text{C}}``); the last "answer is (C)" / "Answer: c" phrase; a lone letter (optionally bold or in
        parentheses) ending the response (``**C**``).

        Args:
            response: Model output.
        """
        if not isinstance(response, str):
            return None
        boxed = last_boxed(response)
        if boxed is not None:
            m = _BOX_LETTER_RE.match(boxed.strip())
            if m:
                return m.group(1).upper()
        best: tuple[int, str] | None = None
        for pattern in (_ANSWER_IS_RE, _ANSWER_COLON_RE):
            for m in pattern.finditer(response):
                if best is None or m.start(1) > best[0]:
                    best = (m.start(1), m.group(1).upper())
        if best is not None:
            return best[1]
        m = _TRAILING_RE.search(response.strip())
        return m.group(1) if m else None

    def is_correct(self, response: str, row: dict) -> bool:
        """Whether the extracted letter equals ``row["answer"]``.

        Args:
            response: Model output.
            row: Normalised row; ``row["answer"]`` is the correct letter after shuffling.
        """
        letter = self.extract_answer(response)
        return letter is not None and letter == str(row["answer"]).strip().upper()
