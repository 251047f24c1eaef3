"""End-to-end test of the offline scorer CLI (`python -m rlt_pl.score`) on the tiny assets, called via main()."""

from __future__ import annotations

import json

import pytest
import torch

from rlt_pl.formats import StratosFormat
from rlt_pl.rewards import RewardConfig
from rlt_pl.score import main, parse_row
from rlt_pl.scoring import RLTScorer

Q = "what is 2 + 3?"
S = "\n\n5\n\n"


def write_lines(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_score_cli_end_to_end(tiny_dirs, tokenizer, teacher_model, student_model, tmp_path, capsys) -> None:
    good = [
        {"id": 0, "question": Q, "solution": S, "completion": "we add 2 and 3\n\n<|end_of_explanation|>"},
        {"id": 1, "question": Q, "solution": S, "explanation": "\n\nwe add 2 and 3\n\n"},
        {"id": 2, "question": Q, "solution": S, "completion": "never closed"},
    ]
    lines = [
        json.dumps(good[0]),
        "{not json",
        json.dumps({"question": Q, "completion": "x"}),  # no solution
        "",
        json.dumps(good[1]),
        json.dumps(["a", "list"]),
        json.dumps({"question": Q, "solution": S}),  # neither completion nor explanation
        json.dumps(good[2]),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "scored.jsonl"
    write_lines(src, lines)
    argv = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(tiny_dirs["student"]), "--input", str(src)]
    argv += ["--output", str(dst), "--batch-size", "2", "--kl-coeffs", "3", "0.03", "--temperature", "0.7"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    for number in (2, 3, 6, 7):
        assert f"in.jsonl:{number}: skipped" in captured.err
    assert "in.jsonl:5" not in captured.err and "in.jsonl:4" not in captured.err
    assert "scored 3 rows" in captured.out and "malformed 4" in captured.out and "unmatched 1" in captured.out

    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["scored.jsonl"]  # no temp file left
    for row, src_row in zip(rows, good):
        assert {k: row[k] for k in src_row} == src_row
        assert {"reward", "rss", "rkl", "matched", "components"} <= set(row)
    assert [r["matched"] for r in rows] == [True, True, False]
    # an explanation row is the completion "explanation minus padding + end tag"
    assert rows[1]["reward"] == pytest.approx(rows[0]["reward"], abs=1e-6)

    fmt = StratosFormat()
    completions = [good[0]["completion"], "we add 2 and 3\n\n<|end_of_explanation|>", "never closed"]
    prompts = [fmt.teacher_prompt(Q, S, tokenizer)] * 3
    res = RLTScorer(student_model, tokenizer, fmt, RewardConfig()).score(
        [Q] * 3, [S] * 3, completions, teacher_model=teacher_model, prompts=prompts
    )
    torch.testing.assert_close(torch.tensor([r["reward"] for r in rows]), res.output.reward, atol=1e-5, rtol=0)
    assert rows[2]["components"]["reward_with_entropy"] == pytest.approx(rows[2]["reward"], abs=1e-6)


def test_score_cli_options_and_all_bad_input(tiny_dirs, tmp_path, capsys) -> None:
    src = tmp_path / "bad.jsonl"
    write_lines(src, ["nope", json.dumps({"question": 3, "solution": S, "completion": "c"})])
    argv = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(tiny_dirs["student"]), "--input", str(src)]
    assert main(argv) == 2
    out = tmp_path / "bad.scored.jsonl"
    assert out.exists() and out.read_text() == ""
    err = capsys.readouterr().err
    assert (
        "bad.jsonl:1: skipped: bad JSON" in err
        and "bad.jsonl:2: skipped: missing or non-string field 'question'" in err
    )
    with pytest.raises(SystemExit):
        main(argv + ["--format", "nope"])


def test_score_cli_max_length_penalises_overflow(tiny_dirs, tmp_path, capsys) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [json.dumps({"question": Q, "solution": S, "completion": "we add<|end_of_explanation|>"})])
    argv = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(tiny_dirs["student"]), "--input", str(src)]
    assert main(argv + ["--output", str(dst), "--max-length", "16", "--rss-coeffs", "1", "0.01"]) == 0
    row = json.loads(dst.read_text())
    assert row["reward"] == pytest.approx(-1.01 - 3.03)
    assert "overflow 1" in capsys.readouterr().out


def test_parse_row_explanation_padding() -> None:
    fmt = StratosFormat()
    row, reason = parse_row(json.dumps({"question": "q", "solution": "s", "explanation": "\n\nabc\n\n"}), fmt)
    assert reason is None and row["_completion"] == "abc\n\n<|end_of_explanation|>"
    row, _ = parse_row(json.dumps({"question": "q", "solution": "s", "explanation": "abc"}), fmt)
    assert row["_completion"] == "abc<|end_of_explanation|>"
    assert parse_row("[]", fmt) == (None, "not a JSON object")
