"""`python -m rlt_pl test -c <student config> -c configs/data/...` runs offline on a tiny model and logs metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlt_pl.cli import cli_main
from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_cwd(tmp_path, monkeypatch):
    build_compact_assets(tmp_path / "runs" / "tiny", CompactFormat().tag_tokens())
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_student_test_on_countdown_logs_metrics_and_writes_jsonl(tiny_cwd):
    cli = cli_main(
        [
            "test",
            "-c",
            "configs/student/distill_tiny.yaml",
            "-c",
            "configs/data/countdown_synthetic.yaml",
            "--data.init_args.num_examples=64",
            "--data.init_args.val_size=8",
            "--data.init_args.test_size=12",
            "--model.init_args.eval_num_samples=2",
            "--model.init_args.eval_k=[1,2]",
            "--model.init_args.eval_sampling.max_new_tokens=8",
            "--model.init_args.eval_output_dir=runs/eval",
            "--trainer.logger.init_args.save_dir=runs",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert float(metrics["test/countdown/num_questions"]) == 12
    rows = [json.loads(line) for line in Path("runs/eval/test_countdown.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["responses"]) == 2 for r in rows)
    # the logged metrics are the per-question grades of the written rows, aggregated (pass@2 of 2 samples: any)
    want = {
        "pass@1": sum(sum(r["correct"]) / 2 for r in rows) / 12,
        "pass@2": sum(any(r["correct"]) for r in rows) / 12,
        "no_answer_rate": sum(x is None for r in rows for x in r["extracted"]) / 24,
    }
    for key, value in want.items():
        assert float(metrics[f"test/countdown/{key}"]) == pytest.approx(value), key


def test_student_test_on_heldout_addition(tiny_cwd):
    cli = cli_main(
        [
            "test",
            "-c",
            "configs/student/distill_tiny.yaml",
            "--data.init_args.data_path=unused",
            "--data.class_path=rlt_pl.datamodules.addition.AdditionDataModule",
            "--data.init_args.num_train=10",
            "--data.init_args.num_heldout=8",
            "--trainer.logger.init_args.save_dir=runs",
        ]
    )
    assert "test/addition/pass@1" in cli.trainer.callback_metrics
