"""The names the README's layout lists import from their packages, in a fresh interpreter and in either order
(`rlt_pl.modules` and `rlt_pl.callbacks` import each other's submodules), and short class paths work in YAML."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("modules", "callbacks", "datamodules")


def _readme_names(package: str) -> list[str]:
    """Class names on the README layout line(s) of `rlt_pl/<package>/`."""
    lines = (REPO / "README.md").read_text().splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith(f"rlt_pl/{package}/"))
    line = lines[i]
    for more in lines[i + 1 :]:  # continuation lines are indented
        if not more.startswith(" " * 8):
            break
        line += " " + more
    return re.findall(r"\b[A-Z][A-Za-z0-9]*(?:Module|Callback|Writer|Checkpoint)\b", line)


def test_readme_lists_the_public_names():
    assert {"TeacherRLModule", "StudentDistillModule", "GRPOModule", "TeacherSFTModule"} <= set(
        _readme_names("modules")
    )
    assert {"StudentRewardCallback", "TraceWriter"} <= set(_readme_names("callbacks"))
    assert len(_readme_names("datamodules")) == 9


@pytest.mark.parametrize("first", ["modules", "callbacks"])
def test_every_listed_name_imports_in_a_fresh_interpreter(first):
    order = [first] + [p for p in PACKAGES if p != first]
    code = "\n".join(f"from rlt_pl.{p} import {', '.join(_readme_names(p))}" for p in order)
    code += "\nimport sys\nassert 'bitsandbytes' not in sys.modules and 'peft' not in sys.modules, 'eager import'"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_short_class_paths_resolve_in_yaml(tmp_path, monkeypatch):
    """`rlt_pl.modules.TeacherRLModule` / `rlt_pl.datamodules.AdditionDataModule` / `rlt_pl.callbacks.*` in YAML."""
    from rlt_pl.cli import cli_main
    from rlt_pl.formats import CompactFormat
    from rlt_pl.modules.teacher_rl import TeacherRLModule
    from rlt_pl.tiny import build_compact_assets

    build_compact_assets(tmp_path / "tiny", CompactFormat().tag_tokens(), seed=0)
    config = tmp_path / "short.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  logger: false
  callbacks:
    - class_path: rlt_pl.callbacks.StudentRewardCallback
      init_args: {{student: {{name_or_path: {tmp_path}/tiny/student}}}}
model:
  class_path: rlt_pl.modules.TeacherRLModule
  init_args:
    model: {{name_or_path: {tmp_path}/tiny/teacher}}
    format: {{class_path: rlt_pl.formats.CompactFormat}}
data:
  class_path: rlt_pl.datamodules.AdditionDataModule
  init_args: {{num_train: 8, num_heldout: 4, batch_size: 2}}
"""
    )
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["-c", str(config)], run=False)
    assert isinstance(cli.model, TeacherRLModule)
    assert type(cli.datamodule).__name__ == "AdditionDataModule"
    assert any(type(c).__name__ == "StudentRewardCallback" for c in cli.trainer.callbacks)


def test_formats_reads_its_prompts_without_the_tiny_builder():
    """One-way: `rlt_pl.formats` reads its package-data prompts itself; `rlt_pl.tiny` depends on it, not back."""
    code = (
        "import sys\nfrom rlt_pl.formats import StratosFormat, read_prompt\n"
        "assert 'rlt_pl.tiny' not in sys.modules, 'formats imported tiny'\n"
        "assert read_prompt('teacher_stratos').startswith('Your role as an assistant')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
