"""Runs write only into their own folder and refuse what would be silently lost: local-looking model paths,
`predict` without a writer, the step progress bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlt_pl.cli import cli_main
from rlt_pl.models import resolve_name_or_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["runs/teacherX", "./x", "/no/such/dir", "here/model"])
def test_local_looking_paths_are_local(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()  # an existing parent directory makes "here/model" a local path
    with pytest.raises(ValueError, match="looks like a local path but .* does not exist"):
        resolve_name_or_path(name)
    assert resolve_name_or_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


@pytest.fixture()
def tiny_cwd(tmp_path, monkeypatch):
    from rlt_pl.tiny import main

    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    main(["runs/tiny", "--compact"])
    return tmp_path


def test_predict_without_a_writer_is_refused(tiny_cwd):
    with pytest.raises(ValueError, match="no prediction writer in trainer.callbacks"):
        cli_main(["predict", "-c", "configs/teacher/sft_tiny.yaml"])


def test_logger_off_saves_config_in_the_writer_folder_and_the_bar_counts_steps(tiny_cwd):
    from rlt_pl.callbacks.progress import StepProgressBar

    (tiny_cwd / "runs" / "tiny_rl").mkdir()
    (tiny_cwd / "runs" / "tiny_rl" / "export").symlink_to(tiny_cwd / "runs" / "tiny" / "teacher")
    flags = ["--trainer.limit_predict_batches=1", "--model.init_args.sampling.max_new_tokens=4"]
    cli_main(["predict", "-c", "configs/experiment/traces_tiny.yaml", *flags])
    assert (tiny_cwd / "runs" / "tiny_traces" / "config.yaml").exists()
    assert sorted(p.name for p in tiny_cwd.iterdir()) == ["configs", "runs"], "config.yaml written to the cwd"
    cli = cli_main(["fit", "-c", "configs/teacher/sft_tiny.yaml", "--trainer.max_steps=2"])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar) and bar._get_train_description(0).strip() == "Step 2/2"
