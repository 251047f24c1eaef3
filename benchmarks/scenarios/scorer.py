"""Scorer scenarios: `rlt_pl.score.main` in process on bad lines, encodings, empty / overlong fields, flags, paths."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from benchmarks.scenarios import Observation, Scenario
from rlt_pl.formats import StratosFormat

END = StratosFormat().explanation_end
PAD = StratosFormat().explanation_padding
Q, S = "what is 2 + 3?", "\n\n5\n\n"
UNWRITABLE = Path("/proc/rlt_pl_unwritable")  # not creatable, even by root


def row(**kw) -> dict:
    return {"question": Q, "solution": S, "completion": "we add" + END, **kw}


def line(**kw) -> bytes:
    return json.dumps(row(**kw), ensure_ascii=False).encode()


def _strict(text: str) -> list[dict]:
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(x, parse_constant=refuse) for x in text.splitlines()]


class Runner:
    """Writes an input file per scenario and runs the scorer on it; the result is (rc, output rows or None)."""

    def __init__(self, dirs: dict, tmp: Path) -> None:
        self.dirs, self.tmp, self.n = dirs, tmp, 0
        tmp.mkdir(parents=True, exist_ok=True)

    def path(self, suffix: str = ".jsonl") -> Path:
        self.n += 1
        return self.tmp / f"in-{self.n}{suffix}"

    def run(self, data: bytes | Path, *extra: str, output: Path | None = None, teacher=None, student=None):
        from rlt_pl.score import main

        if isinstance(data, Path):
            src = data
        else:
            src = self.path()
            src.write_bytes(data)
        out = output or self.tmp / f"out-{self.n}.jsonl"
        argv = ["--teacher", str(teacher or self.dirs["teacher"]), "--student", str(student or self.dirs["student"])]
        rc = main([*argv, "--input", str(src), "--output", str(out), *extra])
        if rc != 0:
            raise SystemExit(rc)
        rows = _strict(out.read_text(encoding="utf-8")) if out.is_file() else None
        return rc, rows


def _good_rows(obs: Observation, n: int) -> bool:
    rc, rows = obs.value
    return rc == 0 and rows is not None and len(rows) == n


BAD_LINES: dict[str, bytes] = {
    "bad JSON": b"{nope",
    "truncated object": b'{"question": "q", "solution"',
    "trailing comma": b'{"question": "q", "solution": "5", "completion": "x",}',
    "single quotes": b"{'question': 'q', 'solution': '5', 'completion': 'x'}",
    "NaN literal as question": b'{"question": NaN, "solution": "5", "completion": "x"}',
    "not an object (list)": b"[1, 2]",
    "not an object (string)": b'"question"',
    "not an object (number)": b"42",
    "not an object (null)": b"null",
    "missing question": json.dumps({"solution": S, "completion": "x"}).encode(),
    "missing solution": json.dumps({"question": Q, "completion": "x"}).encode(),
    "no completion, explanation or thought": json.dumps({"question": Q, "solution": S}).encode(),
    "question is an int": json.dumps({"question": 3, "solution": S, "completion": "x"}).encode(),
    "question is null": json.dumps({"question": None, "solution": S, "completion": "x"}).encode(),
    "solution is a list": json.dumps({"question": Q, "solution": ["5"], "completion": "x"}).encode(),
    "completion is an object": json.dumps({"question": Q, "solution": S, "completion": {"a": 1}}).encode(),
    "completion is a bool": json.dumps({"question": Q, "solution": S, "completion": True}).encode(),
    "lone surrogate in question": b'{"question": "\\ud800", "solution": "5", "completion": "x"}',
    "lone surrogate in solution": b'{"question": "q", "solution": "\\udfff", "completion": "x"}',
    "lone surrogate in completion": b'{"question": "q", "solution": "5", "completion": "a\\ud83d"}',
    "invalid UTF-8 byte": b'{"question": "\xff", "solution": "5", "completion": "x"}',
    "truncated UTF-8 sequence": b'{"question": "\xe2\x82", "solution": "5", "completion": "x"}',
    "overlong UTF-8 encoding": b'{"question": "\xc0\xaf", "solution": "5", "completion": "x"}',
    "Latin-1 encoded text": '{"question": "café", "solution": "5", "completion": "x"}'.encode("latin-1"),
    "UTF-16 encoded line": '{"question": "q", "solution": "5", "completion": "x"}'.encode("utf-16"),
    "deep nesting (100k)": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting inside a field": b'{"question": "q", "solution": "5", "completion": "x", "m": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "5000-digit integer field": b'{"question": "q", "solution": "5", "completion": "x", "n": ' + b"9" * 5000 + b"}",
    "5000-digit integer as question": b'{"question": ' + b"9" * 5000 + b', "solution": "5", "completion": "x"}',
    "float overflowing to inf": b'{"question": "q", "solution": "5", "completion": "x", "n": 1e999}',
    "Infinity literal in a field": b'{"question": "q", "solution": "5", "completion": "x", "n": -Infinity}',
    "thought with non-bool matched": json.dumps(
        {"question": Q, "solution": S, "thought": "t", "matched": "no"}
    ).encode(),
    "empty question": line(question=""),
    "whitespace-only question": line(question=" \n\t"),
}


def _bad_line(r: Runner, name: str, bad: bytes) -> Scenario:
    good = [line(), line(question="what is 1 + 4?")]

    def lost(obs: Observation) -> bool:
        rc, rows = obs.value
        return rc != 0 or rows is None or len([x for x in rows if x.get("completion") == row()["completion"]]) < 2

    return Scenario(
        "scorer",
        f"bad line: {name}",
        lambda: r.run(good[0] + b"\n" + bad + b"\n" + good[1] + b"\n"),
        row_level=True,
        lost=lost,
        reported=lambda obs: ":2: skipped:" in obs.text,
    )


def _handled(r: Runner, name: str, data: bytes, n: int, check=None, *extra: str) -> Scenario:
    def correct(obs: Observation) -> bool:
        return _good_rows(obs, n) and (check is None or check(obs.value[1]))

    return Scenario("scorer", name, lambda: r.run(data, *extra), row_level=True, correct=correct)


def _penalised(r: Runner, name: str, bad: dict, reason: str, *extra: str) -> Scenario:
    """A row whose reward must be a penalty, reported in `penalised`, below the regular row of its group."""

    def reported(obs: Observation) -> bool:
        rc, rows = obs.value
        if rc != 0 or rows is None or len(rows) != 2:
            return False
        regular, pen = rows
        return pen["penalised"] == reason and regular["penalised"] is None and pen["reward"] < regular["reward"]

    data = line() + b"\n" + json.dumps(bad, ensure_ascii=False).encode() + b"\n"
    return Scenario("scorer", name, lambda: r.run(data, *extra), row_level=True, reported=reported)


def _flag(r: Runner, name: str, culprit: tuple[str, ...], *extra: str, **kw) -> Scenario:
    return Scenario("scorer", name, lambda: r.run(line() + b"\n", *extra, **kw), culprit=culprit)


def scenarios(dirs: dict, cdirs: dict, tmp: Path) -> list[Scenario]:
    r = Runner(dirs, tmp)
    out = [_bad_line(r, name, bad) for name, bad in BAD_LINES.items()]
    nfd = unicodedata.normalize("NFD", "café?")
    out += [
        Scenario(
            "scorer",
            f"NFD text in {key}",
            lambda key=key: r.run(line(**{key: nfd}) + b"\n"),
            row_level=True,
            reported=lambda obs: _good_rows(obs, 1) and "nfc_normalized 1" in obs.text,
        )
        for key in ("question", "solution", "completion")
    ]
    out += [
        _handled(r, "UTF-8 BOM before the first row", b"\xef\xbb\xbf" + line() + b"\n" + line() + b"\n", 2),
        _handled(r, "CRLF line endings", line() + b"\r\n" + line() + b"\r\n", 2),
        _handled(r, "blank and whitespace-only lines", b"\n" + line() + b"\n  \n\t\n" + line() + b"\n\n", 2),
        _handled(r, "NUL character in the completion", line(completion="a\x00b" + END) + b"\n", 1),
        _handled(r, "nesting depth 500 in an extra field", b'{"m": ' + b"[" * 500 + b"]" * 500 + b", " + line()[1:], 1),
        _handled(r, "end tag twice", line(completion="we add" + END + "more" + END) + b"\n", 1),
        _handled(
            r,
            "explanation row",
            json.dumps({"question": Q, "solution": S, "explanation": PAD + "we add"}).encode() + b"\n",
            1,
            lambda rows: rows[0]["matched"] is True,
        ),
        _handled(
            r,
            "thought row with matched false",
            json.dumps({"question": Q, "solution": S, "thought": PAD + "t", "matched": False}).encode() + b"\n",
            1,
            lambda rows: rows[0]["penalised"] == "unmatched",
        ),
        _handled(
            r,
            "rows keep unknown fields and ids",
            line(id=None, extra={"k": [1, 2]}) + b"\n" + line(id=1) + b"\n" + line(id="1") + b"\n",
            3,
            lambda rows: [x["id"] for x in rows] == [None, 1, "1"],
        ),
    ]
    out += [
        _penalised(r, "empty completion (unmatched)", row(completion=""), "unmatched"),
        _penalised(r, "never-closed completion", row(completion="we add"), "unmatched"),
        _handled(  # the padding alone is the explanation (the authors' span): a regular, closed row
            r,
            "explanation that is only the padding",
            line(completion=END) + b"\n",
            1,
            lambda rows: rows[0]["matched"] is True and rows[0]["components"]["explanation_tokens"] >= 1,
        ),
        _penalised(r, "empty solution", row(solution=""), "empty_solution"),
        _penalised(r, "overlong completion (200k chars)", row(completion="word " * 40_000 + END), "overflow"),
        _penalised(r, "overlong question (3000 words)", row(question="q " * 3000), "overflow"),
        _penalised(
            r,
            "overlong row with --max-length 1500",
            row(completion="word " * 2000 + END),
            "overflow",
            "--max-length",
            "1500",
        ),
    ]
    # paths
    (tmp / "afile").write_text("x")
    same = r.path()
    same.write_bytes(line() + b"\n")
    traces = tmp / "traces"
    traces.mkdir()
    (traces / "shard-00000.jsonl").write_text(
        json.dumps({"id": 0, "question": Q, "solution": S, "thought": PAD + "t", "matched": True}) + "\n"
    )
    bad_lineage, odd_lineage, empty_dir = tmp / "badlin", tmp / "oddlin", tmp / "empty"
    for d in (bad_lineage, odd_lineage, empty_dir):
        d.mkdir()
    for d in (bad_lineage, odd_lineage):
        (d / "shard-00000.jsonl").write_bytes((traces / "shard-00000.jsonl").read_bytes())
    (bad_lineage / "lineage.json").write_text("{not json")
    (odd_lineage / "lineage.json").write_text(json.dumps({"format": "NoSuchFormat"}))
    (traces / "lineage.json").write_text(json.dumps({"format": "StratosFormat"}))
    empty_file = r.path()
    empty_file.write_bytes(b"")
    out += [
        Scenario("scorer", "--output == --input", lambda: r.run(same, output=same), culprit=("--output",)),
        _flag(r, "--output under a file", ("--output",), output=tmp / "afile" / "o.jsonl"),
        _flag(r, "--output is a directory", ("--output",), output=tmp),
        _flag(r, "--output in an unwritable directory", ("--output",), output=UNWRITABLE / "o.jsonl"),
        Scenario(
            "scorer",
            "--output named like a shard of the --input directory",
            lambda: r.run(traces, output=traces / "shard-99999.jsonl"),
            culprit=("--output",),
        ),
        Scenario("scorer", "--input missing", lambda: r.run(tmp / "nope.jsonl"), culprit=("--input",)),
        Scenario("scorer", "--input an empty file", lambda: r.run(empty_file), culprit=("scored 0 rows",)),
        Scenario("scorer", "--input a directory without shards", lambda: r.run(empty_dir), culprit=("--input",)),
        Scenario("scorer", "--input with unreadable lineage.json", lambda: r.run(bad_lineage), culprit=("lineage",)),
        Scenario("scorer", "--input with an unknown lineage format", lambda: r.run(odd_lineage), culprit=("lineage",)),
        Scenario(
            "scorer",
            "--format disagrees with lineage",
            lambda: r.run(traces, "--format", "compact"),
            culprit=("--format",),
        ),
        Scenario(
            "scorer",
            "trace directory as --input",
            lambda: r.run(traces),
            correct=lambda obs: _good_rows(obs, 1),
        ),
        _flag(r, "--format compact on stratos rows", ("--format",), "--format", "compact"),
        _flag(r, "--format unknown", ("--format",), "--format", "bogus"),
        _flag(r, "--teacher missing", ("--teacher",), teacher=tmp / "no-teacher"),
        _flag(r, "--student missing", ("--student",), student=tmp / "no-student"),
        _flag(r, "--teacher is a file", ("--teacher",), teacher=tmp / "afile"),
        _flag(r, "--student with another tokenizer", ("tokenizer",), student=cdirs["student"]),
        _flag(r, "--dtype unknown", ("--dtype",), "--dtype", "float8"),
        _flag(r, "--device unknown", ("--device",), "--device", "tpu9"),
    ]
    for flag, values in {
        "--batch-size": ("0", "-1", "abc"),
        "--max-length": ("0", "-5"),
        "--penalty-margin": ("-1", "nan", "inf"),
        "--temperature": ("0", "nan", "-1"),
        "--student-temperature": ("0", "inf"),
        "--token-budget": ("0", "-1"),
    }.items():
        out += [_flag(r, f"{flag} {v}", (flag,), flag, v) for v in values]
    out += [
        _flag(r, "--kl-coeffs nan 0", ("--kl-coeffs",), "--kl-coeffs", "nan", "0"),
        _flag(r, "--rss-coeffs inf 0", ("--rss-coeffs",), "--rss-coeffs", "inf", "0"),
        _flag(r, "--kl-coeffs with one value", ("--kl-coeffs",), "--kl-coeffs", "3"),
    ]
    return out
