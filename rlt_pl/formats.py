"""Teacher and student text formats of RLT, with character spans known by construction.

A format is data: a dataclass holding the system prompts, tags and delimiters (SakanaAI/RLT), chosen in YAML by
`class_path`. `StratosFormat` reproduces the authors' strings byte for byte (SakanaAI/RLT: the released RLT
checkpoints and Bespoke-Stratos students were trained on them); `CompactFormat` is a tag-per-token format for tiny
models (no chat template, no system prompt).

Every renderer returns the string *and* the character ranges of its parts, so token spans are derived from one
tokenization with an offset mapping (`rlt_pl.spans`) instead of the authors' decode → re-encode → sub-list search
(spec pitfall P4). Chat rendering goes through the tokenizer's own chat template; the assistant message is located
in the rendered string and a template that rewrites it is refused (P15).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple


def read_prompt(name: str) -> str:
    """Read a shipped system prompt (package data `rlt_pl/prompts/{name}.txt`) byte for byte."""
    return resources.files("rlt_pl").joinpath(f"prompts/{name}.txt").read_bytes().decode("utf-8")


class Rendered(NamedTuple):
    """A rendered text and named character ranges `[start, end)` inside it."""

    text: str
    spans: dict[str, tuple[int, int]]


class ParsedCompletion(NamedTuple):
    """A teacher completion split at its explanation end tag (SakanaAI/RLT)."""

    explanation: str  # padding + completion text up to the first end tag (the whole text when unmatched)
    matched: bool  # the completion closed its explanation tag
    end: int  # character index in the completion where the explanation text stops


@dataclass(frozen=True)
class RLTFormat:
    """All strings of one RLT format. Use a subclass (`StratosFormat`, `CompactFormat`) or set every field.

    Args:
        teacher_system_prompt: system message of the teacher (None: no system message; plain mode only).
        student_system_prompt: system message of the student.
        use_chat_template: render through the tokenizer's chat template (True) or concatenate plainly (False).
        question_prefix: plain mode only: text placed before the question.
        solution_start: teacher-side solution start tag.
        solution_end: teacher-side solution end tag.
        explanation_start: teacher explanation start tag (the RL prompt ends with it + `explanation_padding`).
        explanation_end: teacher explanation end tag (closing it avoids the not-matched penalty).
        thought_start: student thought start tag (the explanation is placed as the student's thought).
        thought_end: student thought end tag.
        student_solution_start: student-side solution start tag.
        student_solution_end: student-side solution end tag.
        solution_explanation_delimiter: text between the teacher's solution and its explanation.
        explanation_padding: text after the explanation start tag that ends the RL prompt.
        think_solution_delimiter: text between the student's thought and its solution.
        think_prefix: text before the student's thought start tag.
    """

    teacher_system_prompt: str | None
    student_system_prompt: str | None
    use_chat_template: bool
    question_prefix: str
    solution_start: str
    solution_end: str
    explanation_start: str
    explanation_end: str
    thought_start: str
    thought_end: str
    student_solution_start: str
    student_solution_end: str
    solution_explanation_delimiter: str
    explanation_padding: str
    think_solution_delimiter: str
    think_prefix: str

    def __post_init__(self) -> None:
        if not self.explanation_end:
            raise ValueError("format.explanation_end must be non-empty: it decides whether a completion matched")
        if not self.use_chat_template and (self.teacher_system_prompt or self.student_system_prompt):
            raise ValueError("format: system prompts need use_chat_template=True (plain mode has no system message)")

    # ---------------------------------------------------------------- teacher side
    @property
    def completion_divider(self) -> str:
        """End-solution tag + delimiter + begin-explanation tag + padding (SakanaAI/RLT)."""
        return (
            self.solution_end + self.solution_explanation_delimiter + self.explanation_start + self.explanation_padding
        )

    @property
    def masked_out_think_prefix(self) -> str:
        """The explanation start tag and padding, which live in the RL prompt (SakanaAI/RLT)."""
        return self.explanation_start + self.explanation_padding

    def _teacher_assistant_prefix(self, solution: str) -> str:
        return self.solution_start + solution + self.completion_divider

    def pad_explanation(self, explanation: str) -> str:
        """Ensure a reference explanation starts with the padding (custom data, SakanaAI/RLT)."""
        return (
            explanation if explanation.startswith(self.explanation_padding) else self.explanation_padding + explanation
        )

    def teacher_sft(self, question: str, solution: str, explanation: str, tokenizer=None) -> Rendered:
        """Teacher warm-up text (SakanaAI/RLT). Spans: `prompt` (the RL prompt) and `completion` (trained tokens).

        `explanation` is the reference explanation θ including its leading padding (added when missing).
        """
        explanation = self.pad_explanation(explanation)
        body = explanation + self.explanation_end
        prefix = self._teacher_assistant_prefix(solution)  # ends with the padding, which `body` starts with
        assistant = prefix + body[len(self.explanation_padding) :]
        text, start = self._render(tokenizer, self.teacher_system_prompt, question, assistant, teacher=True)
        split = start + len(prefix)
        return Rendered(text, {"prompt": (0, split), "completion": (split, len(text))})

    def teacher_prompt(self, question: str, solution: str, tokenizer=None) -> str:
        """The RL prompt: rendered chat up to and including the explanation start tag and padding (SakanaAI/RLT)."""
        prefix = self._teacher_assistant_prefix(solution)
        text, start = self._render(tokenizer, self.teacher_system_prompt, question, prefix, teacher=True)
        return text[: start + len(prefix)]

    def parse_completion(self, completion: str) -> ParsedCompletion:
        """Explanation of a teacher completion generated after the RL prompt (SakanaAI/RLT)."""
        end = completion.find(self.explanation_end)
        if end < 0:
            return ParsedCompletion(self.explanation_padding + completion, False, len(completion))
        return ParsedCompletion(self.explanation_padding + completion[:end], True, end)

    def teacher_scoring_text(self, prompt: str, completion: str) -> Rendered:
        """Teacher context x_T = prompt + completion (closing tag appended when missing), span `explanation`."""
        parsed = self.parse_completion(completion)
        text = prompt + completion if parsed.matched else prompt + completion + self.explanation_end
        pad = len(self.explanation_padding)
        if not prompt.endswith(self.masked_out_think_prefix):
            raise ValueError("teacher prompt must end with the explanation start tag and padding")
        return Rendered(text, {"explanation": (len(prompt) - pad, len(prompt) + parsed.end)})

    # ---------------------------------------------------------------- student side
    def student_text(self, question: str, explanation: str, solution: str, tokenizer=None) -> Rendered:
        """Student context of the reward (SakanaAI/RLT); spans: `explanation`, `solution`, `completion`."""
        head = self.think_prefix + self.thought_start
        expl_start = len(head)
        mid = head + explanation + self.thought_end + self.think_solution_delimiter + self.student_solution_start
        sol_start = len(mid)
        assistant = mid + solution + self.student_solution_end
        text, start = self._render(tokenizer, self.student_system_prompt, question, assistant, teacher=False)
        end = len(text)
        return Rendered(
            text,
            {
                "explanation": (start + expl_start, start + expl_start + len(explanation)),
                "solution": (start + sol_start, start + sol_start + len(solution)),
                "completion": (start, end),
            },
        )

    def student_prompt(self, question: str, tokenizer=None) -> str:
        """What the student sees before it answers (evaluation, cold-start RL)."""
        if not self.use_chat_template:
            return self.question_prefix + question
        _require_template(tokenizer)
        messages = [{"role": "system", "content": self.student_system_prompt}] if self.student_system_prompt else []
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def student_answer(self, response: str) -> str | None:
        """Content of the last student solution block of a response (None if there is none)."""
        end = response.rfind(self.student_solution_end) if self.student_solution_end else len(response)
        if end < 0:
            return None
        start = response.rfind(self.student_solution_start, 0, end)
        if start < 0:
            return None
        return response[start + len(self.student_solution_start) : end]

    # ---------------------------------------------------------------- stop strings
    def teacher_stop_strings(self) -> list[str]:
        """Strings that end a teacher completion besides the tokenizer's EOS."""
        return [] if self.use_chat_template else [self.explanation_end]

    def student_stop_strings(self) -> list[str]:
        return [] if self.use_chat_template else [self.student_solution_end]

    # ---------------------------------------------------------------- rendering
    def _render(self, tokenizer, system: str | None, user: str, assistant: str, teacher: bool) -> tuple[str, int]:
        """Render [system, user, assistant]; return the text and where the assistant content starts."""
        if not self.use_chat_template:
            text = self.question_prefix + user + assistant
            return text, len(self.question_prefix) + len(user)
        _require_template(tokenizer)
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, continue_final_message=False
        )
        start = text.rfind(assistant)
        if start < 0:
            side = "teacher" if teacher else "student"
            raise ValueError(
                f"the tokenizer's chat template rewrites the {side} assistant message; RLT needs it verbatim (P15)"
            )
        return text, start


def _require_template(tokenizer) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this format uses the chat template, but the tokenizer has none: use a chat model's tokenizer "
            "or a format with use_chat_template=False"
        )


def _teacher_prompt_file() -> str:
    return read_prompt("teacher_stratos")


def _student_prompt_file() -> str:
    return read_prompt("student_stratos")


@dataclass(frozen=True)
class StratosFormat(RLTFormat):
    """The authors' 'stratos' teacher style and Bespoke-Stratos student format (SakanaAI/RLT), byte for byte."""

    teacher_system_prompt: str | None = field(default_factory=_teacher_prompt_file)
    student_system_prompt: str | None = field(default_factory=_student_prompt_file)
    use_chat_template: bool = True
    question_prefix: str = ""
    solution_start: str = "<|begin_of_solution|>"
    solution_end: str = "<|end_of_solution|>"
    explanation_start: str = "<|begin_of_explanation|>"
    explanation_end: str = "<|end_of_explanation|>"
    thought_start: str = "<|begin_of_thought|>"
    thought_end: str = "<|end_of_thought|>"
    student_solution_start: str = "<|begin_of_solution|>"
    student_solution_end: str = "<|end_of_solution|>"
    solution_explanation_delimiter: str = "\n\n"
    explanation_padding: str = "\n\n"
    think_solution_delimiter: str = "\n\n"
    think_prefix: str = ""


@dataclass(frozen=True)
class CompactFormat(RLTFormat):
    """One token per tag, no chat template: `<Q>q<S>s<E>e</E>` (teacher), `<Q>q<T>e</T><A>s</A>` (student)."""

    teacher_system_prompt: str | None = None
    student_system_prompt: str | None = None
    use_chat_template: bool = False
    question_prefix: str = "<Q>"
    solution_start: str = "<S>"
    solution_end: str = ""
    explanation_start: str = "<E>"
    explanation_end: str = "</E>"
    thought_start: str = "<T>"
    thought_end: str = "</T>"
    student_solution_start: str = "<A>"
    student_solution_end: str = "</A>"
    solution_explanation_delimiter: str = ""
    explanation_padding: str = ""
    think_solution_delimiter: str = ""
    think_prefix: str = ""

    def tag_tokens(self) -> list[str]:
        """The single-token tags a tokenizer must know for this format."""
        tags = [self.question_prefix, self.solution_start, self.explanation_start, self.explanation_end]
        tags += [self.thought_start, self.thought_end, self.student_solution_start, self.student_solution_end]
        return [t for t in dict.fromkeys(tags) if t]
