"""pass@k (function and torchmetrics Metric) and the end-to-end BenchmarkEvaluator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlt_pl.evaluation import BenchmarkEvaluator
from rlt_pl.metrics import PassAtK, pass_at_k
from rlt_pl.tasks import GPQATask, MathTask


def _combinatorial(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(5, 2, 1, 0.4), (5, 2, 2, 0.7), (5, 0, 3, 0.0), (5, 4, 2, 1.0), (4, 2, 3, 1.0), (1, 1, 1, 1.0), (1, 0, 1, 0.0)],
)
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomial_form_and_is_stable():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_combinatorial(n, c, k), abs=1e-12)
    assert 0.0 < pass_at_k(2000, 3, 10) < 1.0  # comb() of these would be astronomically large


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_pass_at_k_metric_accumulates_and_resets():
    metric = PassAtK(k=2)
    metric.update([5, 5], [2, 0])
    metric.update(torch.tensor([4]), torch.tensor([4]))
    assert metric.compute().item() == pytest.approx((0.7 + 0.0 + 1.0) / 3)
    metric.reset()
    with pytest.warns(UserWarning, match="before any update"):
        assert metric.compute().item() == 0.0
    with pytest.raises(ValueError, match="entries"):
        metric.update([1, 2], [1])


def _math_rows() -> list[dict]:
    base = {"solution": "", "thought": None}
    return [
        {"id": "a", "question": "1/2?", "answer": "\\frac{1}{2}", "metadata": {"subject": "Algebra", "level": 1}}
        | base,
        {"id": "b", "question": "2+2?", "answer": "4", "metadata": {"subject": "Geometry", "level": 2}} | base,
    ]


def test_evaluator_end_to_end(tmp_path):
    out = tmp_path / "sub" / "math500.jsonl"
    ev = BenchmarkEvaluator(MathTask(), "math500", k_values=(1, 2), output_path=str(out))
    rows = _math_rows()
    responses = [["\\boxed{0.5}", "\\boxed{1/3}", "I am unsure"], ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}"]]
    ev.update(rows, responses, token_counts=[[3, 4, 5], [6, 7, 8]])
    m = ev.compute()
    assert m["math500/pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["math500/pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + pass_at_k(3, 2, 2)) / 2)
    assert m["math500/pass@1/subject=Algebra"] == pytest.approx(1 / 3)
    assert m["math500/pass@1/level=2"] == pytest.approx(2 / 3)
    assert m["math500/no_answer_rate"] == pytest.approx(1 / 6)
    chars = [len(s) for r in responses for s in r]
    assert m["math500/response_chars_mean"] == pytest.approx(sum(chars) / 6)
    assert m["math500/response_tokens_mean"] == pytest.approx(5.5)
    assert m["math500/num_questions"] == 2.0

    path = ev.write_jsonl()
    assert path == out.resolve()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"]
    assert records[0]["correct"] == [True, False, False]
    assert records[0]["extracted"] == ["0.5", "1/3", None]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # temp file replaced, not left behind

    ev.reset()
    assert ev.compute() == {}


def test_evaluator_rejects_mismatched_inputs():
    ev = BenchmarkEvaluator(GPQATask(), "gpqa", k_values=(4,))
    row = {"id": "g", "question": "Q", "answer": "B", "solution": "", "thought": None, "metadata": {}}
    with pytest.raises(ValueError, match="samples"):
        ev.update([row], [["\\boxed{B}"]])
    with pytest.raises(ValueError, match="rows but"):
        ev.update([row], [])
    with pytest.raises(TypeError, match="list of samples"):
        ev.update([row], ["\\boxed{B}"])
    with pytest.raises(ValueError, match="output_path"):
        ev.write_jsonl()
    ev.update([row], [["\\boxed{B}", "Answer: b", "\\boxed{A}", "nothing"]])
    m = ev.compute()
    assert m["gpqa/pass@1"] == pytest.approx(0.5) and m["gpqa/pass@4"] == 1.0
