"""The command line: help, --print_config, and `fit -c configs/teacher/rlt_tiny.yaml` end to end with TensorBoard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlt_pl.cli import cli_main
from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = "configs/teacher/rlt_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_cwd(tmp_path_factory) -> Path:
    """A working directory holding `runs/tiny/{teacher,student}` (compact) and a link to the repo's `configs/`."""
    cwd = tmp_path_factory.mktemp("cli")
    build_compact_assets(cwd / "runs" / "tiny", CompactFormat().tag_tokens(), seed=0)
    (cwd / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    return cwd


def _run_module(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "rlt_pl", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_subcommands():
    out = _run_module("--help")
    assert out.returncode == 0, out.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out.stdout


def test_fit_help_documents_model_and_data(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "--data" in text and "--trainer.max_steps" in text


def test_print_config_resolves_the_tiny_yaml(tiny_cwd, monkeypatch, capsys):
    monkeypatch.chdir(tiny_cwd)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", TINY_CONFIG, "--print_config"])
    assert exc.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "rlt_pl.modules.teacher_rl.TeacherRLModule"
    assert init["num_generations"] == 4 and init["reference"] == "copy"  # the default filled in
    assert init["sampling"]["max_new_tokens"] == 32 and init["sampling"]["top_p"] == 1.0
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "rlt_pl.callbacks.StudentRewardCallback" in callbacks
    assert init["format"]["class_path"] == "rlt_pl.formats.CompactFormat"
    assert config["data"]["class_path"] == "rlt_pl.datamodules.addition.AdditionDataModule"


def test_bad_value_fails_at_instantiation_naming_the_flag(tiny_cwd, monkeypatch):
    monkeypatch.chdir(tiny_cwd)
    with pytest.raises(ValueError, match="model.init_args.num_generations must be >= 1"):
        cli_main(["-c", TINY_CONFIG, "--model.init_args.num_generations=0"], run=False)


def test_unknown_flag_is_rejected(tiny_cwd, monkeypatch, capsys):
    monkeypatch.chdir(tiny_cwd)
    with pytest.raises(SystemExit) as exc:
        cli_main(["-c", TINY_CONFIG, "--model.init_args.num_generashuns=4"], run=False)
    assert exc.value.code != 0
    assert "num_generashuns" in capsys.readouterr().err


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {log_dir}"
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_fit_tiny_config_end_to_end(tiny_cwd, monkeypatch):
    """`python -m rlt_pl fit -c configs/teacher/rlt_tiny.yaml` (in-process, 3 steps): TensorBoard scalars and the
    sample table are written, and the saved `config.yaml` parses back to the same run."""
    monkeypatch.chdir(tiny_cwd)
    cli = cli_main(["fit", "-c", TINY_CONFIG, "--trainer.max_steps=3", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.logger.log_dir)
    acc = _events(log_dir)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/reward", "train/rss", "train/rkl", "train/match_rate", "train/kl", "train/policy_loss"):
        assert tag in scalars, sorted(scalars)
    assert len(acc.Scalars("train/reward")) == 3
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    assert text_tags, acc.Tags()
    table = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert "| question | completion | reward |" in table

    saved = log_dir / "config.yaml"
    assert saved.exists()
    # run=False has no subcommands, so fit's own arguments (`ckpt_path`, `weights_only`) are dropped first
    config = yaml.safe_load(saved.read_text())
    assert config.pop("ckpt_path") is None
    config.pop("weights_only", None)
    replay = log_dir / "replay.yaml"
    replay.write_text(yaml.safe_dump(config))
    again = cli_main(["-c", str(replay)], run=False)
    assert again.config["trainer"]["max_steps"] == 3
    model = again.model
    assert type(model).__name__ == "TeacherRLModule"
    assert model.num_generations == cli.model.num_generations and model.sampling == cli.model.sampling
    assert model.model_config == cli.model.model_config and model.format == cli.model.format
    assert again.datamodule.batch_size == cli.datamodule.batch_size


def test_construction_error_is_one_line_naming_the_flag(tiny_cwd):
    """A missing student checkpoint ends the command with one line naming `student.name_or_path` (exit 1, no
    traceback, no library noise); `RLT_PL_DEBUG=1` brings the traceback back."""
    args = ("fit", "-c", TINY_CONFIG, "--trainer.callbacks.init_args.student.name_or_path=./runs/missing/student")
    out = _run_module(*args, cwd=tiny_cwd)
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rlt_pl: error: student.name_or_path='./runs/missing/student' looks like a local path")
    assert "export_dir" in last and "--debug" in last
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "gemm_4bit_forward" not in text and "Tip:" not in text
    debug = _run_module(*args, "--debug", cwd=tiny_cwd)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "student.name_or_path='./runs/missing/student' looks like a local path" in debug.stderr
