"""Command line: `python -m rlt_pl {fit,validate,test,predict} -c CONFIG.yaml [-c MORE.yaml] [--flag value]`.

A thin `LightningCLI` in subclass mode: the model and the data are chosen by `class_path` in YAML, every
`__init__` signature is the schema (`--print_config` shows it documented), TensorBoard is the default logger, and
the resolved `config.yaml` is saved into the run's own folder so the run can be reproduced: the logger's directory,
or with the logger off the prediction writer's `output_dir` (else `trainer.default_root_dir` when set; nothing is
written to the working directory). The progress bar counts optimizer steps against `trainer.max_steps`;
`predict` needs a prediction writer (`TraceWriter`), and `--ckpt_path last` with no last checkpoint is an error.

Errors raised while the config is parsed and its classes are built (a missing checkpoint path, a bad value) end the
command with one line on stderr naming the flag, exit status 1; `--debug` or `RLT_PL_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from rlt_pl.callbacks.progress import use_step_progress_bar
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


def run_dir(trainer: Trainer) -> str | None:
    """The run's own folder: the logger's directory, else a prediction writer's `output_dir`, else an explicitly
    set `trainer.default_root_dir`; None when the run has none (then nothing is written)."""
    if trainer.loggers:
        return trainer.log_dir
    writers = [cb for cb in trainer.callbacks if isinstance(cb, BasePredictionWriter) and hasattr(cb, "output_dir")]
    if writers:
        return str(writers[0].output_dir)
    if os.path.abspath(trainer.default_root_dir) != os.getcwd():
        return trainer.default_root_dir
    return None


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved `config.yaml` into `run_dir(trainer)`, never into the working directory."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = trainer.strategy.broadcast(run_dir(trainer))
        if folder is None:
            rank_zero_info("config.yaml not saved: the run has no logger, prediction writer or default_root_dir")
            return
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def check_ckpt_path_last(trainer: Trainer, ckpt_path: str | None) -> None:
    """`--ckpt_path last` must find a last checkpoint: Lightning would otherwise start from scratch with a warning.

    Raises:
        ValueError: no ModelCheckpoint with a fixed `dirpath`, or no `last*.ckpt` in any of them.
    """
    if ckpt_path != "last":
        return
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    dirs = [cb.dirpath for cb in callbacks if cb.dirpath is not None]
    if not dirs:
        raise ValueError(
            "--ckpt_path last: no ModelCheckpoint callback with a `dirpath` (checkpoints under a new logger version "
            "are never found again); add one in trainer.callbacks or pass --ckpt_path PATH"
        )
    pattern = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
    if not any(p for d in dirs if os.path.isdir(d) for p in Path(d).glob(pattern)):
        raise ValueError(
            f"--ckpt_path last: no last checkpoint in {', '.join(map(str, dirs))}; run without --ckpt_path to start "
            "from scratch, or pass --ckpt_path PATH"
        )


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

    def instantiate_trainer(self, **kwargs):
        """The configured trainer, plus `GracefulShutdown` (SIGTERM/SIGINT leave a resumable state) unless set."""
        from rlt_pl.callbacks.shutdown import GracefulShutdown, find_graceful_shutdown

        trainer = super().instantiate_trainer(**kwargs)
        use_step_progress_bar(trainer)
        if find_graceful_shutdown(trainer.callbacks) is None:
            trainer.callbacks.append(GracefulShutdown())
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            exc.rlt_pl_construction = True  # type: ignore[attr-defined]
            raise

    def _subcommand_checks(self, subcommand: str) -> None:
        try:
            check_ckpt_path_last(self.trainer, self.config[subcommand].get("ckpt_path"))
            if subcommand == "predict" and not any(
                isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks
            ):
                raise ValueError(
                    "predict: no prediction writer in trainer.callbacks, the predictions would be discarded; add "
                    "`--trainer.callbacks+=rlt_pl.callbacks.trace_writer.TraceWriter "
                    "--trainer.callbacks.output_dir=DIR`"
                )
        except ValueError as exc:
            exc.rlt_pl_construction = True  # type: ignore[attr-defined]  # a config error: one line
            raise

    def before_fit(self) -> None:
        self._subcommand_checks("fit")

    def before_validate(self) -> None:
        self._subcommand_checks("validate")

    def before_test(self) -> None:
        self._subcommand_checks("test")

    def before_predict(self) -> None:
        self._subcommand_checks("predict")


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
        save_config_callback=RunConfigCallback,
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
