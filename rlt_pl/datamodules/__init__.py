"""DataModules: one file per dataset/benchmark, all yielding the common row schema of ``base.py``."""

from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.datamodules.aime24 import AIME24DataModule
from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.bespoke import BespokeStratosDataModule
from rlt_pl.datamodules.cold_start import ColdStartDataModule
from rlt_pl.datamodules.countdown import CountdownDataModule
from rlt_pl.datamodules.gpqa import GPQADiamondDataModule
from rlt_pl.datamodules.loading import RowError
from rlt_pl.datamodules.math500 import MATH500DataModule
from rlt_pl.datamodules.multi import MultiBenchmarkDataModule
from rlt_pl.datamodules.traces import TracesDataModule

__all__ = [
    "AdditionDataModule",
    "AIME24DataModule",
    "BespokeStratosDataModule",
    "ColdStartDataModule",
    "CountdownDataModule",
    "GPQADiamondDataModule",
    "MATH500DataModule",
    "MultiBenchmarkDataModule",
    "RowDataModule",
    "RowError",
    "TracesDataModule",
]
