"""Hostile-input and fault scenarios, re-tried and classified automatically, so the reliability table is
reproducible (outside the default test suite; `tests/test_benchmarks.py` smoke-tests a few).

    python -m benchmarks.scenarios [--json OUT.json] [--only scorer,data,config,signal]

Four classes: **scorer** (`python -m rlt_pl.score` in process: bad lines, encodings, empty and overlong fields,
bad flags, bad input/output paths), **data** (the DataModules' `setup` on bad rows and files, and their flags),
**config** (every numeric or enumerated flag of the modules, configs and callbacks given a bad value, directly and
through the CLI) and **signal** (SIGTERM / SIGINT at several points of `fit` and `predict`, `kill -9` of trace
generation then reruns, unwritable outputs).

Each scenario runs one action and records what happened (return value, exit status, exception and where it was
raised, stdout / stderr / warnings / log records); the outcome follows from that record alone:

- **clear error**: the action failed (an exception or a non-zero exit status) and the last line of its message
  names the culprit (the flag, the path, the line or row), so the user can fix the input without a traceback.
- **counted**: it succeeded, every good row is in the result, and the problem is reported (a counter, a warning
  or a message naming the line or row id).
- **handled**: it succeeded and its result was checked correct (e.g. the right rows, a resumable checkpoint and a
  128 + signal exit status, the right file permissions); no report is needed.
- **deep crash**: it failed with a message that does not name the culprit (typically a traceback from inside
  torch / transformers / json with none of our message), or a single bad row aborted the whole job.
- **silent**: it succeeded, reported nothing, and its result is wrong or the bad input was taken at face value.
- **lost**: rows or compute were lost: good rows missing from (or duplicated in) the result, a job that ended
  without saving what it had done, or a whole job aborted by a row-level problem that named the row.

A scenario reports its outcome; the run exits 1 when any scenario is a deep crash, silent or lost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("clear error", "counted", "handled", "deep crash", "silent", "lost")
BAD = ("deep crash", "silent", "lost")
CLASSES = ("scorer", "data", "config", "signal")


@dataclass
class Observation:
    """What one action did."""

    value: object = None
    code: int = 0  # exit status: 0 when the action returned, else SystemExit's code or 1 for an exception
    message: str = ""  # the failure's message (exception text or SystemExit's message)
    where: str = ""  # file of the innermost traceback frame of an exception
    text: str = ""  # stdout + stderr + warnings + log records
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.code != 0

    def last_line(self) -> str:
        lines = [x for x in (self.message or self.text).strip().splitlines() if x.strip()]
        return lines[-1] if lines else ""


@dataclass
class Scenario:
    """One action and how to judge it.

    Args:
        cls: scorer, data, config or signal.
        name: what is tried.
        action: runs it; its return value is `Observation.value`.
        culprit: strings of which one must be on the failure's last line for a clear error (flag, path, line).
        row_level: a row-level problem: failing at all is wrong (lost when the row is named, else a deep crash).
        reported: whether a successful run reported the problem.
        correct: whether a successful run's result is right.
        lost: whether a successful run lost or duplicated rows or compute.
    """

    cls: str
    name: str
    action: Callable[[], object]
    culprit: tuple[str, ...] = ()
    row_level: bool = False
    reported: Callable[[Observation], bool] | None = None
    correct: Callable[[Observation], bool] | None = None
    lost: Callable[[Observation], bool] | None = None
    detail: str = field(default="", init=False)


class _Records(logging.Handler):
    def __init__(self, sink: io.StringIO) -> None:
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.write(record.getMessage() + "\n")


def observe(action: Callable[[], object]) -> Observation:
    """Run `action`, capturing its output, warnings and log records, and its failure if any."""
    sink, handler, obs = io.StringIO(), None, Observation()
    handler = _Records(sink)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("always")
            try:
                obs.value = action()
            except SystemExit as err:
                obs.code = err.code if isinstance(err.code, int) else (1 if err.code else 0)
                obs.message = "" if isinstance(err.code, int) or err.code is None else str(err.code)
            except Exception as err:  # noqa: BLE001 - every failure is classified
                obs.code = 1
                obs.message = f"{type(err).__name__}: {err}"
                frames = traceback.extract_tb(err.__traceback__)
                obs.where = frames[-1].filename if frames else ""
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    obs.seconds = time.perf_counter() - start
    # warnings first: the last line is the action's own last output (an argparse / jsonargparse error)
    obs.text = "".join(f"warning: {w.message}\n" for w in caught) + sink.getvalue()
    return obs


def classify(s: Scenario, obs: Observation) -> str:
    """The outcome of scenario `s` from its observation (rules in the module docstring)."""
    if obs.failed:
        last = obs.last_line().lower()
        named = any(c.lower() in last for c in s.culprit)
        if s.row_level:
            return "lost" if named else "deep crash"
        return "clear error" if named else "deep crash"
    if s.lost is not None and s.lost(obs):
        return "lost"
    if s.reported is not None and s.reported(obs):
        return "counted"
    if s.correct is not None and s.correct(obs):
        return "handled"
    return "silent"


def run_all(scenarios: list[Scenario], verbose: bool = True) -> list[tuple[str, str, str, str]]:
    """Run and classify; returns (class, name, outcome, detail) per scenario."""
    results = []
    for s in scenarios:
        obs = observe(s.action)
        outcome = classify(s, obs)
        detail = obs.last_line()[:160] if outcome != "handled" else ""
        if outcome == "deep crash" and obs.where:
            detail += f" [raised in {obs.where}]"
        results.append((s.cls, s.name, outcome, detail))
        if verbose:
            print(f"{outcome:12s} {s.cls}: {s.name} ({obs.seconds:.1f}s) {detail}", file=sys.__stdout__, flush=True)
    return results


def table(results: list[tuple[str, str, str, str]]) -> str:
    """The counts per class x outcome as a Markdown table."""
    counts = {c: dict.fromkeys(OUTCOMES, 0) for c in CLASSES}
    for cls, _, outcome, _ in results:
        counts[cls][outcome] += 1
    lines = ["| class | scenarios | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for cls, c in counts.items():
        lines.append(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    total = {o: sum(c[o] for c in counts.values()) for o in OUTCOMES}
    lines.append(f"| **all** | {len(results)} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def build(tmp: Path, only: tuple[str, ...] = CLASSES) -> list[Scenario]:
    """Every scenario of the classes in `only`, sharing tiny model fixtures built under `tmp`."""
    from benchmarks.scenarios import configs, data, scorer, signals
    from rlt_pl.formats import CompactFormat
    from rlt_pl.tiny import build_compact_assets, build_tiny_assets

    with contextlib.redirect_stderr(io.StringIO()):
        dirs = build_tiny_assets(tmp / "tiny", seed=0)
        cdirs = build_compact_assets(tmp / "compact", CompactFormat().tag_tokens(), seed=0)
    work = tmp / "work"
    work.mkdir()
    out: list[Scenario] = []
    if "scorer" in only:
        out += scorer.scenarios(dirs, cdirs, work / "scorer")
    if "data" in only:
        out += data.scenarios(work / "data")
    if "config" in only:
        out += configs.scenarios(dirs, cdirs, work / "config")
    if "signal" in only:
        out += signals.scenarios(cdirs, work / "signal")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scenarios")
    p.add_argument("--json", default=None, help="write every result here")
    p.add_argument("--only", default=",".join(CLASSES), help="comma-separated classes")
    args = p.parse_args(argv)
    only = tuple(x for x in args.only.split(",") if x)
    if set(only) - set(CLASSES):
        raise SystemExit(f"--only: unknown classes {sorted(set(only) - set(CLASSES))}; choose from {CLASSES}")
    with tempfile.TemporaryDirectory() as d:
        results = run_all(build(Path(d), only))
    print("\n" + table(results))
    bad = [r for r in results if r[2] in BAD]
    print(f"{len(results)} scenarios; deep crash + silent + lost = {len(bad)}")
    for cls, name, outcome, detail in bad:
        print(f"  {outcome}: {cls}: {name}: {detail}")
    if args.json:
        rows = [dict(zip(("class", "name", "outcome", "detail"), r)) for r in results]
        Path(args.json).write_text(json.dumps({"results": rows, "table": table(results)}, indent=2) + "\n")
    return 1 if bad else 0
