"""Hostile-input scenarios, re-tried: each is run and classified as clear error / counted / handled / deep crash /
silent / lost, so the reliability table is reproducible.

    python -m benchmarks.scenarios [--json OUT.json]

Classes: scorer (`python -m rlt_pl.score` on bad lines, outputs and flags), DataModules (bad rows and files),
configs (GRPO construction) and kill/signals (the tests in `tests/test_signals.py` and `tests/test_traces.py`
cover the processes; here the in-process signal paths are re-run). A scenario passes only with its expected
outcome; a deep crash (an exception that names no flag, field or line) or a silent wrong result fails it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import unicodedata
from pathlib import Path

from rlt_pl.formats import CompactFormat, StratosFormat
from rlt_pl.tiny import build_compact_assets, build_tiny_assets

OUTCOMES = ("clear error", "counted", "handled", "deep crash", "silent", "lost")
END = StratosFormat().explanation_end
Q, S = "what is 2 + 3?", "\n\n5\n\n"


def _score(dirs, tmp: Path, lines: list[bytes], *extra: str, output: Path | None = None):
    from rlt_pl.score import main

    src = tmp / f"in-{len(list(tmp.iterdir()))}.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = output or src.with_suffix(".out.jsonl")
    argv = ["--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), "--input", str(src)]
    return main([*argv, "--output", str(out), *extra]), src, out


def _row(**kw) -> bytes:
    return json.dumps({"question": Q, "solution": S, "completion": "we add" + END, **kw}, ensure_ascii=False).encode()


def scorer_scenarios(dirs, tmp: Path) -> list[tuple[str, str]]:
    import contextlib
    import io

    out = []
    bad_lines = {
        "bad JSON": b"{nope",
        "not an object": b"[1, 2]",
        "missing solution": json.dumps({"question": Q, "completion": "x"}).encode(),
        "non-string question": json.dumps({"question": 3, "solution": S, "completion": "x"}).encode(),
        "no completion": json.dumps({"question": Q, "solution": S}).encode(),
        "lone surrogate": b'{"question": "\\ud800", "solution": "5", "completion": "x"}',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "5000-digit integer": b'{"question": "q", "solution": "5", "completion": "x", "n": ' + b"9" * 5000 + b"}",
        "invalid UTF-8": b'{"question": "\xff", "solution": "5", "completion": "x"}',
    }
    for name, line in bad_lines.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc, _, dst = _score(dirs, tmp, [_row(), line])
        ok = rc == 0 and len(dst.read_text().splitlines()) == 1 and ":2: skipped:" in err.getvalue()
        out.append((f"scorer: {name}", "counted" if ok else "silent"))
    nfd = _row(question=unicodedata.normalize("NFD", "café?"))
    with contextlib.redirect_stdout(io.StringIO()) as o:
        rc, _, dst = _score(dirs, tmp, [nfd])
    out.append(("scorer: NFD text", "counted" if rc == 0 and "nfc_normalized 1" in o.getvalue() else "silent"))
    checks = {
        "output == input": lambda: _score(dirs, tmp, [_row()], output=Path(tmp / "same.jsonl")),
        "output under a file": lambda: _score(dirs, tmp, [_row()], output=tmp / "afile" / "o.jsonl"),
        "output is a directory": lambda: _score(dirs, tmp, [_row()], output=tmp),
        "wrong --format": lambda: _score(dirs, tmp, [_row()], "--format", "compact"),
        "--batch-size 0": lambda: _score(dirs, tmp, [_row()], "--batch-size", "0"),
        "--max-length 0": lambda: _score(dirs, tmp, [_row()], "--max-length", "0"),
        "negative --penalty-margin": lambda: _score(dirs, tmp, [_row()], "--penalty-margin", "-1"),
    }
    (tmp / "afile").write_text("x")
    (tmp / "same.jsonl").write_bytes(_row() + b"\n")
    for name, fn in checks.items():
        if name == "output == input":
            from rlt_pl.score import main

            fn = lambda: main(
                [
                    "--teacher",
                    str(dirs["teacher"]),
                    "--student",
                    str(dirs["student"]),  # noqa: E731
                    "--input",
                    str(tmp / "same.jsonl"),
                    "--output",
                    str(tmp / "same.jsonl"),
                ]
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                fn()
            out.append((f"scorer: {name}", "silent"))
        except SystemExit as err:
            out.append(
                (
                    f"scorer: {name}",
                    "clear error" if str(err.code).startswith("--") or "--" in str(err.code) else "deep crash",
                )
            )
        except Exception:  # noqa: BLE001
            out.append((f"scorer: {name}", "deep crash"))
    # a trace directory read directly, penalties ranked last, umask permissions
    traces = tmp / "traces"
    traces.mkdir()
    pad = StratosFormat().explanation_padding
    rows = [
        {"id": i, "question": Q, "solution": S, "thought": pad + t, "matched": m}
        for i, (t, m) in enumerate([("we add", True), ("five", True), ("open", False)])
    ]
    (traces / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (traces / "lineage.json").write_text(json.dumps({"format": "StratosFormat"}))
    from rlt_pl.score import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), "--input", str(traces)])
    scored = [json.loads(x) for x in (tmp / "traces.scored.jsonl").read_text().splitlines()]
    pen_ok = max(r["reward"] for r in scored if r["penalised"]) < min(r["reward"] for r in scored if not r["penalised"])
    out.append(("scorer: TraceWriter shards as input", "handled" if rc == 0 and len(scored) == 3 else "silent"))
    out.append(("scorer: penalised rows rank last", "handled" if pen_ok else "silent"))
    mode = (tmp / "traces.scored.jsonl").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    out.append(("scorer: output permissions", "handled" if mode == 0o666 & ~umask else "silent"))
    return out


def datamodule_scenarios(tmp: Path) -> list[tuple[str, str]]:
    import warnings

    from rlt_pl.datamodules.traces import TracesDataModule

    lines = {
        "NFD text": json.dumps(
            {"id": "a", "question": unicodedata.normalize("NFD", "café"), "solution": "5", "thought": "t"},
            ensure_ascii=False,
        ).encode(),
        "lone surrogate": b'{"id": "b", "question": "\\ud800", "solution": "5", "thought": "t"}',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "5000-digit integer": b'{"id": "c", "question": "q", "solution": "5", "n": ' + b"9" * 5000 + b"}",
        "invalid UTF-8": b'{"id": "d", "question": "\xff", "solution": "5"}',
        "null id": json.dumps({"id": None, "question": "q", "solution": "5", "thought": "t"}).encode(),
        "int/str id collision": json.dumps({"id": 1, "question": "q", "solution": "5", "thought": "t"}).encode()
        + b"\n"
        + json.dumps({"id": "1", "question": "q2", "solution": "5", "thought": "t"}).encode(),
        "missing thought": json.dumps({"id": "e", "question": "q", "solution": "5"}).encode(),
        "bad JSON": b"{nope",
        "missing question": json.dumps({"id": "f", "solution": "5"}).encode(),
    }
    out = []
    for name, line in lines.items():
        d = tmp / f"dm-{abs(hash(name))}"
        d.mkdir()
        good = json.dumps({"id": "ok", "question": "q", "solution": "5", "thought": "t"}).encode()
        (d / "shard-00000.jsonl").write_bytes(good + b"\n" + line + b"\n")
        dm = TracesDataModule(data_path=str(d))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dm.setup()
        except Exception:  # noqa: BLE001
            out.append((f"datamodule: {name}", "deep crash"))
            continue
        reported = bool(dm.invalid_rows) or dm.nfc_normalized > 0 or any("no thought" in str(w.message) for w in caught)
        kept_ok = any(r["id"] == "ok" for r in dm.rows)
        out.append((f"datamodule: {name}", ("counted" if reported else "silent") if kept_ok else "lost"))
    missing = tmp / "nope"
    try:
        TracesDataModule(data_path=str(missing)).setup()
        out.append(("datamodule: missing data_path", "silent"))
    except FileNotFoundError as err:
        out.append(
            (
                "datamodule: missing data_path",
                "clear error" if "shard" in str(err) or "data_path" in str(err) else "deep crash",
            )
        )
    return out


def config_scenarios(dirs) -> list[tuple[str, str]]:
    from rlt_pl.generation import SamplingConfig
    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.grpo import GRPOModule
    from rlt_pl.rewards import RewardConfig

    cases = {
        "num_generations=1": {"num_generations": 1},
        "num_generations=0": {"num_generations": 0},
        "max_grad_norm=-1": {"max_grad_norm": -1.0},
        "max_grad_norm=0": {"max_grad_norm": 0.0},
        "temperature=0": {"sampling": SamplingConfig(temperature=0.0)},
        "top_k=1": {"sampling": SamplingConfig(top_k=1)},
        "token_budget=0": {"token_budget": 0},
        "micro_batch_size=0": {"micro_batch_size": 0},
        "num_iterations=2 without clip": {"num_iterations": 2},
        "max_nonfinite_steps=-1": {"max_nonfinite_steps": -1},
    }
    out = []
    for name, kwargs in cases.items():
        try:
            GRPOModule(ModelConfig(str(dirs["teacher"])), **kwargs)
            out.append((f"config: {name}", "silent"))
        except ValueError as err:
            out.append((f"config: {name}", "clear error" if "model.init_args." in str(err) else "deep crash"))
    for name, kwargs in {
        "penalty_margin=-1": {"penalty_margin": -1.0},
        "penalty_floor=inf": {"penalty_floor": 1e999},
        "teacher_temperature=0": {"teacher_temperature": 0.0},
    }.items():
        try:
            RewardConfig(**kwargs)
            out.append((f"config: {name}", "silent"))
        except ValueError as err:
            out.append((f"config: {name}", "clear error" if "RewardConfig." in str(err) else "deep crash"))
    return out


def signal_scenarios(cdirs, tmp: Path) -> list[tuple[str, str]]:
    import lightning as L

    from rlt_pl.callbacks.shutdown import GracefulShutdown
    from rlt_pl.callbacks.trace_writer import TraceWriter
    from rlt_pl.datamodules.addition import AdditionDataModule
    from rlt_pl.generation import SamplingConfig
    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.sft import TeacherSFTModule

    class At(L.Callback):
        def __init__(self, signum):
            self.signum = signum

        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 1:
                os.kill(os.getpid(), self.signum)

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:
                os.kill(os.getpid(), self.signum)

    def module():
        return TeacherSFTModule(
            ModelConfig(str(cdirs["teacher"]), dtype="float32"),
            format=CompactFormat(),
            sampling=SamplingConfig(max_new_tokens=6, temperature=0.7),
        )

    out = []
    for stage, signum in (("fit", signal.SIGTERM), ("fit", signal.SIGINT), ("predict", signal.SIGTERM)):
        root = tmp / f"sig-{stage}-{signum}"
        cbs = [GracefulShutdown(), At(signum)] + ([TraceWriter(str(root / "traces"))] if stage == "predict" else [])
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=root,
            callbacks=cbs,
            max_steps=10,
            limit_val_batches=0,
            enable_model_summary=False,
        )
        data = AdditionDataModule(num_train=16, num_heldout=4, batch_size=2)
        previous = signal.getsignal(signal.SIGINT)
        try:
            (trainer.fit if stage == "fit" else trainer.predict)(module(), datamodule=data)
            out.append((f"signal: {signal.Signals(signum).name} on {stage}", "lost"))
        except SystemExit as err:
            kept = (
                (root / "checkpoints" / "interrupted.ckpt").is_file()
                if stage == "fit"
                else (root / "traces" / "shard-00000.jsonl").is_file()
            )
            good = err.code == 128 + signum and kept
            out.append((f"signal: {signal.Signals(signum).name} on {stage}", "handled" if good else "lost"))
        finally:
            signal.signal(signal.SIGINT, previous)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scenarios")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        dirs = build_tiny_assets(tmp / "tiny", seed=0)
        cdirs = build_compact_assets(tmp / "compact", CompactFormat().tag_tokens(), seed=0)
        work = tmp / "work"
        work.mkdir()
        results = scorer_scenarios(dirs, work) + datamodule_scenarios(work) + config_scenarios(dirs)
        results += signal_scenarios(cdirs, work)
    table: dict[str, dict[str, int]] = {}
    for name, outcome in results:
        print(f"{outcome:12s} {name}")
        cls = name.split(":")[0]
        table.setdefault(cls, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
    print("\n| class | " + " | ".join(OUTCOMES) + " |\n|---|" + "---|" * len(OUTCOMES))
    for cls, counts in table.items():
        print(f"| {cls} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    bad = sum(c[o] for c in table.values() for o in ("deep crash", "silent", "lost"))
    print(f"{len(results)} scenarios; deep crash + silent + lost = {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "table": table}, indent=2))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
