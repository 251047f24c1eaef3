"""Cold-start RL mode: `ColdStartDataModule` and the tiny config chain (distil on Countdown traces → GRPO)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlt_pl.cli import cli_main
from rlt_pl.datamodules.cold_start import ColdStartDataModule
from rlt_pl.datamodules.countdown import CountdownDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets

REPO = Path(__file__).resolve().parents[1]


def _countdown(**kw) -> CountdownDataModule:
    return CountdownDataModule(synthetic=True, num_examples=40, val_size=4, test_size=6, batch_size=4, **kw)


def test_train_prompts_are_the_benchmark_train_split():
    dm = ColdStartDataModule(_countdown(), num_train_prompts=10, batch_size=5)
    dm.setup("fit")
    train_ids = {r["id"] for r in dm.benchmark.splits["train"]}
    batches = list(dm.train_dataloader())
    ids = [r["id"] for b in batches for r in b]
    assert len(batches) == 2 and len(ids) == 10 == len(set(ids)) and set(ids) <= train_ids
    held = {r["id"] for b in dm.val_dataloader() for r in b} | {r["id"] for b in dm.test_dataloader() for r in b}
    assert len(held) == 10 and not held & set(ids)
    assert dm.task is dm.benchmark.task and dm.name == "countdown"
    assert dm.data_stats()["data/countdown/train_prompts"] == 10.0


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="num_train_prompts"):
        ColdStartDataModule(_countdown(), num_train_prompts=0)
    with pytest.raises(ValueError, match="no train split"):
        ColdStartDataModule(_countdown(stage_splits={"val": "val", "test": "test"}))
    dm = ColdStartDataModule(_countdown(), num_train_prompts=1000)
    dm.setup("fit")
    with pytest.raises(ValueError, match="exceeds"):
        dm.train_dataloader()


def _write_traces(path: Path) -> None:
    dm = CountdownDataModule(synthetic=True, num_examples=96, val_size=8, test_size=8)
    dm.setup("fit")
    path.mkdir(parents=True, exist_ok=True)
    raws = {i: r for i, r in enumerate(dm._load_raw())}
    lines = []
    for row in dm.splits["train"][:48]:
        expr = raws[int(row["id"].split("-")[1])]["solution"]
        trace = dict(row, thought=f"try {expr}", solution=f"<answer> {expr} </answer>", matched=True)
        lines.append(json.dumps(trace))
    (path / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")


# ~40-60 s on 2 idle cores: a Countdown prompt is ~230 tokens for the character-level model
def test_cold_start_chain_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    build_compact_assets(tmp_path / "runs" / "tiny", CompactFormat().tag_tokens(), seed=0)
    _write_traces(tmp_path / "runs" / "cold_start_tiny" / "traces")
    distill = cli_main(["fit", "-c", "configs/experiment/cold_start_tiny/distill.yaml", "--trainer.max_steps=8"])
    export = tmp_path / "runs" / "cold_start_tiny" / "distill"
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    assert (tmp_path / "runs/cold_start_tiny/checkpoints/distill/last.ckpt").exists()
    assert math.isfinite(float(distill.trainer.callback_metrics["train/loss"]))
    rl = cli_main(
        [
            "fit",
            "-c",
            "configs/experiment/cold_start_countdown_tiny.yaml",
            "--model.init_args.model.name_or_path=runs/cold_start_tiny/distill",
        ]
    )
    assert Path(rl.model.model_config.name_or_path).resolve() == export.resolve()
    metrics = rl.trainer.callback_metrics
    for key in ("train/reward", "train/accuracy", "train/formatted", "val/reward"):
        assert math.isfinite(float(metrics[key])), key
    assert (tmp_path / "runs/cold_start_tiny/rl/model.safetensors").exists()
    assert (tmp_path / "runs/cold_start_tiny/checkpoints/rl/last.ckpt").exists()
