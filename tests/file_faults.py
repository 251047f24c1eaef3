"""Fault injection at the file layer: die in the middle of writing a file, after part of its bytes reached the file
system, as a SIGKILL, an OOM kill or a power loss mid-write leaves it.

    python tests/file_faults.py GLOB NTH cli ARGS...           # `python -m rlt_pl ARGS...`
    python tests/file_faults.py GLOB NTH linear DIR STEPS CLS  # fit a 4-weight module, checkpointing with CLS

Every file opened for writing (`open`, `io.open`, hence `os.fdopen` and `Path.write_text`) whose real path matches
GLOB is counted; the first write to the NTH one writes half of its bytes, flushes and fsyncs them, and the process
dies with `os._exit(1)` (no `finally`, no handler runs). `os.rename` raises EXDEV and `shutil`'s sendfile fast path
is off, so `shutil.move` copies through the patched `open`, as it does across file systems (a tmpfs `/tmp`, a scratch
disk); `os.replace` is left alone, it is the atomic step. Used by tests/test_file_faults.py.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import shutil
import sys

KILLED_RC = 1


class _DyingFile:
    """A file object whose first write is cut in half and kills the process."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        os.fsync(self._f.fileno())
        os._exit(KILLED_RC)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def install(pattern: str, nth: int) -> None:
    """Arm the kill on the `nth` (1-based) file opened for writing whose real path matches `pattern`."""
    real_open, seen = io.open, [0]

    def opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+"):
            return f
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.realpath(file)
        if fnmatch.fnmatch(path, pattern):
            seen[0] += 1
            if seen[0] == nth:
                return _DyingFile(f)
        return f

    def no_rename(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link (injected)", str(src))

    builtins.open = io.open = opening
    os.rename = no_rename
    shutil._USE_CP_SENDFILE = False


def fit_linear(dirpath: str, steps: int, callback: str) -> None:
    """Fit a `torch.nn.Linear(4, 1)` on fixed data for `steps` steps, saving `last.ckpt` and `step=N.ckpt` every step
    with `callback` (`atomic`: AtomicModelCheckpoint, `stock`: Lightning's ModelCheckpoint), resuming from
    `last.ckpt` if there is one."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rlt_pl.callbacks.checkpoint import AtomicModelCheckpoint

    class Linear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
            return torch.utils.data.DataLoader(data, batch_size=4)  # one step an epoch: every step resumes exactly

    cls = {"atomic": AtomicModelCheckpoint, "stock": ModelCheckpoint}[callback]
    cb = cls(dirpath=dirpath, filename="{step}", every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    last = os.path.join(dirpath, "last.ckpt")
    L.seed_everything(0)
    trainer.fit(Linear(), ckpt_path=last if os.path.exists(last) else None)


def main(argv: list[str]) -> None:
    pattern, nth, mode, *rest = argv
    if int(nth) > 0:
        install(pattern, int(nth))
    if mode == "cli":
        from rlt_pl.cli import main as cli

        cli(rest)
    elif mode == "linear":
        fit_linear(rest[0], int(rest[1]), rest[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}: cli or linear")


if __name__ == "__main__":
    main(sys.argv[1:])
