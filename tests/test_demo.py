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
        for label in ("t0.7", "greedy"):  # a percentage of the 16 held-out problems: a multiple of 6.25
            solved = acc[label] * 16 / 100
            assert solved == pytest.approx(round(solved), abs=1e-4) and 0 <= round(solved) <= 16, (name, acc)
    for artefact in ("REPORT.md", "timings.json", "summary.json", "rl_reward.png", "student_accuracy.png"):
        assert (out / artefact).exists(), artefact
    assert "Students" in (out / "REPORT.md").read_text()
    rewards = [v for _, v in summary["rl"]["train/reward"]]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first, f"RL did not raise the mean reward: {first:.3f} -> {last:.3f}"
    assert any(os.scandir(out / "tb"))
    for label in ("t0.7", "greedy"):  # the two evaluations of a student are separate runs
        assert (out / "tb" / f"eval_rl_seed0_{label}").is_dir(), label
    assert "Claim (RL-teacher students beat" in (out / "REPORT.md").read_text()
    # `make demo` writes only under its --out folder (the trace runs' config.yaml lands next to their shards)
    assert sorted(p.name for p in demo_cwd.iterdir()) == ["configs", "runs"]
    assert [p.name for p in (demo_cwd / "runs").iterdir()] == ["demo_small"]
    assert (out / "traces" / "rl" / "config.yaml").exists()


def _summary(rl: list[float], sft: list[float]) -> dict:
    students = {}
    for k, (a, b) in enumerate(zip(rl, sft)):
        students[f"rl_seed{k}"] = {"t0.7": a, "greedy": 100.0}
        students[f"sft_seed{k}"] = {"t0.7": b, "greedy": 90.0}
    return {"seeds": list(range(len(rl))), "students": students}


def test_claim_verdict_mean_and_every_seed():
    from rlt_pl.demo import claim_verdict, seed_stats

    held, line = claim_verdict(_summary([97.5, 98.0, 98.5], [64.5, 81.5, 66.5]))
    assert held and "held — gap 27.2 points" in line and "16.5 to 33.0 per seed" in line
    held, line = claim_verdict(_summary([97.5, 88.0, 98.5], [64.5, 81.5, 66.5]))  # mean gap 23.8, one seed 6.5
    assert not held and "not held" in line
    held, _ = claim_verdict(_summary([70.0], [61.0]))
    assert not held
    mean, lo, hi = seed_stats(_summary([97.5, 98.0, 98.5], [0, 0, 0])["students"], "rl", [0, 1, 2], "t0.7")
    assert (mean, lo, hi) == (98.0, 97.5, 98.5)
