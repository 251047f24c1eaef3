"""Precision: the shipped 7B settings keep fp32 master weights (bf16 compute), so lr 1e-6 updates are not lost;
training bf16 parameters is refused before the first step, naming the flags."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.grpo import PolicyLossConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult
from rlt_pl.tiny import build_compact_assets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("compact_prec"), CompactFormat().tag_tokens(), seed=0)


class DigitsReward(Reward):
    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        return RewardResult(torch.tensor([float(sum(c.isdigit() for c in t)) for t in gen.texts]))


def _shipped(path: str) -> tuple[str, str]:
    cfg = yaml.safe_load((CONFIGS / path).read_text())
    return cfg["trainer"]["precision"], cfg["model"]["init_args"]["model"]["dtype"]


def _grpo(dirs, dtype: str, precision: str, steps: int = 3) -> tuple[GRPOModule, dict]:
    L.seed_everything(0)
    module = GRPOModule(
        ModelConfig(str(dirs["teacher"]), dtype=dtype),
        reward=DigitsReward(),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=8,
        lr=1e-6,
        loss=PolicyLossConfig(beta=0.0),
        reference="none",
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.7),
        sample_table_every_n_steps=0,
    )
    module.configure_model()
    before = {k: v.detach().float().clone() for k, v in module.model.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    return module, before


@pytest.mark.parametrize("config", ["teacher/rlt_qwen7b.yaml", "experiment/cold_start_countdown_qwen7b.yaml"])
def test_shipped_rl_precision_keeps_every_update(compact_dirs, config):
    """3 GRPO steps at lr 1e-6 under the shipped precision settings change >= 99% of the weights."""
    precision, dtype = _shipped(config)
    assert (precision, dtype) == ("bf16-mixed", "float32")
    module, before = _grpo(compact_dirs, dtype, precision)
    changed = total = 0
    for name, p in module.model.named_parameters():
        changed += int((p.detach().float() != before[name]).sum())
        total += p.numel()
    assert changed / total >= 0.99, changed / total


@pytest.mark.parametrize(("dtype", "precision"), [("bfloat16", "bf16-mixed"), ("float32", "bf16-true")])
def test_training_bf16_parameters_is_refused(compact_dirs, dtype, precision):
    with pytest.raises(ValueError, match="model.init_args.model.dtype.*trainer.precision"):
        _grpo(compact_dirs, dtype, precision, steps=1)


@pytest.mark.parametrize("config", ["teacher/sft_qwen7b.yaml", "student/distill_qwen7b.yaml"])
def test_shipped_sft_precision_is_fp32_master_weights(config):
    assert _shipped(config) == ("bf16-mixed", "float32")
