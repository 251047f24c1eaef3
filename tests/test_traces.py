"""Trace generation: schema of written rows, atomic shards, rerun skips finished shards, SIGKILL mid-run loses and
duplicates nothing, overflow handling is counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from lightning.pytorch import Trainer

from rlt_pl.callbacks.trace_writer import TraceWriter
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.datamodules.traces import TracesDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.sft import TeacherSFTModule
from rlt_pl.tiny import build_compact_assets, trace_predict_yaml

TRACE_KEYS = {"id", "question", "solution", "answer", "thought", "matched", "completion_tokens", "reward", "metadata"}


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory):
    return build_compact_assets(tmp_path_factory.mktemp("compact"), CompactFormat().tag_tokens())


def _predict(teacher_dir, out_dir, num_train=24, batch_size=8, temperature=0.7, **writer_kwargs) -> TraceWriter:
    module = TeacherSFTModule(
        ModelConfig(str(teacher_dir), dtype="float32"),
        format=CompactFormat(),
        sampling=SamplingConfig(max_new_tokens=12, temperature=temperature),
    )
    writer = TraceWriter(str(out_dir), **writer_kwargs)
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    data = AdditionDataModule(num_train=num_train, num_heldout=4, batch_size=batch_size)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return writer


def test_predict_writes_valid_shards_and_rerun_skips_them(compact_dirs, tmp_path):
    out = tmp_path / "traces"
    _predict(compact_dirs["teacher"], out)
    shards = sorted(out.glob("shard-*.jsonl"))
    assert len(shards) == 3
    rows = [json.loads(line) for s in shards for line in s.read_text().splitlines()]
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    for row in rows:
        assert set(row) == TRACE_KEYS
        assert isinstance(row["thought"], str) and isinstance(row["matched"], bool)
        assert row["solution"] == str(row["metadata"]["a"] + row["metadata"]["b"])
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["model"] == str(compact_dirs["teacher"]) and len(lineage["model_sha256"]) == 16
    assert lineage["sampling"]["temperature"] == 0.7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 24 and summary["written"] == 24
    assert summary["unmatched"] == sum(not r["matched"] for r in rows)

    dm = TracesDataModule(data_path=str(out), batch_size=4)
    dm.setup("fit")
    assert len(dm.rows) == 24 and dm.invalid_rows == []

    before = {s.name: s.read_bytes() for s in shards}
    writer2 = _predict(compact_dirs["teacher"], out)
    assert writer2.counts["skipped_shards"] == 3 and writer2.counts["written"] == 0
    assert {s.name: s.read_bytes() for s in sorted(out.glob("shard-*.jsonl"))} == before


def _ids(out) -> list[str]:
    return [json.loads(line)["id"] for s in sorted(out.glob("shard-*.jsonl")) for line in s.read_text().splitlines()]


def test_rerun_with_other_batching_loses_and_duplicates_nothing(compact_dirs, tmp_path):
    out = tmp_path / "traces"
    _predict(compact_dirs["teacher"], out, batch_size=8)
    (out / "shard-00001.jsonl").unlink()  # as if killed before the second batch was written
    kept = set(_ids(out))
    writer = _predict(compact_dirs["teacher"], out, batch_size=5)  # other batch positions than the first run
    ids = _ids(out)
    assert len(ids) == 24 and set(ids) == {f"add-train-{i}" for i in range(24)}
    assert writer.counts["written"] == 8 and writer.counts["skipped_rows"] == 16 and len(kept) == 16
    # dropped rows are done too: a rerun regenerates nothing
    dropped = tmp_path / "drop"
    _predict(compact_dirs["teacher"], dropped, num_train=8, max_trace_tokens=6, overflow="drop")
    again = _predict(compact_dirs["teacher"], dropped, num_train=8, batch_size=3, max_trace_tokens=6, overflow="drop")
    assert again.counts["rows"] == 0 and again.counts["skipped_rows"] == 8


def test_rerun_with_another_lineage_is_refused_unless_restarted(compact_dirs, tmp_path):
    out = tmp_path / "traces"
    _predict(compact_dirs["teacher"], out, num_train=8)
    before = {s.name: s.read_bytes() for s in out.glob("shard-*")}
    with pytest.raises(ValueError, match=r"another lineage \(sampling: .*'temperature': 0.7.*-> .*'temperature': 0.9"):
        _predict(compact_dirs["teacher"], out, num_train=8, temperature=0.9)
    assert {s.name: s.read_bytes() for s in out.glob("shard-*")} == before
    assert json.loads((out / "lineage.json").read_text())["sampling"]["temperature"] == 0.7
    with pytest.raises(ValueError, match="model: "):
        _predict(compact_dirs["student"], out, num_train=8)
    fresh = _predict(compact_dirs["teacher"], out, num_train=8, temperature=0.9, restart=True)
    assert fresh.counts["written"] == 8 and len(_ids(out)) == 8
    assert json.loads((out / "lineage.json").read_text())["sampling"]["temperature"] == 0.9


def test_overflow_is_counted_and_handled(compact_dirs, tmp_path):
    dropped = _predict(compact_dirs["teacher"], tmp_path / "drop", num_train=8, max_trace_tokens=6, overflow="drop")
    assert dropped.counts["overflow"] == 8 and dropped.counts["dropped"] == 8 and dropped.counts["written"] == 0
    truncated = _predict(
        compact_dirs["teacher"], tmp_path / "trunc", num_train=8, max_trace_tokens=14, overflow="truncate"
    )
    rows = [json.loads(line) for s in (tmp_path / "trunc").glob("shard-*.jsonl") for line in s.read_text().splitlines()]
    assert len(rows) == 8
    assert truncated.counts["overflow"] == sum(bool(r.get("truncated")) for r in rows)


def test_sigkill_mid_generation_then_rerun_completes_without_duplicates(compact_dirs, tmp_path):
    out = tmp_path / "traces"
    config = tmp_path / "predict.yaml"
    config.write_text(trace_predict_yaml(out, compact_dirs["teacher"], num_train=600, batch_size=20, max_new_tokens=40))
    cmd = [sys.executable, "-m", "rlt_pl", "predict", "-c", str(config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.jsonl"))) < 2:
        assert proc.poll() is None, "predict exited before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {s.name: s.read_bytes() for s in out.glob("shard-*.jsonl")}
    assert 2 <= len(first) < 30, "the kill should land mid-run"
    for data in first.values():  # complete shards only: every line parses
        assert all(json.loads(line)["id"] for line in data.decode().splitlines())

    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = sorted(out.glob("shard-*.jsonl"))
    assert len(shards) == 30
    ids = [json.loads(line)["id"] for s in shards for line in s.read_text().splitlines()]
    assert len(ids) == 600 and len(set(ids)) == 600
    assert {f"add-train-{i}" for i in range(600)} == set(ids)
    assert all(out.joinpath(name).read_bytes() == data for name, data in first.items())
    assert not list(out.glob(".shard-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_shards"] == len(first)
