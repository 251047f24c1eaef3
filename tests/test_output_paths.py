"""Output directories are checked at construction, naming the flag, before any training or generation."""

from __future__ import annotations

import pytest

from rlt_pl.callbacks.trace_writer import TraceWriter
from rlt_pl.paths import check_writable_dir


@pytest.mark.parametrize("kind", ["file", "under_file", "unwritable"])
def test_bad_output_dirs_are_refused_naming_the_flag(tmp_path, kind):
    afile = tmp_path / "afile"
    afile.write_text("x")
    path = {"file": afile, "under_file": afile / "sub", "unwritable": "/proc/rlt_pl_out/sub"}[kind]
    with pytest.raises(ValueError, match=r"model\.init_args\.export_dir="):
        check_writable_dir(path, "model.init_args.export_dir")
    with pytest.raises(ValueError, match=r"TraceWriter\.init_args\.output_dir="):
        TraceWriter(str(path))


def test_writable_output_dir_is_accepted_and_not_created(tmp_path):
    check_writable_dir(tmp_path / "new" / "deeper", "model.init_args.export_dir")
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())
