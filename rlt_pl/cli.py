"""Command line: `python -m rlt_pl {fit,validate,test,predict} -c CONFIG.yaml [-c MORE.yaml] [--flag value]`.

A thin `LightningCLI` in subclass mode: the model and the data are chosen by `class_path` in YAML, every
`__init__` signature is the schema (`--print_config` shows it documented), TensorBoard is the default logger, and
the resolved `config.yaml` is saved into the run's log directory so the run can be reproduced.

Errors raised while the config is parsed and its classes are built (a missing checkpoint path, a bad value) end the
command with one line on stderr naming the flag, exit status 1; `--debug` or `RLT_PL_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from rlt_pl.formats import RLTFormat
from rlt_pl.generation import GenerationEngine

# Formats and engines are chosen by class_path (StratosFormat, CompactFormat, ...).
set_parsing_settings(subclasses_enabled=[RLTFormat, GenerationEngine])

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "rlt_pl"},
    },
    "max_epochs": -1,
}


DEBUG_ENV = "RLT_PL_DEBUG"


class RLTCLI(LightningCLI):
    """LightningCLI with rlt_pl's defaults."""

    def parse_arguments(self, *args, **kwargs) -> None:
        try:
            super().parse_arguments(*args, **kwargs)
        except Exception as exc:
            exc.rlt_pl_construction = True  # type: ignore[attr-defined]
            raise

    def before_instantiate_classes(self) -> None:
        torch.set_float32_matmul_precision("high")  # tf32 on Ampere+, as the paper runs

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            exc.rlt_pl_construction = True  # type: ignore[attr-defined]
            raise


def _drop_tips(record: logging.LogRecord) -> bool:
    """Lightning's advertising tips (litlogger, litmodels) say nothing about the run."""
    return not str(record.msg).startswith("💡 Tip:")


def error_line(exc: BaseException) -> str:
    """One line for a construction error: the class's own message, whitespace collapsed. jsonargparse wraps it in
    "Does not validate against any of the Union subtypes ... Errors: - <message> ..." text; newer versions chain the
    original as the cause (taken when present), older ones keep only the text (its first listed error is taken)."""
    chain = [exc]
    while chain[-1].__cause__ is not None or (chain[-1].__context__ is not None and not chain[-1].__suppress_context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    own = [e for e in chain if not type(e).__module__.startswith("jsonargparse") and "Errors:" not in str(e)]
    text = str(own[-1]) if own else str(chain[-1])
    listed = re.search(r"Errors:\s*\n\s*- (.+)", text)
    message = re.sub(r"\s+", " ", listed.group(1) if listed else text).strip() or type(chain[-1]).__name__
    return f"rlt_pl: error: {message} (traceback: --debug or {DEBUG_ENV}=1)"


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> RLTCLI:
    """Build (and by default run) the CLI; `args` as a list makes it callable from tests."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_tips not in rank_zero_log.filters:
        rank_zero_log.addFilter(_drop_tips)
    return RLTCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
        auto_configure_optimizers=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The `python -m rlt_pl` / `rlt_pl` entry point: `cli_main` with one-line construction errors."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv is None:  # from the command line: LightningCLI reads sys.argv itself
        debug = debug or "--debug" in sys.argv
        sys.argv = [a for a in sys.argv if a != "--debug"]
    else:
        debug = debug or "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
    try:
        cli_main(argv)
    except Exception as exc:
        if debug or not getattr(exc, "rlt_pl_construction", False):
            raise
        print(error_line(exc), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
