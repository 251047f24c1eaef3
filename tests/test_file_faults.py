"""Kills at the file layer: a process dies after half of a trace shard's or a checkpoint's bytes reached the file
system (tests/file_faults.py cuts the write, fsyncs the half and `os._exit`s; `shutil.move` is forced to copy). No
torn shard or checkpoint is ever visible under its final name, and the rerun loses and duplicates nothing. The same
kill tears Lightning's stock `ModelCheckpoint`, so the tests can see a non-atomic save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from file_faults import KILLED_RC, fit_linear

from rlt_pl.callbacks.checkpoint import PARTIAL_SUFFIX
from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets, trace_predict_yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("file_faults.py")
STEPS, KILL_AT = 6, 3  # the third last.ckpt write (step 3's) dies half-written


def _run(cwd: Path, pattern: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(SCRIPT), pattern, str(nth), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _loads(path: Path) -> int | None:
    """The checkpoint's global step, or None when it does not load."""
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except Exception:
        return None


def _kill_linear(ckpts: Path, callback: str) -> None:
    killed = _run(ckpts.parent, f"*/{ckpts.name}/last.ckpt*", KILL_AT, "linear", str(ckpts), str(STEPS), callback)
    assert killed.returncode == KILLED_RC, killed.stderr[-3000:]
    assert (ckpts / f"step={KILL_AT}.ckpt").exists() and not (ckpts / f"step={KILL_AT + 1}.ckpt").exists()


def test_checkpoint_killed_mid_write_keeps_the_last_published_one(tmp_path):
    """Killed halfway through writing step 3's `last.ckpt`: `last.ckpt` is step 2's, whole; the torn bytes sit only
    in `last.ckpt.partial`, which the resume ignores; the resumed run never writes a final name in place (it would be
    killed) and ends with the uninterrupted run's weights."""
    ckpts = tmp_path / "ckpts"
    _kill_linear(ckpts, "atomic")
    torn = ckpts / f"last.ckpt{PARTIAL_SUFFIX}"
    assert torn.exists() and _loads(torn) is None  # the kill did land mid-write
    assert _loads(ckpts / "last.ckpt") == KILL_AT - 1

    # the resumed run dies on any write to a final name: a checkpoint may reach it only by rename
    resumed = _run(tmp_path, f"*/{ckpts.name}/*.ckpt", 1, "linear", str(ckpts), str(STEPS), "atomic")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert final["global_step"] == STEPS
    assert all(_loads(p) is not None for p in ckpts.glob("*.ckpt")) and not torn.exists()

    fit_linear(str(tmp_path / "straight"), STEPS, "atomic")
    straight = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    assert straight["global_step"] == STEPS
    for k, v in straight["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][k], v, rtol=0, atol=0)
    first = torch.load(ckpts / "step=1.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(first[k], v) for k, v in straight["state_dict"].items())  # training moved the weights


def test_the_same_kill_tears_a_stock_checkpoint(tmp_path):
    """The injection sees a non-atomic save: with Lightning's `ModelCheckpoint` (an fsspec transaction staged in the
    system temp dir, then `shutil.move`, a copy across file systems) the same kill leaves a torn `last.ckpt`."""
    ckpts = tmp_path / "ckpts"
    _kill_linear(ckpts, "stock")
    assert (ckpts / "last.ckpt").exists() and _loads(ckpts / "last.ckpt") is None


def _shard_rows(out: Path) -> list[dict]:
    return [json.loads(line) for s in sorted(out.glob("shard-*.jsonl")) for line in s.read_text().splitlines()]


def test_trace_shard_killed_mid_write_is_never_read(tmp_path):
    """`predict` dies halfway through writing the third shard's bytes: every `shard-*.jsonl` present parses whole
    (the half is in a hidden temp file), and the rerun removes it, never writes a shard's final name in place (it
    would be killed) and writes the 40 rows exactly once."""
    dirs = build_compact_assets(tmp_path / "tiny", CompactFormat().tag_tokens(), seed=0)
    out = tmp_path / "traces"
    config = tmp_path / "predict.yaml"
    config.write_text(trace_predict_yaml(out, dirs["teacher"], num_train=40, batch_size=8, max_new_tokens=12))
    killed = _run(tmp_path, "*/traces/*shard-00002.jsonl*", 1, "cli", "predict", "-c", str(config))
    assert killed.returncode == KILLED_RC, killed.stderr[-3000:]
    first = {s.name: s.read_bytes() for s in out.glob("shard-*.jsonl")}
    assert sorted(first) == ["shard-00000.jsonl", "shard-00001.jsonl"], sorted(first)  # no torn third shard
    assert len(_shard_rows(out)) == 16
    torn = list(out.glob(".shard-00002.jsonl.*"))
    assert len(torn) == 1 and 0 < torn[0].stat().st_size  # the kill did land mid-write

    # the rerun dies on any write to a shard's final name: a shard may reach it only by rename
    rerun = _run(tmp_path, "*/traces/shard-*.jsonl", 1, "cli", "predict", "-c", str(config))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids = [r["id"] for r in _shard_rows(out)]
    assert sorted(ids) == sorted(f"add-train-{i}" for i in range(40))
    assert all(out.joinpath(name).read_bytes() == data for name, data in first.items())
    assert not list(out.glob(".shard-*"))
