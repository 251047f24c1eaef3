"""Math grader (MATH500, AIME24, Bespoke math rows): SkyThought-style prompt, last ``\\boxed{}``, math_verify.

Question format follows SkyThought @ 4bb8f3e ("Return your final response within \\boxed{}. {problem}").
Grading: the last box of the response is compared with the gold answer by ``math_verify`` (gold wrapped in ``$...$``).
``math_verify`` enforces time limits with ``signal.alarm``, which only works in the main thread; elsewhere (e.g. a
DataLoader thread or a thread pool) this grader falls back to a normalised string comparison and counts that.
"""

from __future__ import annotations

import logging
import re
import threading

from rlt_pl.tasks.base import Task, last_boxed

log = logging.getLogger(__name__)

BOXED_PREFIX = "Return your final response within \\boxed{}. "

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad")


def normalize_math_string(answer: str) -> str:
    """A conservative string normalisation used when math_verify cannot run.

    Args:
        answer: A LaTeX answer such as ``"\\dfrac{1}{2}"`` or ``"5 \\text{ cm}"``.

    Returns:
        The answer with spacing, ``\\left``/``\\right``, ``$``, ``\\dfrac``/``\\tfrac``, ``\\text{}`` wrappers, degree
        marks and a trailing period removed or unified.
    """
    s = answer.strip().strip("$")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = _SPACING_RE.sub("", s)
    s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


class MathTask(Task):
    """Free-form math answers graded with math_verify.

    Args:
        name: Task name used in metric keys.
        timeout_seconds: Per-call time limit given to math_verify's ``parse`` and ``verify`` (main thread only).
    """

    def __init__(self, name: str = "math", timeout_seconds: int = 5) -> None:
        if timeout_seconds < 1:
            raise ValueError(f"timeout_seconds must be >= 1, got {timeout_seconds}")
        self.name = name
        self.timeout_seconds = timeout_seconds
        self.fallback_count = 0  # graded by string comparison because math_verify could not run

    def format_question(self, row: dict) -> str:
        """``"Return your final response within \\boxed{}. " + question`` (not prefixed twice).

        Args:
            row: A normalised row.
        """
        question = row["question"]
        return question if question.startswith(BOXED_PREFIX) else BOXED_PREFIX + question

    def extract_answer(self, response: str) -> str | None:
        """The content of the last ``\\boxed{}`` / ``\\fbox{}``.

        Args:
            response: Model output.
        """
        answer = last_boxed(response)
        return answer.strip() if answer is not None and answer.strip() else None

    def is_correct(self, response: str, row: dict) -> bool:
        """Whether the last box of ``response`` is mathematically equal to ``row["answer"]``.

        Args:
            response: Model output.
            row: Normalised row; ``row["answer"]`` is the gold LaTeX answer.
        """
        pred = self.extract_answer(response)
        if pred is None:
            return False
        return self.answers_match(pred, str(row["answer"]))

    def answers_match(self, pred: str, gold: str) -> bool:
        """Compare two answer strings with math_verify, or by normalised string off the main thread / on error.

        Args:
            pred: Predicted answer (box content).
            gold: Gold answer.
        """
        string_match = normalize_math_string(pred) == normalize_math_string(gold)
        if string_match:
            return True
        if threading.current_thread() is not threading.main_thread():
            self.fallback_count += 1
            return False
        try:
            from math_verify import parse, verify

            gold_parsed = parse(f"${gold}$", parsing_timeout=self.timeout_seconds)
            pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=self.timeout_seconds)
            if not gold_parsed or not pred_parsed:
                return False
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=self.timeout_seconds))
        except Exception as err:  # math_verify/sympy can raise on odd input; a grader must not
            log.debug("math_verify failed on pred=%r gold=%r: %s", pred, gold, err)
            self.fallback_count += 1
            return False
