"""Smoke test of the benchmark suite at a trivially small size (B2 skipped without trl)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks import b1_reward, b4_demo, short_format
from benchmarks import run as bench_run
from rlt_pl.rewards import RewardConfig
from rlt_pl.scoring import RLTScorer


def test_per_sample_matches_batched(tokenizer, teacher_model, student_model):
    fmt = short_format()
    batch = b1_reward.make_batch(tokenizer, fmt, group=3, n_tokens=20, seed=1)
    config = RewardConfig()
    scorer = RLTScorer(student_model, tokenizer, fmt, config)
    q, s, p, c = batch["questions"], batch["solutions"], batch["prompts"], batch["completions"]
    batched = scorer.score(q, s, c, None, teacher_model, p).output.reward
    ref = [
        b1_reward.per_sample_reward(teacher_model, student_model, tokenizer, fmt, *r, config) for r in zip(p, q, s, c)
    ]
    assert torch.allclose(batched.float(), torch.tensor(ref), atol=1e-4)
    # an unmatched completion gets the penalty on both paths
    c2 = [c[0].replace(fmt.explanation_end, "")]
    un = scorer.score(q[:1], s[:1], c2, None, teacher_model, p[:1]).output
    un_ref = b1_reward.per_sample_reward(teacher_model, student_model, tokenizer, fmt, p[0], q[0], s[0], c2[0], config)
    assert float(un.match[0]) == -1.0 and abs(float(un.reward[0]) - un_ref) < 1e-4


def test_sublist_helpers():
    assert b1_reward.find_sublist([1, 2, 3, 2, 3], [2, 3]) == 1
    assert b1_reward.find_sublist([1, 2, 3, 2, 3], [2, 3], reverse=True) == 3
    assert b1_reward.find_valid_subsequence([9, 2, 3], [1, 2, 3]) == [2, 3]
    assert b1_reward.find_valid_subsequence([7, 8], [1, 2, 3]) is None


def test_b4_missing_and_present(tmp_path):
    assert not b4_demo.run(tmp_path / "none.json")["available"]
    (tmp_path / "t.json").write_text(json.dumps({"sft": 1.5, "rl": 2.0, "note": "x"}))
    out = b4_demo.run(tmp_path / "t.json")
    assert out["available"] and len(out["rows"]) == 2 and out["skipped_entries"] == ["note"]


def test_quick_run_writes_results(tmp_path, monkeypatch):
    skip = "b3" if importlib.util.find_spec("trl") is None else "b2,b3"  # B2/B3 are minutes-long even when quick
    monkeypatch.setattr(bench_run, "QUICK_GRID", {"tiny": [(2, 16)]})
    monkeypatch.setattr(bench_run, "QUICK_HEADLINE", ("tiny", 2, 16))
    bench_run.main(["--out", str(tmp_path), "--quick", "--skip", skip, "--work", str(tmp_path / "w")])
    data = json.loads((tmp_path / "results.json").read_text())
    t = data["targets"]
    assert t["b1_speedup_vs_per_sample_g16"] > 0 and t["b1_cost_vs_bare_forward"] > 0
    assert t["b3_peak_rss_mb"] is None
    assert data["details"]["b1"]["max_abs_diff"] < 1e-4
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## B1 reward throughput" in text and "## Targets" in text
    assert "## B6 generation" in text and t["b6_cb_vs_hf_tokens_per_s_min"] > 0
    assert all(r["greedy_identical"] for r in data["details"]["b6"]["rows"])


def test_unknown_skip_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmarks"):
        bench_run.main(["--out", str(tmp_path), "--skip", "b9"])


def test_scenario_outcomes_follow_the_documented_rules() -> None:
    from benchmarks.scenarios import Scenario, classify, observe

    def fail(msg):
        raise ValueError(msg)

    named = Scenario("config", "x", lambda: fail("model.init_args.lr must be > 0"), culprit=("init_args.lr",))
    assert classify(named, observe(named.action)) == "clear error"
    unnamed = Scenario("config", "x", lambda: fail("index out of range"), culprit=("init_args.lr",))
    assert classify(unnamed, observe(unnamed.action)) == "deep crash"
    row = Scenario("data", "x", lambda: fail("line 2 is bad"), culprit=("line 2",), row_level=True)
    assert classify(row, observe(row.action)) == "lost"  # one bad row must not abort the job
    ok = Scenario("data", "x", lambda: 3, reported=lambda o: o.value == 3, lost=lambda o: False)
    assert classify(ok, observe(ok.action)) == "counted"
    quiet = Scenario("config", "x", lambda: None)
    assert classify(quiet, observe(quiet.action)) == "silent"
    gone = Scenario("signal", "x", lambda: 0, correct=lambda o: True, lost=lambda o: True)
    assert classify(gone, observe(gone.action)) == "lost"

    def usage_error():
        print("error: argument --batch-size: invalid int value")
        raise SystemExit(2)

    exits = Scenario("scorer", "x", usage_error, culprit=("--batch-size",))
    assert classify(exits, observe(exits.action)) == "clear error"


def test_a_few_data_and_config_scenarios_run_clean(tiny_dirs, tmp_path) -> None:
    from benchmarks.scenarios import BAD, configs, data, run_all

    picked = data.scenarios(tmp_path / "data")[:6] + configs.scenarios(tiny_dirs, tiny_dirs, tmp_path / "config")[:6]
    results = run_all(picked, verbose=False)
    assert len(results) == 12 and not [r for r in results if r[2] in BAD]
