"""Golden strings of the RLT formats (SakanaAI/RLT, P1, P14, P15) and properties of completion parsing (§2.2)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlt_pl.formats import CompactFormat, RLTFormat, StratosFormat

# The two system prompts, written out literally (SakanaAI/RLT and §1.3). Each `'\\n\\n'` is four characters.
TEACHER_PROMPT = (
    "Your role as an assistant involves providing precise and accurate solutions before providing "
    "detailed explanations with your full work showing your systematic thinking process leading to "
    "each solution. Your explanations should show how you engaged in a comprehensive cycle of "
    "analysis, summarizing, exploration, reassessment, reflection, backtracing, and iteration to "
    "develop well-considered thinking process. Please structure your response into two main "
    "sections: Solution and Explanation. In the Solution section, present your well-thought "
    "solution that accurately answers the question. The solution should remain a logical, accurate, "
    "concise expression style and detail necessary step needed to reach the conclusion, formatted "
    "as follows: <|begin_of_solution|> {final formatted, precise, and clear solution} "
    "<|end_of_solution|>. In the Explanation section, comprehensively detail your reasoning process "
    "using the specified format: <|begin_of_explanation|> {explanation with steps separated with "
    "'\\n\\n'} <|end_of_explanation|> Each step should show detailed considerations leading to your "
    "solutions such as analisying questions, summarizing relevant findings, brainstorming new "
    "ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. "
)
STUDENT_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long "
    "thinking process before providing the final precise and accurate solutions. This requires "
    "engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, "
    "reflection, backtracing, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution. In the Thought section, "
    "detail your reasoning process using the specified format: <|begin_of_thought|> {thought with "
    "steps separated with '\\n\\n'} <|end_of_thought|> Each step should include detailed "
    "considerations such as analisying questions, summarizing relevant findings, brainstorming new "
    "ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and "
    "reflections from the Thought section, systematically present the final solution that you deem "
    "correct. The solution should remain a logical, accurate, concise expression style and detail "
    "necessary step needed to reach the conclusion, formatted as follows: <|begin_of_solution|> "
    "{final formatted, precise, and clear solution} <|end_of_solution|> Now, try to solve the "
    "following question through the above guidelines:"
)
TEACHER_SHA256 = "2a6900e8cd23891f5b34a68c8b386045cd42c6c17ce0caa13f65005da0a49484"
STUDENT_SHA256 = "6490a490932e93a0712ec83d53b79036a10059ccdbf786e088ac9c247aa19141"

Q = "Return your final response within \\boxed{}. What is 2 + 3?"
S = "\n\n\\boxed{5}\n\n"  # solution content, Bespoke style (padded)
E = "\n\nWe add 2 and 3.\n\nSo 5.\n\n"  # explanation θ, Bespoke style (starts with the padding)

# Spec §1.5: the teacher SFT text (Qwen rendering, final newline included).
GOLDEN_SFT = (
    "<|im_start|>system\n" + TEACHER_PROMPT + "<|im_end|>\n"
    "<|im_start|>user\nReturn your final response within \\boxed{}. What is 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>\n\n"
    "<|begin_of_explanation|>\n\nWe add 2 and 3.\n\nSo 5.\n\n<|end_of_explanation|><|im_end|>\n"
)
# Spec §1.6: the RL prompt ends with the begin-explanation tag and two newlines.
GOLDEN_RL_PROMPT = (
    "<|im_start|>system\n" + TEACHER_PROMPT + "<|im_end|>\n"
    "<|im_start|>user\nReturn your final response within \\boxed{}. What is 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>\n\n"
    "<|begin_of_explanation|>\n\n"
)
# Spec §1.7: the student context of the reward.
GOLDEN_STUDENT = (
    "<|im_start|>system\n" + STUDENT_PROMPT + "<|im_end|>\n"
    "<|im_start|>user\nReturn your final response within \\boxed{}. What is 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n<|begin_of_thought|>\n\nWe add 2 and 3.\n\nSo 5.\n\n<|end_of_thought|>\n\n"
    "<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|><|im_end|>\n"
)
DIVIDER = "<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"


def test_system_prompts_are_the_spec_constants() -> None:
    fmt = StratosFormat()
    assert len(TEACHER_PROMPT) == 1284 and len(STUDENT_PROMPT) == 1312
    assert hashlib.sha256(TEACHER_PROMPT.encode()).hexdigest() == TEACHER_SHA256
    assert hashlib.sha256(STUDENT_PROMPT.encode()).hexdigest() == STUDENT_SHA256
    assert fmt.teacher_system_prompt == TEACHER_PROMPT
    assert fmt.student_system_prompt == STUDENT_PROMPT
    assert hashlib.sha256(fmt.teacher_system_prompt.encode("utf-8")).hexdigest() == TEACHER_SHA256
    assert hashlib.sha256(fmt.student_system_prompt.encode("utf-8")).hexdigest() == STUDENT_SHA256
    # P14: literal backslashes, no newlines, the teacher prompt's trailing space
    for prompt in (fmt.teacher_system_prompt, fmt.student_system_prompt):
        assert "\n" not in prompt and "'\\n\\n'" in prompt
    assert fmt.teacher_system_prompt.endswith("steps. ") and not fmt.student_system_prompt.endswith(" ")


def test_divider_and_prefix_constants() -> None:
    fmt = StratosFormat()
    assert fmt.completion_divider == DIVIDER and len(DIVIDER) == 47
    assert fmt.masked_out_think_prefix == "<|begin_of_explanation|>\n\n" and len(fmt.masked_out_think_prefix) == 26


def test_teacher_sft_golden(tokenizer) -> None:
    rendered = StratosFormat().teacher_sft(Q, S, E, tokenizer)
    assert rendered.text == GOLDEN_SFT
    lo, hi = rendered.spans["completion"]
    assert rendered.text[: rendered.spans["prompt"][1]] == GOLDEN_RL_PROMPT
    assert rendered.text[lo:hi] == "We add 2 and 3.\n\nSo 5.\n\n<|end_of_explanation|><|im_end|>\n"
    # an unpadded reference explanation gets the padding (SakanaAI/RLT): same text
    assert StratosFormat().teacher_sft(Q, S, E[2:], tokenizer).text == GOLDEN_SFT


def test_rl_prompt_golden_and_split(tokenizer) -> None:
    fmt = StratosFormat()
    prompt = fmt.teacher_prompt(Q, S, tokenizer)
    assert prompt == GOLDEN_RL_PROMPT
    assert prompt.endswith("<|begin_of_explanation|>\n\n")
    # the authors' construction (SakanaAI/RLT, P15): split the SFT text at the divider, exactly two parts
    parts = GOLDEN_SFT.split(DIVIDER)
    assert len(parts) == 2
    assert prompt == parts[0] + DIVIDER
    assert prompt + parts[1] == fmt.teacher_sft(Q, S, E, tokenizer).text
    assert parts[1] == "We add 2 and 3.\n\nSo 5.\n\n<|end_of_explanation|><|im_end|>\n"


def test_student_context_golden(tokenizer) -> None:
    rendered = StratosFormat().student_text(Q, E, S, tokenizer)
    assert rendered.text == GOLDEN_STUDENT
    text, spans = rendered.text, rendered.spans
    assert text[slice(*spans["explanation"])] == E
    assert text[slice(*spans["solution"])] == S
    assert text[slice(*spans["completion"])].startswith("<|begin_of_thought|>")
    assert text[slice(*spans["completion"])].endswith("<|end_of_solution|><|im_end|>\n")


def test_no_default_system_prompt(tokenizer) -> None:
    """P1: the Qwen template injects its own system message when none is given; every RLT chat has ours."""
    fmt = StratosFormat()
    default = "You are Qwen"
    bare = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert default in bare  # the template would inject it
    texts = [
        fmt.teacher_sft(Q, S, E, tokenizer).text,
        fmt.teacher_prompt(Q, S, tokenizer),
        fmt.student_text(Q, E, S, tokenizer).text,
        fmt.student_prompt(Q, tokenizer),
    ]
    for text in texts:
        assert default not in text
        assert text.startswith("<|im_start|>system\nYour role as an assistant involves")
        assert text.count("<|im_start|>system") == 1
    assert fmt.student_prompt(Q, tokenizer).endswith(f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n")


def test_compact_format_strings() -> None:
    fmt = CompactFormat()
    sft = fmt.teacher_sft("1+2", "3", "add", None)
    assert sft.text == "<Q>1+2<S>3<E>add</E>"
    assert sft.text[: sft.spans["prompt"][1]] == "<Q>1+2<S>3<E>"
    assert fmt.teacher_prompt("1+2", "3") == "<Q>1+2<S>3<E>"
    student = fmt.student_text("1+2", "add", "3")
    assert student.text == "<Q>1+2<T>add</T><A>3</A>"
    assert student.text[slice(*student.spans["explanation"])] == "add"
    assert student.text[slice(*student.spans["solution"])] == "3"
    assert fmt.student_prompt("1+2") == "<Q>1+2"
    assert fmt.tag_tokens() == ["<Q>", "<S>", "<E>", "</E>", "<T>", "</T>", "<A>", "</A>"]
    assert fmt.teacher_stop_strings() == ["</E>"] and fmt.student_stop_strings() == ["</A>"]
    scored = fmt.teacher_scoring_text("<Q>1+2<S>3<E>", "ad")
    assert scored.text == "<Q>1+2<S>3<E>ad</E>"
    assert scored.text[slice(*scored.spans["explanation"])] == "ad"
    assert fmt.student_answer("<T>x</T><A>7</A> junk <A>8</A>") == "8"
    assert fmt.student_answer("<T>x</T> no answer") is None


def test_chat_format_without_template_is_a_clear_error(tokenizer) -> None:
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    fmt = StratosFormat()
    for call in (
        lambda tok: fmt.teacher_prompt(Q, S, tok),
        lambda tok: fmt.teacher_sft(Q, S, E, tok),
        lambda tok: fmt.student_text(Q, E, S, tok),
        lambda tok: fmt.student_prompt(Q, tok),
    ):
        with pytest.raises(ValueError, match="chat template"):
            call(bare)
        with pytest.raises(ValueError, match="chat template"):
            call(None)


def test_template_that_rewrites_the_assistant_is_refused() -> None:
    """P15: a template that strips assistant content (R1-style think removal) cannot produce the RL prompt."""

    class Stripping:
        chat_template = "strips"

        def apply_chat_template(self, messages, **kwargs) -> str:
            return "".join(f"<{m['role']}>{m['content'].replace('<|begin_of_solution|>', '')}" for m in messages)

    with pytest.raises(ValueError, match="rewrites the teacher assistant"):
        StratosFormat().teacher_prompt(Q, S, Stripping())
    with pytest.raises(ValueError, match="rewrites the student assistant"):
        StratosFormat().student_text(Q, E, S, Stripping())


def test_invalid_formats_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="explanation_end"):
        CompactFormat(explanation_end="")
    with pytest.raises(ValueError, match="use_chat_template"):
        CompactFormat(teacher_system_prompt="be helpful")
    with pytest.raises(TypeError):
        RLTFormat()  # every field must be given


def test_teacher_scoring_text_needs_the_rl_prompt() -> None:
    with pytest.raises(ValueError, match="explanation start tag"):
        StratosFormat().teacher_scoring_text("no tag here", "abc")


# ----------------------------------------------------------------------------------------------------------------------
# parse_completion properties (SakanaAI/RLT)

_PIECES = st.sampled_from(
    ["<|end_of_explanation|>", "<|end_of_explanation", "<|begin_of_", "|>", "<|end_of_thought|>", "\n\n", " ", "</E>"]
)
_TEXT = st.lists(st.one_of(st.text(max_size=6), _PIECES), max_size=8).map("".join)


@settings(max_examples=150, deadline=None)
@given(completion=_TEXT)
def test_parse_completion_stratos(completion: str) -> None:
    fmt = StratosFormat()
    parsed = fmt.parse_completion(completion)
    end_tag = "<|end_of_explanation|>"
    assert parsed.matched == (end_tag in completion)
    first = completion.find(end_tag)
    if parsed.matched:
        assert parsed.end == first
        assert parsed.explanation == "\n\n" + completion[:first]
        assert end_tag not in parsed.explanation[2:]
    else:
        assert parsed.end == len(completion)
        assert parsed.explanation == "\n\n" + completion
    # the teacher context's explanation span is exactly the parsed explanation (padding included)
    prompt = "prefix<|begin_of_explanation|>\n\n"
    scored = fmt.teacher_scoring_text(prompt, completion)
    assert scored.text[slice(*scored.spans["explanation"])] == parsed.explanation
    assert scored.text == prompt + completion + ("" if parsed.matched else end_tag)
    assert scored.text.startswith(prompt)


@settings(max_examples=100, deadline=None)
@given(completion=_TEXT)
def test_parse_completion_compact(completion: str) -> None:
    parsed = CompactFormat().parse_completion(completion)
    assert parsed.matched == ("</E>" in completion)
    assert parsed.explanation == completion[: parsed.end]
    assert "</E>" not in parsed.explanation
