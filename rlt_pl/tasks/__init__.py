"""Benchmark tasks: how a question is shown to the model and how a response is graded (no Lightning here)."""

from rlt_pl.tasks.base import Task, last_boxed
from rlt_pl.tasks.countdown import CountdownTask, check_expression, generate_countdown
from rlt_pl.tasks.gpqa import GPQATask
from rlt_pl.tasks.math import MathTask

__all__ = [
    "CountdownTask",
    "GPQATask",
    "MathTask",
    "Task",
    "check_expression",
    "generate_countdown",
    "last_boxed",
]
