"""`GracefulShutdown`: SIGTERM / SIGINT end `fit` and `predict` at the next batch boundary, leave a resumable state
and exit non-zero.

Lightning alone turns SIGTERM during `fit` into `SIGTERMException` (a `SystemExit` with code 0) and saves nothing
unless a checkpoint callback happens to fire; `predict` ignores SIGTERM; SIGINT raises `KeyboardInterrupt` wherever
the process is, possibly between an optimizer step and its bookkeeping. This callback makes both signals a request
to stop: training stops after the current optimizer step (a GRPO step never ends mid-buffer) and writes
`<dirpath>/interrupted.ckpt` atomically (resume with `--ckpt_path`); prediction stops before the next batch, so
every finished trace shard is on disk and a rerun resumes from them. The process exits with 128 + the signal
number. A second SIGINT interrupts at once. `python -m rlt_pl` adds this callback unless one is configured.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlt_pl.callbacks.checkpoint import publish, remove_partial
from rlt_pl.paths import check_writable_dir


class GracefulShutdown(Callback):
    """Stop on SIGTERM/SIGINT with a resumable state and a non-zero exit code.

    Args:
        dirpath: where `interrupted.ckpt` goes (None: the checkpoint callback's directory, else
            `<default_root_dir>/checkpoints`).
        filename: checkpoint file name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted.ckpt") -> None:
        if dirpath is not None:
            check_writable_dir(dirpath, "GracefulShutdown.init_args.dirpath")  # not when the signal comes
        self.dirpath = dirpath
        self.filename = filename
        self.signum: int | None = None
        self.saved: Path | None = None
        self._previous_sigint = None

    # ---------------------------------------------------------------- signal plumbing
    def _install(self, trainer: Trainer) -> None:
        self.signum, self.saved = None, None
        if signal.getsignal(signal.SIGINT) == self._on_sigint:
            return
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous_sigint = None
        self._trainer = trainer

    def _restore(self) -> None:
        if self._previous_sigint is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def _on_sigint(self, signum, frame) -> None:
        if self.signum is not None:  # the second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        self._trainer._signal_connector.received_sigterm = True  # Lightning's loops stop at the next batch boundary
        rank_zero_info("SIGINT: stopping after the current step (press Ctrl-C again to abort at once)")

    def _requested(self, trainer: Trainer) -> int | None:
        if self.signum is None and trainer.received_sigterm:
            self.signum = signal.SIGTERM
        return self.signum

    # ---------------------------------------------------------------- hooks
    # installed at fit/predict start: after Lightning registers (and saves, to restore later) its own handlers
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def checkpoint_path(self, trainer: Trainer) -> Path:
        cb = trainer.checkpoint_callback
        base = self.dirpath or (cb.dirpath if cb is not None and cb.dirpath else None)
        base = base or os.path.join(trainer.default_root_dir, "checkpoints")
        return Path(base) / self.filename

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()  # Lightning does not call `teardown` of callbacks after an exception
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        signum = self._requested(trainer) or signal.SIGTERM
        path = self.checkpoint_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        remove_partial(partial)
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            publish(partial, path)
        self.saved = path
        rank_zero_info(f"{signal.Signals(signum).name}: saved {path}; resume with --ckpt_path {path}")
        exception.code = 128 + int(signum)  # SIGTERMException is a SystemExit: make the exit status say so

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        signum = self._requested(trainer)
        if signum is not None:  # every earlier batch's shard is written (the writer runs at batch end)
            rank_zero_info(f"{signal.Signals(signum).name}: stopped before predict batch {batch_idx}; rerun resumes")
            self._restore()
            raise SystemExit(128 + int(signum))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()


def find_graceful_shutdown(callbacks) -> GracefulShutdown | None:
    found = [cb for cb in callbacks if isinstance(cb, GracefulShutdown)]
    return found[0] if found else None
