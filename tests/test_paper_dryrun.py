"""The paper dry run: every `*_qwen7b` config, in the order of docs/RECIPE.md, with tiny models on CPU.

Each stage is `configs/<stage>.yaml` + `configs/experiment/paper_dryrun_tiny.yaml` (the same file, unchanged) + the
stage's command-line flags from docs/RECIPE.md (which name the previous stage's export) + local fixture files for the
Hub datasets. Nothing links one stage to the next but the `runs/...` paths the configs write and read, in a fresh
working directory. The Hub models are tiny models built at the Hub ids' relative paths (`Qwen/Qwen2.5-7B-Instruct`
carries Qwen2.5-Instruct's generation_config.json), so every other key (precision, dtype, gradient checkpointing,
G = 64, the loss, the callbacks) is the paper config's own.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from rlt_pl.cli import cli_main
from rlt_pl.tiny import build_tiny_assets

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
DRYRUN = str(REPO / "configs/experiment/paper_dryrun_tiny.yaml")
BESPOKE = f"--data.init_args.data_path={FIX}/bespoke_stratos.json"
BENCHMARKS = {
    "class_path": "rlt_pl.datamodules.multi.MultiBenchmarkDataModule",
    "init_args": {
        "datamodules": [
            {"class_path": f"rlt_pl.datamodules.{mod}.{cls}", "init_args": {"batch_size": 8, "data_path": str(FIX / f)}}
            for mod, cls, f in (
                ("aime24", "AIME24DataModule", "aime24.jsonl"),
                ("math500", "MATH500DataModule", "math500.jsonl"),
                ("gpqa", "GPQADiamondDataModule", "gpqa_diamond.jsonl"),
            )
        ]
    },
}


def _weights(export: Path) -> dict:
    return {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(f).items()}


def _changed(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and any(not a[k].equal(b[k]) for k in a)


def _stage(sub: str, config: str, *flags: str):
    start = time.perf_counter()
    cli = cli_main([sub, "-c", str(REPO / config), "-c", DRYRUN, *flags])
    print(f"{config}: {time.perf_counter() - start:.1f} s")  # shown by `pytest -s`, one line per stage
    return cli.trainer, cli.model


def test_paper_dryrun_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = build_tiny_assets(tmp_path / "tiny", qwen_generation_config=True)
    for src, hub_id in (
        (tiny["teacher"], "Qwen/Qwen2.5-7B-Instruct"),
        (tiny["student"], "bespokelabs/Bespoke-Stratos-7B"),
    ):
        (tmp_path / hub_id).parent.mkdir(parents=True, exist_ok=True)
        src.rename(tmp_path / hub_id)
    (tmp_path / "benchmarks.yaml").write_text(yaml.safe_dump({"data": BENCHMARKS}))
    (tmp_path / "distill_eval.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"eval_data": BENCHMARKS}}}))
    base = _weights(tmp_path / "Qwen/Qwen2.5-7B-Instruct")

    # 1. teacher SFT warm-up (Bespoke-Stratos; no val split: validation is simply absent)
    trainer, model = _stage("fit", "configs/teacher/sft_qwen7b.yaml", BESPOKE)
    assert trainer.global_step == 2 and trainer.precision == "bf16-mixed"
    assert next(model.model.parameters()).dtype.is_floating_point and model.model.dtype.itemsize == 4  # fp32 masters
    sft = _weights(tmp_path / "runs/teacher_sft/export")
    assert _changed(base, sft)

    # 2. teacher RL from the SFT export, reward from the (tiny) Bespoke-Stratos student, G = 64
    rl_flags = [
        "--model.init_args.model.name_or_path=runs/teacher_sft/export",
        BESPOKE,
        "--data.init_args.batch_size=1",
    ]
    trainer, model = _stage("fit", "configs/teacher/rlt_qwen7b.yaml", *rl_flags)
    assert trainer.global_step == 2 and model.num_generations == 64
    assert "train/reward/mean" in trainer.callback_metrics or any("reward" in k for k in trainer.callback_metrics)
    rl = _weights(tmp_path / "runs/rlt_qwen7b/export")
    assert _changed(sft, rl)

    # 3. traces from the RL export (the path traces_qwen7b.yaml reads as written)
    _stage("predict", "configs/experiment/traces_qwen7b.yaml", BESPOKE)
    out = tmp_path / "runs/traces/rlt_qwen7b"
    rows = [json.loads(line) for line in (out / "shard-00000.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["completion_tokens"] == 8 for r in rows)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["model"] == "runs/rlt_qwen7b/export" and lineage["sampling"]["repetition_penalty"] == 1.0

    # 4. student distillation on those traces (distill_qwen7b.yaml's data_path as written)
    trainer, _ = _stage("fit", "configs/student/distill_qwen7b.yaml", "-c", "distill_eval.yaml")
    assert trainer.global_step == 2
    student = _weights(tmp_path / "runs/student_distill/export")
    assert _changed(base, student)

    # 5. evaluation of the distilled student (paper protocol, greedy)
    eval_flags = ["--model.init_args.model.name_or_path=runs/student_distill/export", "-c", "benchmarks.yaml"]
    trainer, _ = _stage(
        "test", "configs/eval/paper_protocol.yaml", *eval_flags, "--model.init_args.eval_sampling.max_new_tokens=8"
    )
    metrics = trainer.callback_metrics
    assert {k for k in metrics if k.endswith("/num_questions")} == {
        f"test/{b}/num_questions" for b in ("aime24", "math500", "gpqa_diamond")
    }
    assert "test/count/skipped_long_prompts" in metrics
    assert sorted(p.name for p in (tmp_path / "runs/eval_paper_protocol").glob("*.jsonl")) == [
        "test_aime24.jsonl",
        "test_gpqa_diamond.jsonl",
        "test_math500.jsonl",
    ]

    # 6. cold-start RL on Countdown from the distilled student
    cold_flags = [
        "--model.init_args.model.name_or_path=runs/student_distill/export",
        "--data.init_args.batch_size=1",
        "--model.init_args.micro_batch_size=64",
        f"--data.init_args.benchmark.init_args.data_path={FIX}/countdown.jsonl",
        "--data.init_args.benchmark.init_args.val_size=1",
        "--data.init_args.benchmark.init_args.test_size=1",
    ]
    trainer, _ = _stage("fit", "configs/experiment/cold_start_countdown_qwen7b.yaml", *cold_flags)
    assert trainer.global_step == 2
    cold = _weights(tmp_path / "runs/cold_start_countdown_qwen7b/export")
    assert _changed(base, cold)  # started from the distilled export (tiny random students rarely score on Countdown)

    links = [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert not links, links


def test_dryrun_override_only_shrinks():
    """The override file holds no model id, precision, dtype, callback, data or export path: those stay the paper's."""
    override = yaml.safe_load(Path(DRYRUN).read_text())
    assert set(override) == {"trainer", "model"}
    assert set(override["trainer"]) == {
        "accelerator",
        "devices",
        "strategy",
        "max_steps",
        "accumulate_grad_batches",
        "limit_val_batches",
        "limit_test_batches",
        "limit_predict_batches",
        "enable_progress_bar",
    }
    assert override["model"] == {"init_args": {"sampling": {"max_new_tokens": 8}}}


def test_paper_dryrun_qlora_configs(tmp_path, monkeypatch):
    """The single-GPU QLoRA configs as written (NF4 base, LoRA, adapter-off reference, 4-bit reward student, paged
    8-bit AdamW), with the same override file, on CPU: bitsandbytes >= 0.48 runs NF4 layers on CPU tensors. The
    teacher trains 2 steps and exports its adapter; the student distils 2 steps on traces in the paper's folder."""
    from rlt_pl.models import bitsandbytes_runs_on_cpu

    if not bitsandbytes_runs_on_cpu():
        import pytest

        pytest.skip("needs bitsandbytes >= 0.48 for NF4 on CPU")
    monkeypatch.chdir(tmp_path)
    tiny = build_tiny_assets(tmp_path / "tiny")
    # bitsandbytes' CPU NF4 kernels need layer widths divisible by 32 (true of every Qwen2.5): the student is a copy
    # of the 64-wide tiny teacher rather than the 48-wide tiny student
    for hub_id in ("Qwen/Qwen2.5-7B-Instruct", "bespokelabs/Bespoke-Stratos-7B"):
        shutil.copytree(tiny["teacher"], tmp_path / hub_id)
    cpu_8bit = "--model.init_args.optimizer.init_args.allow_cpu=true"  # paged 8-bit AdamW refuses CPU unless told

    trainer, _ = _stage("fit", "configs/teacher/rlt_qwen7b_qlora_24gb.yaml", BESPOKE, cpu_8bit)
    assert trainer.global_step == 2
    export = tmp_path / "runs/rlt_qwen7b_qlora/export"
    adapter = load_file(export / "adapter_model.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0

    traces = tmp_path / "runs/traces/rlt_qwen7b"
    traces.mkdir(parents=True)
    rows = [
        {"id": i, "question": f"What is {i} + {i}?", "thought": f"{i} + {i} = {2 * i}.", "solution": str(2 * i)}
        for i in range(4)
    ]
    (traces / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, _ = _stage("fit", "configs/student/distill_qlora_24gb.yaml", cpu_8bit, "--data.init_args.batch_size=2")
    assert trainer.global_step == 2
    assert (tmp_path / "runs/students/rlt_qwen7b_qlora/adapter_model.safetensors").exists()
