"""DataModule scenarios: `setup` on bad rows (traces and each benchmark's local-file schema) and bad files."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

from benchmarks.scenarios import Observation, Scenario

GOOD_TRACE = {"id": "ok", "question": "what is 2 + 3?", "solution": "5", "thought": "add them"}

BAD_TRACE_LINES: dict[str, bytes] = {
    "bad JSON": b"{nope",
    "truncated object": b'{"id": "x", "question": "q"',
    "not an object (list)": b"[1, 2]",
    "not an object (null)": b"null",
    "not an object (string)": b'"row"',
    "missing question": json.dumps({"id": "f", "solution": "5", "thought": "t"}).encode(),
    "missing solution": json.dumps({"id": "g", "question": "q", "thought": "t"}).encode(),
    "empty question": json.dumps({"id": "h", "question": "", "solution": "5", "thought": "t"}).encode(),
    "whitespace-only solution": json.dumps({"id": "i", "question": "q", "solution": " \n", "thought": "t"}).encode(),
    "question is an int": json.dumps({"id": "j", "question": 7, "solution": "5", "thought": "t"}).encode(),
    "thought is a list": json.dumps({"id": "k", "question": "q", "solution": "5", "thought": ["t"]}).encode(),
    "metadata is a list": json.dumps(
        {"id": "l", "question": "q", "solution": "5", "thought": "t", "metadata": [1]}
    ).encode(),
    "answer is an object": json.dumps(
        {"id": "m", "question": "q", "solution": "5", "thought": "t", "answer": {"a": 1}}
    ).encode(),
    "missing thought": json.dumps({"id": "e", "question": "q", "solution": "5"}).encode(),
    "null id": json.dumps({"id": None, "question": "q", "solution": "5", "thought": "t"}).encode(),
    "bool id": json.dumps({"id": True, "question": "q", "solution": "5", "thought": "t"}).encode(),
    "list id": json.dumps({"id": [1], "question": "q", "solution": "5", "thought": "t"}).encode(),
    "duplicate id": json.dumps({"id": "ok", "question": "q2", "solution": "5", "thought": "t"}).encode(),
    "int/str id collision": json.dumps({"id": 1, "question": "q", "solution": "5", "thought": "t"}).encode()
    + b"\n"
    + json.dumps({"id": "1", "question": "q2", "solution": "5", "thought": "t"}).encode(),
    "NFD text": json.dumps(
        {"id": "a", "question": unicodedata.normalize("NFD", "café"), "solution": "5", "thought": "t"},
        ensure_ascii=False,
    ).encode(),
    "NFD metadata": json.dumps(
        {
            "id": "a2",
            "question": "q",
            "solution": "5",
            "thought": "t",
            "metadata": {"s": unicodedata.normalize("NFD", "é")},
        },
        ensure_ascii=False,
    ).encode(),
    "lone surrogate in question": b'{"id": "b", "question": "\\ud800", "solution": "5", "thought": "t"}',
    "lone surrogate in thought": b'{"id": "b2", "question": "q", "solution": "5", "thought": "\\udc00"}',
    "invalid UTF-8 byte": b'{"id": "d", "question": "\xff", "solution": "5"}',
    "truncated UTF-8 sequence": b'{"id": "d2", "question": "\xe2\x82", "solution": "5"}',
    "Latin-1 encoded text": '{"id": "d3", "question": "café", "solution": "5"}'.encode("latin-1"),
    "deep nesting (100k)": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting inside a field": b'{"id": "n", "question": "q", "solution": "5", "m": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "5000-digit integer": b'{"id": "c", "question": "q", "solution": "5", "n": ' + b"9" * 5000 + b"}",
    "5000-digit integer id": b'{"id": ' + b"9" * 5000 + b', "question": "q", "solution": "5"}',
    "Infinity literal in a field": b'{"id": "c2", "question": "q", "solution": "5", "thought": "t", "n": Infinity}',
}


def _traces_setup(d: Path, data: bytes, **kw) -> object:
    from rlt_pl.datamodules.traces import TracesDataModule

    (d / "shard-00000.jsonl").write_bytes(data)
    dm = TracesDataModule(data_path=str(d), **kw)
    dm.setup("fit")
    return dm


def _reported(obs: Observation) -> bool:
    dm = obs.value
    return bool(dm.invalid_rows) or dm.nfc_normalized > 0 or bool(dm.missing_thought)


def _lost(obs: Observation) -> bool:
    return not any(r["id"] == "ok" for r in obs.value.rows)


def _mkdir(tmp: Path, n: list[int]) -> Path:
    n[0] += 1
    d = tmp / f"dm-{n[0]}"
    d.mkdir(parents=True)
    return d


BENCH: dict[str, tuple[str, dict, dict[str, dict]]] = {
    # DataModule class -> (module, a good row, bad rows by name)
    "MATH500DataModule": (
        "math500",
        {"unique_id": "u1", "problem": "1+1?", "answer": "2", "solution": "2", "level": 1, "subject": "a"},
        {
            "missing answer": {"unique_id": "u2", "problem": "p", "solution": "s"},
            "level is a list": {"unique_id": "u3", "problem": "p", "answer": "2", "solution": "s", "level": [1]},
            "problem is null": {"unique_id": "u4", "problem": None, "answer": "2", "solution": "s"},
        },
    ),
    "AIME24DataModule": (
        "aime24",
        {"id": 1, "problem": "p", "answer": "3", "solution": "s"},
        {
            "id is a float": {"id": 1.5, "problem": "p", "answer": "3", "solution": "s"},
            "answer is a list": {"id": 2, "problem": "p", "answer": ["3"], "solution": "s"},
        },
    ),
    "GPQADiamondDataModule": (
        "gpqa",
        {
            "Record ID": "r1",
            "Question": "q",
            "Correct Answer": "a",
            "Incorrect Answer 1": "b",
            "Incorrect Answer 2": "c",
            "Incorrect Answer 3": "d",
        },
        {
            "duplicate options": {
                "Record ID": "r2",
                "Question": "q",
                "Correct Answer": "a",
                "Incorrect Answer 1": "a",
                "Incorrect Answer 2": "c",
                "Incorrect Answer 3": "d",
            },
            "missing an option": {"Record ID": "r3", "Question": "q", "Correct Answer": "a"},
        },
    ),
    "CountdownDataModule": (
        "countdown",
        {"target": 10, "nums": [2, 5]},
        {
            "target is a string": {"target": "10", "nums": [2, 5]},
            "nums holds a negative": {"target": 10, "nums": [2, -5]},
            "empty nums": {"target": 10, "nums": []},
            "target is a bool": {"target": True, "nums": [2, 5]},
        },
    ),
    "BespokeStratosDataModule": (
        "bespoke",
        {"question": "q", "solution": "s", "reasoning_trace": "t"},
        {
            "conversations too short": {"conversations": [{"from": "user", "value": "q"}]},
            "empty reasoning_trace": {"question": "q", "solution": "s", "reasoning_trace": ""},
        },
    ),
}


def _bench_setup(cls_name: str, path: Path) -> object:
    import rlt_pl.datamodules as dms

    kw = {"val_size": 0, "test_size": 0} if cls_name == "CountdownDataModule" else {}
    dm = getattr(dms, cls_name)(data_path=str(path), **kw)
    dm.setup("fit")
    return dm


def _served(cls: str, path: Path) -> object:
    """`setup` and then the evaluation loader, as a `validate` run would ask for it."""
    dm = _bench_setup(cls, path)
    dm.val_dataloader()
    return dm


def _file_case(tmp: Path, name: str, suffix: str, data: bytes, culprit: tuple[str, ...], cls: str) -> Scenario:
    path = tmp / f"{abs(hash(name))}{suffix}"
    path.write_bytes(data)
    return Scenario("data", f"{cls}: {name}", lambda: _served(cls, path), culprit=culprit)


def scenarios(tmp: Path) -> list[Scenario]:
    tmp.mkdir(parents=True)
    n = [0]
    good = json.dumps(GOOD_TRACE).encode()
    out: list[Scenario] = []
    for name, bad in BAD_TRACE_LINES.items():
        d = _mkdir(tmp, n)
        out.append(
            Scenario(
                "data",
                f"traces: {name}",
                lambda d=d, bad=bad: _traces_setup(d, good + b"\n" + bad + b"\n"),
                row_level=True,
                reported=_reported,
                lost=_lost,
            )
        )
    d = _mkdir(tmp, n)
    out.append(
        Scenario(
            "data",
            "traces: answer_only with thoughts",
            lambda d=d: _traces_setup(d, good + b"\n", answer_only=True),
            correct=lambda obs: obs.value.rows[0]["thought"] == "",
        )
    )
    d = _mkdir(tmp, n)
    (d / "shard-00000.jsonl").write_bytes(good + b"\n")
    (d / "shard-00001.jsonl").write_bytes(json.dumps({**GOOD_TRACE, "id": "ok2"}).encode() + b"\n")
    out.append(
        Scenario(
            "data",
            "traces: several shards read in order",
            lambda d=d: _traces_setup(d, good + b"\n"),
            correct=lambda obs: [r["id"] for r in obs.value.rows] == ["ok", "ok2"],
        )
    )
    for name, data_path in {
        "missing data_path": str(tmp / "nope"),
        "directory without shards": str(_mkdir(tmp, n)),
    }.items():
        out.append(
            Scenario(
                "data",
                f"traces: {name}",
                lambda p=data_path: _make_traces(p),
                culprit=("data_path", "shard"),
            )
        )
    for cls, (module, good_row, bads) in BENCH.items():
        for name, bad in bads.items():
            path = tmp / f"{module}-{abs(hash(name))}.jsonl"
            path.write_text(json.dumps(good_row) + "\n" + json.dumps(bad) + "\n")
            out.append(
                Scenario(
                    "data",
                    f"{cls}: {name}",
                    lambda cls=cls, path=path: _bench_setup(cls, path),
                    row_level=True,
                    reported=lambda obs: bool(obs.value.invalid_rows),
                    lost=lambda obs: len(obs.value.rows) != 1,
                )
            )
    m = "MATH500DataModule"
    good_math = json.dumps(BENCH[m][1]).encode()
    out += [
        _file_case(tmp, "unsupported suffix", ".csv", b"a,b\n", ("data_path", "suffix"), m),
        _file_case(tmp, "broken .json", ".json", b"[{nope", ("data_path",), m),
        _file_case(tmp, ".json holding an object", ".json", b'{"rows": 1}', ("expected a JSON list",), m),
        _file_case(tmp, "corrupt .parquet", ".parquet", b"PAR1 not really", ("data_path", "parquet"), m),
        _file_case(tmp, "empty .jsonl", ".jsonl", b"", ("empty", "no valid rows", "data_path"), m),
        _file_case(tmp, "only bad rows", ".jsonl", b"{nope\n[1]\n", ("empty", "no valid rows", "data_path"), m),
        _file_case(tmp, "invalid UTF-8 in a .json", ".json", b'[{"problem": "\xff"}]', ("data_path",), m),
        _file_case(tmp, "deeply nested .json", ".json", b"[" * 100_000 + b"]" * 100_000, ("data_path",), m),
        Scenario(
            "data",
            "MATH500DataModule: .json with {'data': [...]}",
            _json_data(tmp, good_math),
            correct=lambda obs: len(obs.value.rows) == 1,
        ),
    ]
    out.append(
        Scenario(
            "data",
            "MATH500DataModule: file does not exist",
            lambda: _bench_setup(m, tmp / "missing.jsonl"),
            culprit=("data_path",),
        )
    )
    return out


def _make_traces(path: str) -> object:
    from rlt_pl.datamodules.traces import TracesDataModule

    dm = TracesDataModule(data_path=path)
    dm.setup("fit")
    return dm


def _json_data(tmp: Path, good: bytes) -> Callable[[], object]:
    path = tmp / "wrapped.json"
    path.write_bytes(b'{"data": [' + good + b"]}")
    return lambda: _bench_setup("MATH500DataModule", path)
