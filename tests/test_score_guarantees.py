"""The offline scorer's guarantees: it reads `TraceWriter` shards as they are, takes (or checks) the format from the
data, survives hostile lines (counted by line), refuses bad outputs and mismatched models before any work, bounds
every forward by `--max-length`, ranks penalties below regular rows and writes files with the umask's permissions."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlt_pl.formats import StratosFormat
from rlt_pl.rewards import RewardConfig
from rlt_pl.score import main
from rlt_pl.scoring import RLTScorer

Q = "what is 2 + 3?"
S = "\n\n5\n\n"
END = "<|end_of_explanation|>"


def _argv(tiny_dirs, src, dst=None, *extra) -> list[str]:
    argv = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(tiny_dirs["student"]), "--input", str(src)]
    return argv + (["--output", str(dst)] if dst is not None else []) + list(extra)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _trace(i: int, thought: str, matched: bool = True) -> dict:
    return {"id": i, "question": Q, "solution": S, "answer": "5", "thought": thought, "matched": matched}


def test_trace_shards_are_read_directly_and_their_format_checked(tiny_dirs, tmp_path, capsys) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    pad = StratosFormat().explanation_padding
    shard0 = [_trace(0, pad + "we add 2 and 3\n\n"), _trace(1, pad + "two plus three")]
    shard1 = [_trace(2, pad + "never closed", matched=False)]
    for k, rows in enumerate((shard0, shard1)):
        (traces / f"shard-{k:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (traces / "lineage.json").write_text(json.dumps({"model": "t", "format": "StratosFormat"}))
    (traces / "summary.json").write_text("{}")
    dst = tmp_path / "scored.jsonl"
    assert main(_argv(tiny_dirs, traces, dst)) == 0
    rows = _read(dst)
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["matched"] for r in rows] == [True, True, False]
    # a trace scores like the completion it came from (thought minus padding, plus the end tag when it closed)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": Q, "solution": S, "completion": "we add 2 and 3\n\n" + END}) + "\n")
    assert main(_argv(tiny_dirs, plain, tmp_path / "plain.out.jsonl")) == 0
    assert rows[0]["rss"] == pytest.approx(_read(tmp_path / "plain.out.jsonl")[0]["rss"], abs=1e-6)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="--format compact disagrees with the traces' lineage.json"):
        main(_argv(tiny_dirs, traces, dst, "--format", "compact"))


def test_wrong_format_for_the_completions_is_refused(tiny_dirs, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": Q, "solution": S, "completion": "we add" + END}) + "\n")
    with pytest.raises(SystemExit, match=r"--format compact: no completion contains its end tag '</E>'"):
        main(_argv(tiny_dirs, src, tmp_path / "out.jsonl", "--format", "compact"))
    assert not (tmp_path / "out.jsonl").exists()


def test_hostile_lines_are_counted_by_line_and_the_rest_is_scored(tiny_dirs, tmp_path, capsys) -> None:
    good = {"question": "café: 2 + 3?", "solution": S, "completion": "we add" + END}
    nfd = dict(good, question="cafe\u0301: 2 + 3?")
    lines = [
        json.dumps(good).encode(),
        json.dumps(nfd, ensure_ascii=False).encode(),  # NFD: normalised and counted, scored like the NFC row
        b'{"question": "\\ud800", "solution": "5", "completion": "x"}',  # lone surrogate
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply
        b'{"question": "q", "solution": "5", "completion": "x", "n": ' + b"9" * 5000 + b"}",  # huge integer
        b'{"question": "\xff\xfe", "solution": "5", "completion": "x"}',  # invalid UTF-8
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    dst = tmp_path / "out.jsonl"
    assert main(_argv(tiny_dirs, src, dst)) == 0
    captured = capsys.readouterr()
    assert "scored 2 rows" in captured.out and "malformed 4" in captured.out and "nfc_normalized 1" in captured.out
    for number, reason in [(3, "lone surrogate"), (4, "nested too deeply"), (5, "bad JSON"), (6, "invalid UTF-8")]:
        assert f"in.jsonl:{number}: skipped: " in captured.err and reason in captured.err
    rows = _read(dst)
    assert rows[1]["question"] == nfd["question"]  # the input row is kept as it was
    assert rows[1]["reward"] == pytest.approx(rows[0]["reward"], abs=1e-6)


def test_bad_outputs_are_refused_before_any_work(tiny_dirs, tmp_path, monkeypatch) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": Q, "solution": S, "completion": "c" + END}) + "\n")
    before = src.read_bytes()

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_models)
    with pytest.raises(SystemExit, match="is the input file"):
        main(_argv(tiny_dirs, src, src))
    with pytest.raises(SystemExit, match="is the input file"):
        main(_argv(tiny_dirs, src, tmp_path / "." / "in.jsonl"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write there"):
        main(_argv(tiny_dirs, src, tmp_path / "a_file" / "out.jsonl"))
    with pytest.raises(SystemExit, match="is a directory"):
        main(_argv(tiny_dirs, src, tmp_path))
    assert src.read_bytes() == before


def test_output_gets_the_umask_permissions(tiny_dirs, tmp_path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"question": Q, "solution": S, "completion": "c" + END}) + "\n")
    old = os.umask(0o022)
    try:
        assert main(_argv(tiny_dirs, src, dst, "--dtype", "float32")) == 0
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o644


def test_mismatched_tokenizers_are_refused_naming_the_flag(tiny_dirs, tmp_path) -> None:
    from rlt_pl.formats import CompactFormat
    from rlt_pl.tiny import build_compact_assets

    other = build_compact_assets(tmp_path / "compact", CompactFormat().tag_tokens(), seed=0)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": Q, "solution": S, "completion": "c" + END}) + "\n")
    argv = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(other["student"]), "--input", str(src)]
    with pytest.raises(SystemExit, match="--allow-tokenizer-mismatch"):
        main(argv)


def _student_tokens(tokenizer, completion: str) -> int:
    fmt = StratosFormat()
    text = fmt.student_text(Q, fmt.parse_completion(completion).explanation, S, tokenizer).text
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_penalties_rank_below_regular_rows_across_batches(tiny_dirs, tokenizer, tmp_path, capsys) -> None:
    long = "the sum of two and three " * 40 + END
    comps = ["we add 2 and 3" + END, long, "five" + END, "never closed", "2 and 3 make 5" + END]
    limit = max(_student_tokens(tokenizer, c) for c in comps if c != long) + 4
    assert _student_tokens(tokenizer, long) > limit
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = "".join(
        json.dumps({"id": i, "question": Q, "solution": S, "completion": c}) + "\n" for i, c in enumerate(comps)
    )
    src.write_text(body)
    # one row per batch: the group of a row is every row of the file with its question and solution
    assert main(_argv(tiny_dirs, src, dst, "--batch-size", "1", "--max-length", str(limit))) == 0
    rows = _read(dst)
    assert [r["penalised"] for r in rows] == [None, "overflow", None, "unmatched", None]
    worst_regular = min(r["reward"] for r in rows if r["penalised"] is None)
    assert max(r["reward"] for r in rows if r["penalised"]) <= worst_regular - 1.0 + 1e-6
    assert 'penalised 2 {"overflow": 1, "unmatched": 1}' in capsys.readouterr().out


def test_max_length_bounds_the_teacher_forward(tokenizer, teacher_model, student_model) -> None:
    fmt = StratosFormat()
    long, short = "the sum of two and three " * 60 + END, "we add" + END
    limit = _student_tokens(tokenizer, short) + 8
    widths = []
    hook = teacher_model.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        prompts = [fmt.teacher_prompt(Q, S, tokenizer)] * 2
        scorer = RLTScorer(student_model, tokenizer, fmt, RewardConfig(), max_length=limit)
        res = scorer.score([Q, Q], [S, S], [long, short], teacher_model=teacher_model, prompts=prompts)
    finally:
        hook.remove()
    assert widths and max(widths) <= limit
    assert res.output.components["overflow"].tolist() == [1, 0] and res.counts["overflow"] == 1
    assert torch.isfinite(res.output.reward).all() and float(res.output.reward[0]) < float(res.output.reward[1])


def test_penalised_rows_without_a_regular_row_in_their_group_rank_below_the_file(tiny_dirs, tmp_path, capsys) -> None:
    rows = [
        {"question": Q, "solution": S, "completion": "we add" + END},
        {"question": Q, "solution": "", "completion": "we add" + END},  # empty solution: its own group
        {"question": "q " * 3000, "solution": S, "completion": "we add" + END},  # overflows: its own group
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(_argv(tiny_dirs, src, dst)) == 0
    regular, empty, long = _read(dst)
    assert (regular["penalised"], empty["penalised"], long["penalised"]) == (None, "empty_solution", "overflow")
    assert max(empty["reward"], long["reward"]) <= regular["reward"] - 1.0


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--temperature", "0"], "--temperature"),
        (["--student-temperature", "inf"], "--student-temperature"),
        (["--kl-coeffs", "nan", "0"], "--kl-coeffs"),
        (["--token-budget", "0"], "--token-budget"),
        (["--device", "tpu9"], "--device"),
        (["--teacher", "/no/such/teacher"], "--teacher"),
        (["--student", "IS_A_FILE"], "--student"),
    ],
)
def test_bad_flags_end_with_one_line_naming_the_flag(tiny_dirs, tmp_path, extra, flag) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": Q, "solution": S, "completion": "x" + END}) + "\n")
    extra = [str(src) if x == "IS_A_FILE" else x for x in extra]
    with pytest.raises(SystemExit) as exc:
        main(_argv(tiny_dirs, src, tmp_path / "out.jsonl") + extra)
    assert isinstance(exc.value.code, str) and exc.value.code.startswith(flag)
    assert not (tmp_path / "out.jsonl").exists()


def test_rows_with_an_empty_question_or_a_non_bool_matched_are_skipped_and_a_bom_is_not(tiny_dirs, tmp_path, capsys):
    good = json.dumps({"question": Q, "solution": S, "completion": "x" + END}).encode()
    lines = [
        b"\xef\xbb\xbf" + good,
        json.dumps({"question": " ", "solution": S, "completion": "x" + END}).encode(),
        json.dumps({"question": Q, "solution": S, "thought": "t", "matched": "no"}).encode(),
        b'{"question": "q", "solution": "5", "completion": "x", "n": Infinity}',
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    assert main(_argv(tiny_dirs, src, dst)) == 0
    assert len(_read(dst)) == 1
    err = capsys.readouterr().err
    assert all(f"in.jsonl:{n}: skipped:" in err for n in (2, 3, 4)) and "in.jsonl:1:" not in err
