"""docs/RECIPE.md at tiny scale: the commands of its CPU block run in order, each stage reads the previous stage's
folder, every trained stage changes the weights it started from, and nothing is written outside `runs/`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlt_pl.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
# Fewer steps/batches than the configs; everything else as written in RECIPE.md.
SHORT = ["--trainer.max_steps=2", "--trainer.limit_test_batches=1"]


def recipe_commands(section: str = "## At tiny scale") -> list[list[str]]:
    """The `python -m ...` lines of the first bash block after `section` in docs/RECIPE.md, as argv lists."""
    text = (REPO / "docs" / "RECIPE.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(section) :], re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python -m ")]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _changed(before: Path, after: Path) -> bool:
    a, b = _weights(before), _weights(after)
    return any(not torch.equal(a[k], b[k]) for k in a if k in b)


def test_recipe_lists_every_stage():
    paper = [" ".join(c) for c in recipe_commands("## At paper scale")]
    tiny = [" ".join(c) for c in recipe_commands()]
    assert len(paper) == 6 and len(tiny) == 9
    for config in ("sft_qwen7b", "rlt_qwen7b", "traces_qwen7b", "distill_qwen7b", "paper_protocol", "cold_start"):
        assert any(config in c for c in paper), config
    assert "runs/teacher_sft/export" in paper[1] and "runs/student_distill/export" in paper[4]


@pytest.mark.slow  # ~2 min on 2 cores; every config of the chain also runs on its own in tests/test_config_runs.py
def test_tiny_recipe_runs_in_order(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")
    clis = []
    for argv in recipe_commands():
        assert argv[:3] in (["python", "-m", "rlt_pl"], ["python", "-m", "rlt_pl.tiny"]), argv
        if argv[2] == "rlt_pl.tiny":
            from rlt_pl.tiny import main

            main(argv[3:])
            continue
        clis.append((argv[3], argv[5], cli_main([*argv[3:], *SHORT])))
    assert _changed(runs / "tiny/teacher", runs / "tiny_sft/export"), "SFT did not update the teacher"
    assert _changed(runs / "tiny_sft/export", runs / "tiny_rl/export"), "RL did not update the SFT teacher"
    assert _changed(runs / "tiny/student", runs / "tiny_distill/export"), "distillation did not update the student"
    assert (runs / "cold_start_tiny/rl/model.safetensors").exists()  # 2 steps: rewards may not vary yet
    for traces in (runs / "tiny_traces", runs / "cold_start_tiny/traces"):
        assert sorted(traces.glob("shard-*.jsonl")) and (traces / "lineage.json").exists(), traces
        assert (traces / "config.yaml").exists(), "the trace run's config is saved in its own folder"
    tested = [cli for sub, config, cli in clis if sub == "test"]
    assert tested and any(k.startswith("test/") for k in tested[0].trainer.callback_metrics)
    for stage in ("tiny_sft", "tiny_rl", "tiny_distill"):
        assert (runs / stage / "checkpoints" / "last.ckpt").exists(), stage
        assert list((runs / stage).glob("version_*/config.yaml")), stage
    assert sorted(p.name for p in Path(".").iterdir()) == ["configs", "runs"], "a stage wrote outside runs/"
    expected = {"tiny", "tiny_sft", "tiny_rl", "tiny_traces", "tiny_distill", "cold_start_tiny"}
    assert {p.name for p in runs.iterdir()} == expected


@pytest.mark.parametrize("config", ["configs/teacher/sft_tiny.yaml"])
def test_ckpt_path_last_resumes_and_is_refused_without_a_checkpoint(config, tmp_path, monkeypatch):
    """Tiny configs checkpoint with save_last, so `--ckpt_path last` continues; with no checkpoint it is an error."""
    from rlt_pl.tiny import main

    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    main(["runs/tiny", "--compact"])
    with pytest.raises(ValueError, match="--ckpt_path last: no last checkpoint in .*tiny_sft/checkpoints"):
        cli_main(["fit", "-c", config, "--trainer.max_steps=2", "--ckpt_path=last"])
    cli_main(["fit", "-c", config, "--trainer.max_steps=2"])
    cli = cli_main(["fit", "-c", config, "--trainer.max_steps=3", "--ckpt_path=last"])
    assert cli.trainer.global_step == 3  # continued from step 2, not from scratch (which would also end at 3)
    assert cli.trainer.fit_loop.epoch_loop._batches_that_stepped == 3
