"""Shared offline fixtures: tiny teacher/student models and tokenizer, built once per session from code."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
torch.set_num_threads(2)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """Paths of a tiny teacher and a tiny student (Qwen2 architecture) sharing one tokenizer."""
    from rlt_pl.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["teacher"])


@pytest.fixture()
def teacher_model(tiny_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32)


@pytest.fixture()
def student_model(tiny_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32)
