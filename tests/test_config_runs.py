"""Every shipped config runs as it is meant to be used (`fit`, `test`, `predict`), not only instantiated.

Tiny models stand in for the checkpoints a previous stage would have written (`runs/...` model paths are linked to
tiny models), local fixture files stand in for Hub datasets (`data_path`), and runs are shortened (1 step, 1 batch);
everything else is the YAML as written. The paper-scale `*_qwen7b` and QLoRA configs are run end to end with tiny
models by `tests/test_paper_dryrun.py`, the demo stages by `tests/test_demo.py`, and the tiny chain of
docs/RECIPE.md, in order, by `tests/test_recipe.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlt_pl.cli import cli_main
from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
SHORT = ["--trainer.max_steps=1", "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1"]
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]
GEN = "--model.init_args.sampling.max_new_tokens=8"  # shorter samples in generating runs
DISTILL, SFT = "configs/student/distill_tiny.yaml", "configs/teacher/sft_tiny.yaml"
EVAL_DATA = {  # benchmark datamodule class → fixture file in its Hub schema
    "AIME24DataModule": "aime24.jsonl",
    "MATH500DataModule": "math500.jsonl",
    "GPQADiamondDataModule": "gpqa_diamond.jsonl",
}

# config → [(subcommand, configs before it, extra flags)]; `test` runs check `test/...` metrics, `fit` the step
# count, `predict` the trace shards.
RUNS: dict[str, list[tuple[str, list[str], list[str]]]] = {
    "configs/teacher/sft_tiny.yaml": [("fit", [], [])],
    "configs/teacher/rlt_tiny.yaml": [("fit", [], [GEN])],
    "configs/student/distill_tiny.yaml": [("fit", [], []), ("test", [], [])],
    "configs/experiment/traces_tiny.yaml": [("predict", [], [GEN, "--data.init_args.batch_size=4"])],
    "configs/experiment/cold_start_tiny/traces.yaml": [("predict", [], [GEN, "--data.init_args.batch_size=4"])],
    "configs/experiment/cold_start_tiny/distill.yaml": [("fit", [], [])],
    "configs/experiment/cold_start_countdown_tiny.yaml": [("fit", [], [GEN])],
    "configs/data/aime24.yaml": [("test", [DISTILL], [f"--data.init_args.data_path={FIX}/aime24.jsonl"])],
    "configs/data/math500.yaml": [("test", [DISTILL], [f"--data.init_args.data_path={FIX}/math500.jsonl"])],
    "configs/data/gpqa_diamond.yaml": [("test", [DISTILL], [f"--data.init_args.data_path={FIX}/gpqa_diamond.jsonl"])],
    "configs/data/benchmarks.yaml": [("test", [DISTILL], ["EVAL_DATA"])],
    "configs/data/bespoke_stratos.yaml": [("fit", [SFT], [f"--data.init_args.data_path={FIX}/bespoke_stratos.json"])],
    "configs/data/countdown.yaml": [
        (
            "test",
            [DISTILL],
            [
                f"--data.init_args.data_path={FIX}/countdown.jsonl",
                "--data.init_args.val_size=2",
                "--data.init_args.test_size=2",
            ],
        )
    ],
    "configs/data/countdown_synthetic.yaml": [("test", [DISTILL], [])],
    "configs/eval/paper_protocol.yaml": [("test", [], ["EVAL_DATA", "STRATOS", "--trainer.logger=false"])],
    **{f"configs/trainer/{t}.yaml": [("fit", [SFT], [])] for t in ("cpu", "ddp", "fsdp", "gpu_bf16")},
}
COVERED_ELSEWHERE = {
    "test_cpu_multiprocess_trainer_config_runs": lambda c: c.endswith(("fsdp_cpu.yaml", "ddp_cpu.yaml")),
    "tests/test_paper_dryrun.py": lambda c: "qwen7b" in c or "qlora" in c,
    "tests/test_demo.py": lambda c: c.startswith("configs/experiment/demo/"),
    "tests/test_paper_dryrun.py (the override file of every stage)": lambda c: c.endswith("paper_dryrun_tiny.yaml"),
}


def _covered_by(config: str) -> str | None:
    return next((test for test, match in COVERED_ELSEWHERE.items() if match(config)), None)


@pytest.fixture(scope="module")
def run_cwd(tmp_path_factory, tiny_dirs) -> Path:
    """A working directory with tiny compact models in `runs/tiny`, a trace set, and a link to `configs/`."""
    cwd = tmp_path_factory.mktemp("config_runs")
    build_compact_assets(cwd / "runs" / "tiny", CompactFormat().tag_tokens(), seed=0)
    (cwd / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    rows = [
        {"id": f"t{i}", "question": f"{i}+{i}", "thought": f"{i}+{i}={2 * i}", "solution": str(2 * i)} for i in range(8)
    ]
    for traces in ("runs/tiny_traces", "runs/cold_start_tiny/traces"):
        (cwd / traces).mkdir(parents=True)
        (cwd / traces / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_override = {
        "data": {
            "class_path": "rlt_pl.datamodules.multi.MultiBenchmarkDataModule",
            "init_args": {
                "datamodules": [
                    {"class_path": f"rlt_pl.datamodules.{mod}.{cls}", "init_args": {"data_path": str(FIX / f)}}
                    for (cls, f), mod in zip(EVAL_DATA.items(), ("aime24", "math500", "gpqa"), strict=True)
                ]
            },
        }
    }
    (cwd / "eval_data.yaml").write_text(yaml.safe_dump(eval_override))
    (cwd / "stratos.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {
                        "model": {"name_or_path": str(tiny_dirs["student"])},
                        "eval_sampling": {"max_new_tokens": 4},
                    }
                }
            }
        )
    )
    return cwd


def _link_local_models(cwd: Path, node) -> None:
    """`runs/...` model paths a previous stage would have written → the tiny compact teacher."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "name_or_path" and isinstance(v, str) and v.startswith("runs/") and not (cwd / v).exists():
                (cwd / v).parent.mkdir(parents=True, exist_ok=True)
                (cwd / v).symlink_to(cwd / "runs" / "tiny" / "teacher", target_is_directory=True)
            _link_local_models(cwd, v)
    elif isinstance(node, list):
        for v in node:
            _link_local_models(cwd, v)


def _argv(sub: str, config: str, before: list[str], extra: list[str]) -> list[str]:
    args = [sub]
    for c in before:
        args += ["-c", c]
    args += ["-c", config]
    gpu = (yaml.safe_load((REPO / config).read_text()).get("trainer") or {}).get("accelerator") == "gpu"
    for flag in extra:
        if flag == "EVAL_DATA":
            args += ["-c", "eval_data.yaml"]
        elif flag == "STRATOS":
            args += ["-c", "stratos.yaml"]
        else:
            args.append(flag)
    short = SHORT + (["--model.init_args.eval_sampling.max_new_tokens=4"] if sub == "test" else [])
    return args + short + (CPU if gpu and not torch.cuda.is_available() else [])


def test_every_config_is_run_or_covered():
    """Each YAML under configs/ is run here or named as run end to end by another test."""
    missing = [c for c in CONFIGS if c not in RUNS and _covered_by(c) is None]
    assert not missing, f"configs with no run: {missing}"
    assert not [c for c in RUNS if c not in CONFIGS], "RUNS names configs that do not exist"


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs(config, run_cwd, monkeypatch):
    if config not in RUNS:
        pytest.skip(f"run end to end by {_covered_by(config)}")
    monkeypatch.chdir(run_cwd)
    for sub, before, extra in RUNS[config]:
        for c in [*before, config]:
            _link_local_models(run_cwd, yaml.safe_load((REPO / c).read_text()))
        if sub == "predict":  # the stand-in trace set lives where this run writes: start from an empty folder
            for writer in yaml.safe_load((REPO / config).read_text())["trainer"]["callbacks"]:
                for shard in (run_cwd / writer["init_args"]["output_dir"]).glob("shard-*.jsonl"):
                    shard.unlink()
        cli = cli_main(_argv(sub, config, before, extra))
        trainer = cli.trainer
        if sub == "fit":
            assert trainer.global_step == 1, (config, trainer.global_step)
        elif sub == "test":
            assert any(k.startswith("test/") for k in trainer.callback_metrics), (config, trainer.callback_metrics)
        else:
            writer = next(cb for cb in trainer.callbacks if hasattr(cb, "shard_path"))
            assert writer.counts["written"] > 0 and any(writer.output_dir.glob("shard-*.jsonl")), config
    assert sorted(p.name for p in run_cwd.iterdir()) == ["configs", "eval_data.yaml", "runs", "stratos.yaml"]


@pytest.mark.parametrize("trainer_config", [c for c in CONFIGS if c.startswith("configs/trainer/")])
def test_trainer_configs_keep_the_stage_logger(trainer_config, run_cwd, monkeypatch):
    """Adding a trainer config after a stage config keeps the stage's log folder (runs/tiny_sft), not `logs/`."""
    monkeypatch.chdir(run_cwd)
    cli = cli_main(["-c", SFT, "-c", trainer_config, *CPU], run=False)
    assert Path(cli.trainer.logger.save_dir).as_posix() == "runs" and cli.trainer.logger.name == "tiny_sft"


@pytest.mark.parametrize("trainer_config", ["configs/trainer/fsdp_cpu.yaml", "configs/trainer/ddp_cpu.yaml"])
def test_cpu_multiprocess_trainer_config_runs(trainer_config, run_cwd, tmp_path):
    """The CPU variants of the FSDP/DDP trainer configs run as written: 2 processes with gloo, one SFT step each,
    bounded by a timeout so a collective hang fails."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "rlt_pl", "fit", "-c", SFT, "-c", trainer_config, "--trainer.max_steps=1"]
    args += [f"--trainer.default_root_dir={out}", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"]
    args += ["--data.init_args.batch_size=2", f"--model.init_args.export_dir={out}/export"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=run_cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "export" / "config.json").exists(), proc.stderr[-2000:]
