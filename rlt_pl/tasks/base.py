"""Base class of a benchmark task (the grader) and the shared ``\\boxed{...}`` extractor.

A task is pure Python: it turns a normalised row (see ``rlt_pl.datamodules.base``) into the user message shown to the
model and decides whether a model response answers it correctly. DataModules own a task; evaluators call it.
"""

from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Also accepts the brace-less form ``\\boxed 5`` (content up to the next whitespace or ``$``). An unclosed box is
    ignored (the search moves on to earlier boxes).

    Args:
        text: Any string, e.g. a model response.

    Returns:
        The box content (without the outer braces), or ``None`` when no complete box is present.
    """
    if not isinstance(text, str):
        return None
    starts = sorted((i, cmd) for cmd in _BOX_COMMANDS for i in _find_all(text, cmd))
    for start, cmd in reversed(starts):
        content = _box_content(text, start + len(cmd))
        if content is not None:
            return content
    return None


def _find_all(text: str, needle: str) -> list[int]:
    """All start offsets of ``needle`` in ``text``.

    Args:
        text: Haystack.
        needle: Substring to find.
    """
    out, i = [], text.find(needle)
    while i != -1:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def _box_content(text: str, pos: int) -> str | None:
    """Parse the argument of a box command whose name ends at ``pos``.

    Args:
        text: Full text.
        pos: Offset just after ``\\boxed`` / ``\\fbox``.
    """
    if pos < len(text) and text[pos].isalpha():  # e.g. "\boxedx" is another command
        return None
    if pos < len(text) and text[pos] == " ":
        rest = text[pos + 1 :]
        word = rest.split()[0] if rest.split() else ""
        word = word.split("$")[0]
        return word or None
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for j in range(pos, len(text)):
        ch = text[j]
        if ch == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif ch == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[pos + 1 : j]
    return None


class Task:
    """A benchmark's prompt format and grader.

    Subclasses set ``name`` and implement the three methods. Graders never raise on model output: any response
    (empty, garbage, adversarial) yields ``None`` / ``False``.
    """

    name: str = "task"

    def format_question(self, row: dict) -> str:
        """The user message shown to the model for ``row``.

        Args:
            row: A normalised row (``id``, ``question``, ``answer``, ``solution``, ``thought``, ``metadata``).
        """
        raise NotImplementedError

    def extract_answer(self, response: str) -> str | None:
        """The final answer found in ``response``, or ``None`` when there is none.

        Args:
            response: The model's raw completion text.
        """
        raise NotImplementedError

    def is_correct(self, response: str, row: dict) -> bool:
        """Whether ``response`` answers ``row`` correctly.

        Args:
            response: The model's raw completion text.
            row: The normalised row holding the ground truth in ``row["answer"]``.
        """
        raise NotImplementedError

    def grade(self, response: str, row: dict) -> tuple[str | None, bool]:
        """Extract and grade in one call.

        Args:
            response: The model's raw completion text.
            row: The normalised row.

        Returns:
            ``(extracted_answer, correct)``.
        """
        return self.extract_answer(response), self.is_correct(response, row)
