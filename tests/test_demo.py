"""The demo pipeline at a small size: every stage runs through the CLI and leaves its artifact, and RL raises the
teacher's mean RLT reward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo_cwd(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_pipeline_small(demo_cwd):
    from rlt_pl import demo

    out = Path("runs/demo_small")
    summary = demo.run(out, scale=0.1, seeds=(0,), num_train=96, num_heldout=16, rl_steps=24)
    for stage in ("pretrain", "teacher_sft", "teacher_rl"):
        assert (out / stage / "config.json").exists() and (out / stage / "model.safetensors").exists(), stage
    for source in ("sft", "rl"):
        shards = list((out / "traces" / source).glob("shard-*.jsonl"))
        assert shards and json.loads((out / "traces" / source / "summary.json").read_text())["rows"] == 96
    for name in ("sft_seed0", "rl_seed0", "answer_only_seed0"):
        assert (out / "students" / name / "model.safetensors").exists()
        acc = summary["students"][name]
        assert 0.0 <= acc["t0.7"] <= 100.0 and 0.0 <= acc["greedy"] <= 100.0
    for artefact in ("REPORT.md", "timings.json", "summary.json", "rl_reward.png", "student_accuracy.png"):
        assert (out / artefact).exists(), artefact
    assert "Students" in (out / "REPORT.md").read_text()
    rewards = [v for _, v in summary["rl"]["train/reward"]]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first, f"RL did not raise the mean reward: {first:.3f} -> {last:.3f}"
    assert any(os.scandir(out / "tb"))
    # `make demo` writes only under its --out folder (the trace runs' config.yaml lands next to their shards)
    assert sorted(p.name for p in demo_cwd.iterdir()) == ["configs", "runs"]
    assert [p.name for p in (demo_cwd / "runs").iterdir()] == ["demo_small"]
    assert (out / "traces" / "rl" / "config.yaml").exists()
