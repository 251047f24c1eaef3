"""Graders: math (math_verify + fallbacks), GPQA letters and shuffling, Countdown safety and the generator."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlt_pl.tasks import CountdownTask, GPQATask, MathTask, check_expression, generate_countdown, last_boxed
from rlt_pl.tasks.math import BOXED_PREFIX


def _row(answer: str, **metadata) -> dict:
    return {"id": "q", "question": "Q?", "answer": answer, "solution": answer, "thought": None, "metadata": metadata}


# ----------------------------------------------------------------------------------------------------------- math
def test_last_boxed_balanced_and_last_wins():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7} then nothing") == "7"
    assert last_boxed("\\boxed{unclosed {x}") is None
    assert last_boxed("\\boxed{3} and \\boxed{oops") == "3"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed 5$") == "5"


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
        ("\\boxed{5 \\text{ cm}}", "5", True),
        ("first \\boxed{3} then corrected \\boxed{4}", "4", True),
        ("first \\boxed{4} then corrected \\boxed{3}", "4", False),
        ("The answer is 4.", "4", False),
        ("", "4", False),
        ("\\boxed{}", "4", False),
        ("\\boxed{009}", "9", True),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{7}", "8", False),
    ],
)
def test_math_grader_cases(response, gold, expected):
    assert MathTask().is_correct(response, _row(gold)) is expected


def test_math_format_question_prefix_once():
    task = MathTask()
    assert task.format_question(_row("1") | {"question": "What is 1?"}) == BOXED_PREFIX + "What is 1?"
    already = BOXED_PREFIX + "What is 1?"
    assert task.format_question(_row("1") | {"question": already}) == already


def test_math_grader_off_main_thread_falls_back_to_string_compare():
    task, results = MathTask(), {}

    def work():
        results["same"] = task.is_correct("\\boxed{\\dfrac{1}{2}}", _row("\\frac{1}{2}"))
        results["needs_sympy"] = task.is_correct("\\boxed{0.5}", _row("\\frac{1}{2}"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == {"same": True, "needs_sympy": False}
    assert task.fallback_count == 1


def test_math_grader_never_raises_on_weird_input():
    task = MathTask()
    for text in ["\\boxed{\\frac{", "\\boxed{}}}}", "\\boxed{" + "(" * 300 + "}", "\\boxed{\\int\\int\\sum}"]:
        assert task.is_correct(text, _row("1")) is False


# ----------------------------------------------------------------------------------------------------------- gpqa
@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("Thus \\boxed{C}", "C"),
        ("\\boxed{(b)}", "B"),
        ("\\boxed{\\text{D}}", "D"),
        ("After all that, the answer is (C).", "C"),
        ("Answer: c", "C"),
        ("The final choice is B", "B"),
        ("Reasoning...\n\n**A**", "A"),
        ("I pick (D)", "D"),
        ("The answer is A, not B... wait, the answer is B", "B"),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_gpqa_letter_extraction(response, letter):
    assert GPQATask().extract_answer(response) == letter


def test_gpqa_shuffle_is_deterministic_and_consistent():
    task = GPQATask(seed=0)
    wrong = ["w1", "w2", "w3"]
    first = task.shuffle_options("rec1", "right", wrong)
    assert first == GPQATask(seed=0).shuffle_options("rec1", "right", wrong)
    options, letter = first
    assert sorted(options) == sorted(["right", *wrong])
    assert options["ABCD".index(letter)] == "right"
    letters = {task.shuffle_options(f"rec{i}", "right", wrong)[1] for i in range(40)}
    assert letters == set("ABCD")  # the correct answer is not always in one place
    seeds = {GPQATask(seed=s).shuffle_options("rec1", "right", wrong)[0][0] for s in range(20)}
    assert len(seeds) > 1
    with pytest.raises(ValueError, match="incorrect answers"):
        task.shuffle_options("rec1", "right", ["only one"])


def test_gpqa_format_and_grade():
    task = GPQATask()
    options, letter = task.shuffle_options("r", "Neutron", ["Proton", "Electron", "Positron"])
    row = _row(letter, options=options)
    text = task.format_question(row)
    assert "A) " in text and "D) " in text and "only include the letter choice" in text
    assert task.is_correct(f"\\boxed{{{letter}}}", row)
    wrong = next(x for x in "ABCD" if x != letter)
    assert not task.is_correct(f"\\boxed{{{wrong}}}", row)


# ------------------------------------------------------------------------------------------------------ countdown
def _cd_row(nums: list[int], target: int) -> dict:
    return _row(str(target), nums=nums, target=target)


def test_countdown_accepts_valid_and_exact_division():
    task = CountdownTask()
    assert task.is_correct("<answer> (4 + 6 - 1) * 1 </answer>", _cd_row([4, 6, 1, 1], 9))
    assert task.is_correct("work <answer>7</answer> ... <answer> 6 / 4 * 2 </answer>", _cd_row([6, 4, 2], 3))
    assert task.is_correct("\\boxed{(2 + 3) * 4}", _cd_row([2, 3, 4], 20))  # box fallback
    assert task.is_correct("<answer>2 + 3 * 4 = 14</answer>", _cd_row([2, 3, 4], 14))
    assert "<answer>" in task.format_question(_cd_row([1, 2, 3], 6))


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("4 + 4 + 6", "numbers used"),  # reuses 4
        ("4 + 6", "numbers used"),  # does not use every number
        ("4 ** 6 - 1", "only + - * /"),
        ("9 ** 9 ** 9 ** 9", "only + - * /"),
        ("4 // 6 + 1", "only + - * /"),
        ("4 % 6 + 1", "disallowed characters"),
        ("6 / (4 - 4) + 1", "division by zero"),
        ("__import__('os').system('echo hi')", "disallowed characters"),
        ("(4).real + 6 + 1", "disallowed characters"),
        ("(4)(6)(1)", "Call"),
        ("-4 + 6 + 1", "unary"),
        ("4.0 + 6 + 1", "not an integer"),
        ("1" * 500, "longer than"),
        ("4 + 6 +", "unparsable"),
        ("4 + 6 + 1 = 12", "right-hand side"),
        ("", "empty"),
        ("4 + 6 + 1", "evaluates to"),
    ],
)
def test_countdown_rejects_bad_expressions(expression, reason):
    ok, why = check_expression(expression, [4, 6, 1], 24)
    assert ok is False
    assert reason in why


def test_countdown_walker_rejects_non_arithmetic_nodes_and_deep_nesting():
    import ast

    from rlt_pl.tasks.countdown import _evaluate, _Reject

    for source in ["(4).real", "f(4)", "x + 1", "2 ** 3", "[1, 2]", "1 if 1 else 2", "1 < 2"]:
        with pytest.raises(_Reject):
            _evaluate(ast.parse(source, mode="eval").body, [])
    ok, why = check_expression("(" * 300 + "4" + ")" * 300, [4], 4, max_chars=1000)
    assert not ok and "unparsable" in why


def test_countdown_missing_answer_is_false():
    assert CountdownTask().extract_answer("no tags here") is None
    assert not CountdownTask().is_correct("no tags here", _cd_row([1, 2], 3))


def test_generate_countdown_is_seeded_and_in_hub_schema():
    a, b = generate_countdown(20, seed=3), generate_countdown(20, seed=3)
    assert a == b and a != generate_countdown(20, seed=4)
    assert all(set(r) == {"target", "nums", "solution"} and len(r["nums"]) == 3 for r in a)
    assert all(isinstance(r["target"], int) and r["target"] > 0 for r in a)
    with pytest.raises(ValueError):
        generate_countdown(3, num_numbers=1)


@settings(max_examples=60, deadline=None)
@given(n_nums=st.integers(2, 5), max_number=st.integers(1, 60), seed=st.integers(0, 10_000), count=st.integers(1, 4))
def test_generated_solutions_always_grade_true(n_nums, max_number, seed, count):
    task = CountdownTask()
    for problem in generate_countdown(count, n_nums, max_number, seed):
        row = _cd_row(problem["nums"], problem["target"])
        assert task.is_correct(f"<answer>{problem['solution']}</answer>", row), problem


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300), nums=st.lists(st.integers(1, 50), min_size=1, max_size=4))
def test_graders_never_raise_on_garbage(text, nums):
    row = _cd_row(nums, 10)
    assert CountdownTask().is_correct(f"<answer>{text}</answer>", row) in (True, False)
    assert check_expression(text, nums, 10)[0] in (True, False)
    assert GPQATask().is_correct(text, _row("A")) in (True, False)
    assert MathTask().extract_answer(text) is None or isinstance(MathTask().extract_answer(text), str)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="0123456789+-*/() ", max_size=60))
def test_countdown_arithmetic_garbage_never_raises(text):
    assert check_expression(text, [1, 2, 3], 6)[0] in (True, False)
