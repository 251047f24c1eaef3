"""DataModules: one file per dataset/benchmark, all yielding the common row schema of ``base.py``."""

from rlt_pl.datamodules.aime24 import AIME24DataModule
from rlt_pl.datamodules.base import RowDataModule, RowError
from rlt_pl.datamodules.bespoke import BespokeStratosDataModule
from rlt_pl.datamodules.countdown import CountdownDataModule
from rlt_pl.datamodules.gpqa import GPQADiamondDataModule
from rlt_pl.datamodules.math500 import MATH500DataModule
from rlt_pl.datamodules.multi import MultiBenchmarkDataModule

__all__ = [
    "AIME24DataModule",
    "BespokeStratosDataModule",
    "CountdownDataModule",
    "GPQADiamondDataModule",
    "MATH500DataModule",
    "MultiBenchmarkDataModule",
    "RowDataModule",
    "RowError",
]
