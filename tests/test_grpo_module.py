"""GRPOModule through `lightning.Trainer`: it learns a verifiable reward; construction errors name the flag."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import GenerationOutput, SamplingConfig
from rlt_pl.grpo import PolicyLossConfig
from rlt_pl.models import LoraConfig, ModelConfig
from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult, TaskReward
from rlt_pl.tasks.addition import AdditionTask
from rlt_pl.tiny import build_compact_assets


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    """Tiny compact-format (character-level) teacher/student directories."""
    return build_compact_assets(tmp_path_factory.mktemp("compact"), CompactFormat().tag_tokens(), seed=0)


class SevensReward(Reward):
    """Fraction of the completion's characters that are "7" (a reward a random tiny LM can learn fast)."""

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        frac = [sum(c == "7" for c in t) / max(len(t), 1) for t in gen.texts]
        return RewardResult(torch.tensor(frac), {"sevens": torch.tensor(frac)})


class DigitsReward(Reward):
    """Number of digits in the completion (varies from sample to sample of a random tiny LM: non-zero advantages)."""

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        return RewardResult(torch.tensor([float(sum(c.isdigit() for c in t)) for t in gen.texts]))


class MetricsRecorder(L.Callback):
    """Copy `trainer.callback_metrics` after every training batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _trainer(steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        log_every_n_steps=1,  # the logged-only entropy is measured on logging steps
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def test_grpo_learns_verifiable_reward(compact_dirs):
    """40 GRPO steps (G = 8, 2 prompts) raise the "7" fraction from ~0 to > 0.3 (β = 0 keeps it fast; the KL
    reference path is exercised in test_teacher_rl.py)."""
    L.seed_everything(0)
    module = GRPOModule(
        ModelConfig(str(compact_dirs["teacher"]), dtype="float32"),
        reward=SevensReward(),
        format=CompactFormat(),
        num_generations=8,
        micro_batch_size=16,
        lr=3e-3,
        loss=PolicyLossConfig(beta=0.0),
        reference="none",
        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0),
        sample_table_every_n_steps=0,
    )
    rec = MetricsRecorder()
    _trainer(40, [rec]).fit(module, AdditionDataModule(num_train=64, num_heldout=8, batch_size=2))
    rewards = [s["train/reward"] for s in rec.steps]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (first, last, rewards)
    final = rec.steps[-1]
    for key in ("train/policy_loss", "train/entropy", "train/grad_norm", "train/sevens", "train/reward_std"):
        assert key in final and torch.isfinite(torch.tensor(final[key])), key
    assert "train/skipped_steps" not in final
    assert module.ref_model is None


def test_task_reward_grades_answers():
    """TaskReward: 1 for a correct `<A>…</A>`, plus the format bonus whenever an answer can be extracted."""
    reward = TaskReward(AdditionTask(), format_reward=0.5)
    rows = [{"question": "1+2", "answer": "3"}] * 3
    texts = ["<T>x</T><A>3</A>", "<A>4</A>", "no answer"]
    n = len(texts)
    gen = GenerationOutput(
        torch.zeros(n, 1, dtype=torch.long),
        torch.ones(n, 1, dtype=torch.long),
        torch.zeros(n, 1, dtype=torch.long),
        torch.ones(n, 1, dtype=torch.long),
        texts,
        torch.ones(n, dtype=torch.bool),
        ["1+2"] * n,
    )
    out = reward(None, rows, gen, None)
    assert out.rewards.tolist() == [1.5, 0.5, 0.0]
    assert out.metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]


def test_missing_reward_is_a_clear_error(compact_dirs):
    """A GRPOModule without a reward fails at the first rollout, naming the flag."""
    module = GRPOModule(ModelConfig(str(compact_dirs["teacher"]), dtype="float32"), format=CompactFormat())
    with pytest.raises(ValueError, match="model.init_args.reward"):
        module.compute_reward([], None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 0}, "num_generations"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"num_iterations": 2}, "clip_eps_low"),
        ({"reference": "bogus"}, "reference"),
        ({"reference": "adapter"}, "model.lora"),
        ({"reference": "none"}, "beta"),
        ({"advantage_scale": "minmax"}, "advantage_scale"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_arguments_fail_at_construction(compact_dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule(ModelConfig(str(compact_dirs["teacher"]), dtype="float32"), reward=SevensReward(), **kwargs)


def test_reference_modes_build_the_right_models(compact_dirs):
    """`copy` holds a frozen second model; `adapter` (LoRA) and β = 0 hold none; nothing is loaded in __init__."""
    path = str(compact_dirs["teacher"])
    copy = GRPOModule(ModelConfig(path, dtype="float32"), reward=SevensReward())
    assert copy.model is None and copy.ref_model is None
    copy.configure_model()
    assert copy.ref_model is not None
    assert all(torch.equal(a, b) for a, b in zip(copy.model.parameters(), copy.ref_model.parameters()))
    assert not any(k.startswith("ref_model.") for k in copy.state_dict())  # frozen reference kept out of ckpts

    lora = ModelConfig(path, dtype="float32", lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    adapter = GRPOModule(lora, reward=SevensReward(), reference="adapter")
    adapter.configure_model()
    assert adapter.ref_model is None
    no_kl = GRPOModule(ModelConfig(path, dtype="float32"), reward=SevensReward(), loss=PolicyLossConfig(beta=0.0))
    no_kl.configure_model()
    assert no_kl.ref_model is None


def test_num_iterations_takes_mu_optimizer_steps_and_clips(compact_dirs):
    """μ = 2 (TRL semantics): two optimizer updates per generation batch; the second pass sees a moved policy, so
    the ratio against the rollout's log-probs leaves 1 and the PPO clip fires."""
    L.seed_everything(0)
    module = GRPOModule(
        ModelConfig(str(compact_dirs["teacher"]), dtype="float32"),
        reward=DigitsReward(),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=8,
        num_iterations=2,
        lr=3e-2,
        loss=PolicyLossConfig(beta=0.0, clip_eps_low=0.2),
        reference="none",
        sampling=SamplingConfig(max_new_tokens=8, temperature=1.0),
        sample_table_every_n_steps=0,
    )
    rec = MetricsRecorder()
    trainer = _trainer(4, [rec])
    trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    assert len(rec.steps) == 2 and trainer.global_step == 4  # 2 generation batches x μ = 2 updates
    learning = [s for s in rec.steps if s["train/advantage_abs_mean"] > 0]  # a zero-variance batch has no gradient
    assert learning and all(s["train/clip_fraction"] > 0 for s in learning), [
        s["train/clip_fraction"] for s in learning
    ]


def test_over_long_prompts_are_counted_and_skipped(compact_dirs):
    """A prompt over sampling.max_prompt_tokens is skipped and counted; the rest of the batch still trains."""
    L.seed_everything(0)
    module = GRPOModule(
        ModelConfig(str(compact_dirs["teacher"]), dtype="float32"),
        reward=DigitsReward(),
        format=CompactFormat(),
        num_generations=2,
        micro_batch_size=8,
        lr=1e-3,
        loss=PolicyLossConfig(beta=0.0),
        reference="none",
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, max_prompt_tokens=12),
        sample_table_every_n_steps=0,
    )
    module.setup("fit")
    module.configure_model()
    rows = [{"question": "1+2", "answer": "3"}, {"question": "1+2" * 20, "answer": "3"}]
    buf = module.rollout(rows, 2)
    assert module.skipped_long_prompts == 1 and buf["rows"] == [rows[0], rows[0]]
    assert module.rollout(rows[1:], 2) is None and module.skipped_long_prompts == 2
