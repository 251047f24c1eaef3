"""Multi-digit addition with a column scratchpad: the synthetic reasoning task of `make demo`.

A good explanation is one fixed-width column per digit, least significant first, `x+y+c=ss;` (358+467:
`8+7+0=15;5+6+1=12;3+4+1=08;`). Imperfect explanation classes feed the teacher's SFT mix so that RL has something
to fix: `leak` states the answer, `noise` is random letters, `other` is another problem's scratchpad, `wrong`
corrupts one column. The answer is graded by exact match of the student's solution block (`<A>…</A>`).
"""

from __future__ import annotations

import random
import re

from rlt_pl.tasks.base import Task

EXPLANATION_KINDS = ("good", "leak", "noise", "other", "wrong")
_ANSWER = re.compile(r"<A>(.*?)(?:</A>|$)", re.S)


def scratchpad(a: int, b: int) -> str:
    """Column-wise addition, least significant digit first: `x+y+c=ss;` per column."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    carry, out = 0, []
    for x, y in zip(xs, ys):
        total = int(x) + int(y) + carry
        out.append(f"{x}+{y}+{carry}={total:02d};")
        carry = total // 10
    return "".join(out)


def make_explanation(kind: str, a: int, b: int, rng: random.Random) -> str:
    """An explanation of the given class for a + b."""
    if kind == "good":
        return scratchpad(a, b)
    if kind == "leak":
        return f"the sum is {a + b}."
    if kind == "noise":
        n = len(scratchpad(a, b))
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
    if kind == "other":
        lo, hi = 10 ** (len(str(a)) - 1), 10 ** len(str(a)) - 1
        return scratchpad(rng.randint(lo, hi), rng.randint(lo, hi))
    if kind == "wrong":
        cols = scratchpad(a, b).split(";")[:-1]
        i = rng.randrange(len(cols))
        head, digits = cols[i].split("=")
        cols[i] = f"{head}={(int(digits) + rng.randint(1, 9)) % 100:02d}"
        return ";".join(cols) + ";"
    raise ValueError(f"unknown explanation kind {kind!r}; choose from {EXPLANATION_KINDS}")


def classify_explanation(explanation: str, a: int, b: int) -> str:
    """Best-effort class of an explanation: good, wrong (right shape), leak (states the sum), or other."""
    if explanation == scratchpad(a, b):
        return "good"
    if re.fullmatch(r"(\d\+\d\+\d=\d\d;)+", explanation):
        return "wrong"
    if str(a + b) in explanation:
        return "leak"
    return "other"


def generate_additions(
    n: int, min_digits: int = 3, max_digits: int = 3, seed: int = 0, exclude: set[str] | None = None
) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs; each operand has between min_digits and max_digits digits."""
    rng = random.Random(seed)
    seen, out = set(exclude or ()), []
    capacity = sum(81 * 100 ** (d - 1) for d in range(min_digits, max_digits + 1))
    if n > capacity - len(seen):
        raise ValueError(f"cannot draw {n} distinct additions with {min_digits}-{max_digits} digits")
    while len(out) < n:
        d = rng.randint(min_digits, max_digits)
        a, b = rng.randint(10 ** (d - 1), 10**d - 1), rng.randint(10 ** (d - 1), 10**d - 1)
        if d == 1:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
        key = f"{a}+{b}"
        if key not in seen:
            seen.add(key)
            out.append((a, b))
    return out


class AdditionTask(Task):
    """Grader of the addition task: exact match of the last `<A>…</A>` block."""

    name = "addition"

    def format_question(self, row: dict) -> str:
        return row["question"]

    def extract_answer(self, response: str) -> str | None:
        found = _ANSWER.findall(response)
        return found[-1].strip() if found else None

    def is_correct(self, response: str, row: dict) -> bool:
        return self.extract_answer(response) == row["answer"]
