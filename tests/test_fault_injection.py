"""Faults: a checkpoint save that dies midway never leaves a partial file under the final name, and a training run
SIGKILLed at a random point after its first checkpoint resumes with `--ckpt_path` to the uninterrupted run's
weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from rlt_pl.callbacks.checkpoint import PARTIAL_SUFFIX, AtomicModelCheckpoint
from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets

REPO = Path(__file__).resolve().parents[1]


class _Linear(L.LightningModule):
    """The smallest trainable module: checkpoints of a few KB in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _fit_linear(dirpath: Path, steps: int) -> tuple[L.Trainer, AtomicModelCheckpoint]:
    cb = AtomicModelCheckpoint(dirpath=dirpath, filename="step{step}", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Linear())
    return trainer, cb


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save dies after writing part of the checkpoint: the previous `last.ckpt` is intact and loadable, and no
    file with the final name or a leftover partial exists for the failed one."""
    trainer, cb = _fit_linear(tmp_path, 2)
    last = tmp_path / "last.ckpt"
    before = last.read_bytes()
    assert torch.load(last, weights_only=True)["global_step"] == 2

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if hasattr(f, "truncate"):  # keep half of what was written, as a kill mid-write would
            f.truncate(max(1, f.tell() // 2))
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="injected"):
        cb._save_checkpoint(trainer, str(last))
    with pytest.raises(OSError, match="injected"):
        cb._save_checkpoint(trainer, str(tmp_path / "new.ckpt"))
    monkeypatch.undo()

    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not (tmp_path / "new.ckpt").exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))


def test_leftover_partial_is_ignored_by_last_and_overwritten(tmp_path):
    """A kill during a save leaves `<name>.partial`: `ckpt_path="last"` does not pick it, the next save replaces it."""
    _fit_linear(tmp_path, 2)
    garbage = tmp_path / f"last.ckpt{PARTIAL_SUFFIX}"
    garbage.write_bytes(b"\x00truncated")
    os.utime(garbage, (time.time() + 60, time.time() + 60))  # newest file in the directory
    cb = AtomicModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Linear(), ckpt_path="last")
    assert trainer.global_step == 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not garbage.exists()


# ------------------------------------------------------------------------------------------------- SIGKILL
CLI_STEPS = 12


def _cli(dirpath: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlt_pl",
        "fit",
        "-c",
        "configs/teacher/rlt_tiny.yaml",
        f"--trainer.max_steps={CLI_STEPS}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=rlt_pl.callbacks.checkpoint.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={dirpath}",
        "--trainer.callbacks.filename={step}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=-1",
        # a run that started afresh overwrites the same names: only which steps it wrote tells it from a resumed one
        "--trainer.callbacks.enable_version_counter=false",
        *extra,
    ]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    """`python -m rlt_pl fit` with a checkpoint every step, SIGKILLed at a random moment after its first checkpoint;
    `--ckpt_path ckpts/last.ckpt` resumes it: the resumed process runs only the steps after the kill (it writes no
    `step=j.ckpt` for j <= k again, which a run from scratch would) and every step's weights after it equal the
    uninterrupted run's. Every checkpoint left loads with weights_only=True."""
    build_compact_assets(tmp_path / "runs" / "tiny", CompactFormat().tag_tokens(), seed=0)
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    straight = subprocess.run(_cli("straight"), **run)
    assert straight.returncode == 0, straight.stderr[-3000:]

    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_cli("ckpts"), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    last = tmp_path / "ckpts" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(random.Random().uniform(0.0, 1.0))  # a random point of the run: mid-step, mid-save or between
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 1 <= killed_at < CLI_STEPS
    for ckpt in (tmp_path / "ckpts").glob("step=*.ckpt"):  # what a resumed run must not write again
        ckpt.unlink()

    resumed = subprocess.run(_cli("ckpts", "--ckpt_path", "ckpts/last.ckpt"), **run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == CLI_STEPS
    assert not any(k.startswith("ref_model.") for k in final["state_dict"])
    written = sorted(int(p.stem.split("=")[1]) for p in (tmp_path / "ckpts").glob("step=*.ckpt"))
    assert written == list(range(killed_at + 1, CLI_STEPS + 1)), f"killed at {killed_at}, resumed run wrote {written}"
    first = _weights(tmp_path / "straight" / "step=1.ckpt")
    for step in written:
        want, got = (
            _weights(tmp_path / "straight" / f"step={step}.ckpt"),
            _weights(tmp_path / "ckpts" / f"step={step}.ckpt"),
        )
        assert any(not torch.equal(first[k], v) for k, v in want.items())  # not vacuous: training moves the weights
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k, s=step: f"step {s} {k}: {m}")
    for ckpt in (tmp_path / "ckpts").glob("*.ckpt"):
        torch.load(ckpt, weights_only=True)  # no truncated checkpoint under a final name
    assert not list((tmp_path / "ckpts").glob(f"*{PARTIAL_SUFFIX}"))
