"""SIGTERM and SIGINT on `fit` and `predict`: a resumable state is left (a final checkpoint that resumes; every
finished trace shard) and the process exits non-zero (128 + the signal)."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import pytest
import torch

from rlt_pl.callbacks.shutdown import GracefulShutdown
from rlt_pl.callbacks.trace_writer import TraceWriter
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.sft import TeacherSFTModule
from rlt_pl.tiny import build_compact_assets


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("compact_signals"), CompactFormat().tag_tokens(), seed=0)


class SignalAt(L.Callback):
    """Sends the process a signal at the end of one batch (train or predict)."""

    def __init__(self, signum: int, batch: int) -> None:
        self.signum, self.batch = signum, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def _module(dirs) -> TeacherSFTModule:
    return TeacherSFTModule(
        ModelConfig(str(dirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        lr=1e-3,
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.7),
    )


def _trainer(tmp_path, *callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **kwargs,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_on_fit_saves_a_resumable_checkpoint_and_exits_nonzero(compact_dirs, tmp_path, signum) -> None:
    torch.manual_seed(0)
    previous = signal.getsignal(signal.SIGINT)
    try:
        _fit_and_resume(compact_dirs, tmp_path, signum)
    finally:
        signal.signal(signal.SIGINT, previous)


def _fit_and_resume(compact_dirs, tmp_path, signum) -> None:
    shutdown = GracefulShutdown()
    trainer = _trainer(tmp_path, shutdown, SignalAt(signum, 1), max_steps=20, limit_val_batches=0)
    with pytest.raises(SystemExit) as exc:
        trainer.fit(_module(compact_dirs), AdditionDataModule(num_train=40, num_heldout=4, batch_size=2))
    assert exc.value.code == 128 + signum
    ckpt = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert shutdown.saved == ckpt and ckpt.is_file() and not list(ckpt.parent.glob("*.partial"))
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 2  # stopped after the step that was running, not mid-step
    resumed = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    resumed.fit(_module(compact_dirs), AdditionDataModule(num_train=40, num_heldout=4, batch_size=2), ckpt_path=ckpt)
    assert resumed.global_step == 4


def test_sigterm_on_predict_keeps_finished_shards_and_exits_nonzero(compact_dirs, tmp_path) -> None:
    out = tmp_path / "traces"
    data = lambda: AdditionDataModule(num_train=20, num_heldout=4, batch_size=4)  # noqa: E731
    trainer = _trainer(tmp_path, TraceWriter(str(out)), GracefulShutdown(), SignalAt(signal.SIGTERM, 1))
    with pytest.raises(SystemExit) as exc:
        trainer.predict(_module(compact_dirs), datamodule=data(), return_predictions=False)
    assert exc.value.code == 128 + signal.SIGTERM
    shards = sorted(out.glob("shard-*.jsonl"))
    assert [s.name for s in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]  # batch 1 finished, then stop
    writer = TraceWriter(str(out))
    _trainer(tmp_path, writer).predict(_module(compact_dirs), datamodule=data(), return_predictions=False)
    ids = [json.loads(line)["id"] for s in sorted(out.glob("shard-*.jsonl")) for line in s.read_text().splitlines()]
    assert sorted(ids) == sorted(f"add-train-{i}" for i in range(20)) and writer.counts["skipped_rows"] == 8


def test_cli_adds_graceful_shutdown(compact_dirs, tmp_path) -> None:
    from rlt_pl.cli import cli_main

    args = ["-c", "configs/teacher/sft_tiny.yaml", f"--model.init_args.model.name_or_path={compact_dirs['teacher']}"]
    cli = cli_main(args, run=False)
    assert sum(isinstance(cb, GracefulShutdown) for cb in cli.trainer.callbacks) == 1
