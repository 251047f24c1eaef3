"""`AtomicModelCheckpoint`: a `ModelCheckpoint` whose files appear under their final name only when complete.

Lightning's `_atomic_save` serialises into memory and writes through an fsspec transaction, but for local paths the
transaction writes to a temporary file in the *system* temp directory (`tempfile.mkstemp()`) and then
`shutil.move`s it. When the checkpoint directory is on another filesystem (a tmpfs `/tmp`, a network or scratch
disk — the usual case on clusters), that move is a copy, and a job killed mid-copy leaves a truncated file under the
final name, which `--ckpt_path last` then picks. It also stages the whole checkpoint in `/tmp` and never fsyncs.

This subclass saves into `<name>.partial` beside the target (same directory, so same filesystem), fsyncs it and
`os.replace`s it onto the final name, which is atomic on POSIX: a reader sees the old checkpoint or the new one,
never a prefix. A killed save leaves only the `.partial` file, which `ckpt_path="last"` ignores (its suffix is not
`.ckpt`) and the next save overwrites. Sharded (directory) checkpoints are swapped in with two renames.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from rlt_pl.paths import check_writable_dir

PARTIAL_SUFFIX = ".partial"


def _fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry table) to disk; best effort where the OS refuses directory fsync."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(partial: str | Path, final: str | Path) -> None:
    """Move a completely written checkpoint (file or sharded directory) onto its final name atomically.

    Args:
        partial: the finished temporary file or directory (same filesystem as `final`).
        final: the checkpoint path readers use.
    """
    partial, final = Path(partial), Path(final)
    if not partial.exists():
        raise FileNotFoundError(f"checkpoint save produced nothing at {partial}")
    if partial.is_file():
        _fsync_path(partial)
        os.replace(partial, final)
    else:
        for f in partial.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        old = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(final.parent)


def remove_partial(path: str | Path) -> None:
    """Delete a leftover `.partial` file or directory, if any.

    Args:
        path: the partial path.
    """
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with atomic publication of every checkpoint it writes (including `last.ckpt`).

    Takes exactly `ModelCheckpoint`'s arguments (`dirpath`, `every_n_train_steps`, `save_last`, `save_top_k`, ...).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning's setup, then the directory checked writable before any step (not at the first save)."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.dirpath is not None and trainer.is_global_zero:
            check_writable_dir(self.dirpath, "AtomicModelCheckpoint.init_args.dirpath")

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL_SUFFIX
        if trainer.is_global_zero:
            remove_partial(partial)
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)  # collective; ends with a barrier
        except BaseException:
            if trainer.is_global_zero:
                remove_partial(partial)
            raise
        if trainer.is_global_zero:
            publish(partial, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint.publish")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
