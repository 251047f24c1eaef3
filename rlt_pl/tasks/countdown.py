"""Countdown grader and seeded problem generator (TinyZero-style task; the RLT paper's zero-shot transfer benchmark).

Rules (decided here, following the Jiayi-Pan/TinyZero reward): the expression inside the last ``<answer>...</answer>``
must use **every given number exactly once** (as a multiset) with binary ``+ - * /`` and parentheses only, and evaluate
exactly (``fractions.Fraction``) to the target. Unary minus/plus are rejected (the task asks for binary operations on
the given positive numbers; TinyZero's regex would allow them). Only non-negative integer literals are allowed.
Expressions are parsed with ``ast.parse(mode="eval")`` and walked by our own evaluator: nothing is ever ``eval``-ed.
When no answer tags are present, the last ``\\boxed{}`` is used instead (RLT students answer in boxes).
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from rlt_pl.tasks.base import Task, last_boxed

MAX_EXPRESSION_CHARS = 200
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ALLOWED_CHARS_RE = re.compile(r"^[0-9+\-*/().\s]*$")
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class _Reject(Exception):
    """Internal: the expression breaks a rule (message = reason)."""


def check_expression(
    expression: str, nums: list[int], target: int, max_chars: int = MAX_EXPRESSION_CHARS
) -> tuple[bool, str]:
    """Validate and evaluate a countdown expression without ever executing it.

    Args:
        expression: Candidate equation such as ``"(1 + 2) * 3"`` (an ``"... = 9"`` suffix is tolerated if it
            states the target).
        nums: The given numbers; each must be used exactly once.
        target: The value the expression must equal exactly.
        max_chars: Longer expressions are rejected before parsing.

    Returns:
        ``(ok, reason)``; ``reason`` is ``"ok"`` or why the expression was rejected.
    """
    if not isinstance(expression, str):
        return False, "expression is not a string"
    if len(expression) > max_chars:
        return False, f"expression longer than {max_chars} characters"
    expr = expression.strip()
    if "=" in expr:  # "1 + 2 = 3": keep the left side, but only if the right side is the target
        left, _, right = expr.partition("=")
        if right.strip() != str(target):
            return False, "right-hand side of '=' is not the target"
        expr = left.strip()
    if not expr:
        return False, "empty expression"
    if not _ALLOWED_CHARS_RE.match(expr):
        return False, "disallowed characters (only digits, + - * / and parentheses)"
    if "**" in expr or "//" in expr:
        return False, "only + - * / are allowed"
    try:
        tree = ast.parse(expr, mode="eval")
        used: list[int] = []
        value = _evaluate(tree.body, used)
    except _Reject as err:
        return False, str(err)
    except ZeroDivisionError:
        return False, "division by zero"
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return False, f"unparsable expression ({type(err).__name__})"
    if Counter(used) != Counter(nums):
        return False, f"numbers used {sorted(used)} != given {sorted(nums)} (each exactly once)"
    if value != target:
        return False, f"evaluates to {value}, not {target}"
    return True, "ok"


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Evaluate a whitelisted AST node exactly, recording the integer literals used.

    Args:
        node: Expression node.
        used: Output list; each integer literal is appended.
    """
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise _Reject(f"operator {type(node.op).__name__} not allowed")
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        return left / right  # Fraction raises ZeroDivisionError on 0
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise _Reject(f"literal {node.value!r} is not an integer")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        raise _Reject("unary operators are not allowed")
    raise _Reject(f"{type(node).__name__} not allowed")


def format_countdown_question(nums: list[int], target: int) -> str:
    """The TinyZero-style countdown instruction.

    Args:
        nums: Given numbers.
        target: Target value.
    """
    return (
        f"Using the numbers {list(nums)}, create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can only be used once. Return the final answer in <answer> "
        "</answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )


class CountdownTask(Task):
    """Countdown: reach the target with every given number exactly once.

    Args:
        name: Task name used in metric keys.
        max_expression_chars: Answers longer than this are rejected without parsing.
    """

    def __init__(self, name: str = "countdown", max_expression_chars: int = MAX_EXPRESSION_CHARS) -> None:
        if max_expression_chars < 1:
            raise ValueError(f"max_expression_chars must be >= 1, got {max_expression_chars}")
        self.name = name
        self.max_expression_chars = max_expression_chars

    def format_question(self, row: dict) -> str:
        """Instruction built from ``row["metadata"]["nums"]`` and ``row["answer"]`` (the target).

        Args:
            row: Normalised countdown row.
        """
        return format_countdown_question(row["metadata"]["nums"], int(row["answer"]))

    def extract_answer(self, response: str) -> str | None:
        """Content of the last ``<answer>...</answer>``, else of the last ``\\boxed{}``.

        Args:
            response: Model output.
        """
        if not isinstance(response, str):
            return None
        matches = _ANSWER_RE.findall(response)
        answer = matches[-1] if matches else last_boxed(response)
        return answer.strip() if answer is not None and answer.strip() else None

    def is_correct(self, response: str, row: dict) -> bool:
        """Whether the extracted expression is valid and equals the target.

        Args:
            response: Model output.
            row: Normalised row (``answer`` = target as str, ``metadata["nums"]``).
        """
        expression = self.extract_answer(response)
        if expression is None:
            return False
        ok, _ = check_expression(expression, row["metadata"]["nums"], int(row["answer"]), self.max_expression_chars)
        return ok


def generate_countdown(n: int, num_numbers: int = 3, max_number: int = 20, seed: int = 0) -> list[dict]:
    """Seeded solvable countdown problems in the ``Jiayi-Pan/Countdown-Tasks-3to4`` schema.

    Each target is built by combining the numbers with random binary operations whose intermediate results stay
    positive integers, so the stored construction is always a valid solution.

    Args:
        n: Number of problems.
        num_numbers: Numbers per problem (>= 2).
        max_number: Numbers are drawn from ``1..max_number``.
        seed: RNG seed; equal arguments give equal problems.

    Returns:
        Rows ``{"target": int, "nums": list[int], "solution": str}`` (``solution`` is an extra key, the construction).
    """
    if n < 0 or num_numbers < 2 or max_number < 1:
        raise ValueError(f"need n >= 0, num_numbers >= 2, max_number >= 1; got {n}, {num_numbers}, {max_number}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums = [rng.randint(1, max_number) for _ in range(num_numbers)]
        items: list[tuple[Fraction, str]] = [(Fraction(x), str(x)) for x in nums]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (a, ea), (b, eb) = items[i], items[j]
            ops = ["+", "-", "*", "/"]
            rng.shuffle(ops)
            for op in ops:
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
                if value > 0 and value.denominator == 1:
                    break
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
        value, expr = items[0]
        rows.append({"target": int(value), "nums": nums, "solution": expr[1:-1]})
    return rows
