"""Command line: `python -m rlt_pl {fit,validate,test,predict} -c CONFIG.yaml [-c MORE.yaml] [--flag value]`.

A thin `LightningCLI` in subclass mode: the model and the data are chosen by `class_path` in YAML, every
`__init__` signature is the schema (`--print_config` shows it documented), TensorBoard is the default logger, and
the resolved `config.yaml` is saved into the run's log directory so the run can be reproduced.
"""

from __future__ import annotations

import logging
import os
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


class RLTCLI(LightningCLI):
    """LightningCLI with rlt_pl's defaults."""

    def before_instantiate_classes(self) -> None:
        torch.set_float32_matmul_precision("high")  # tf32 on Ampere+, as the paper runs

    def instantiate_trainer(self, **kwargs):
        """The configured trainer, plus `GracefulShutdown` (SIGTERM/SIGINT leave a resumable state) unless set."""
        from rlt_pl.callbacks.shutdown import GracefulShutdown, find_graceful_shutdown

        trainer = super().instantiate_trainer(**kwargs)
        if find_graceful_shutdown(trainer.callbacks) is None:
            trainer.callbacks.append(GracefulShutdown())
        return trainer


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> RLTCLI:
    """Build (and by default run) the CLI; `args` as a list makes it callable from tests."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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


if __name__ == "__main__":
    cli_main()
