"""Output paths checked before any work: a run that would fail to write its result fails at construction instead."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise ValueError naming `flag` unless `path` is (or can be created as) a directory this process can write.

    Nothing is created: the probe file goes into the nearest existing ancestor and is removed at once.

    Args:
        path: the output directory.
        flag: the config flag that set it (for the message).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}={path} is a file, not a directory")
    base = p.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{flag}={path} cannot be created: {base} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".rlt_pl-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{flag}={path} is not writable: cannot create a file in {base} ({err.strerror})") from err
