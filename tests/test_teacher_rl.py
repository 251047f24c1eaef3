"""TeacherRLModule + StudentRewardCallback on tiny compact-format models: what trains, what stays frozen, what is
logged, and that the RLT reward (with its match penalty) can be climbed."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from rlt_pl.callbacks import StudentRewardCallback
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.sft import StudentDistillModule, TeacherSFTModule
from rlt_pl.modules.teacher_rl import TeacherRLModule
from rlt_pl.rewards import RewardConfig
from rlt_pl.tiny import build_compact_assets


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    """Tiny compact-format teacher/student directories (different seeds: the reference is a separate copy)."""
    return build_compact_assets(tmp_path_factory.mktemp("compact_rl"), CompactFormat().tag_tokens(), seed=0)


class MetricsRecorder(L.Callback):
    """Copy `trainer.callback_metrics` after every training batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _setup(dirs: dict, lr: float, max_new_tokens: int, reward: RewardConfig | None = None):
    module = TeacherRLModule(
        ModelConfig(str(dirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=16,
        lr=lr,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7),
        sample_table_every_n_steps=0,
    )
    student = StudentRewardCallback(ModelConfig(str(dirs["student"]), dtype="float32"), reward=reward)
    return module, student


def _fit(module, callbacks: list, steps: int, data: AdditionDataModule | None = None) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        log_every_n_steps=1,  # GRPO step metrics are logged on logging steps
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, data or AdditionDataModule(num_train=64, num_heldout=8, batch_size=4))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_policy_trains_while_reference_and_student_stay_frozen(compact_dirs):
    """Three steps with the paper's reward: the policy moves; reference and reward student are bit-identical;
    the loss is finite and the reward components are logged."""
    L.seed_everything(0)
    module, student = _setup(compact_dirs, lr=1e-3, max_new_tokens=16)
    module.configure_model()
    rec = MetricsRecorder()
    policy0, ref0 = _snapshot(module.model), _snapshot(module.ref_model)
    student.setup(None, module, "fit")
    student0 = _snapshot(student.student)
    _fit(module, [student, rec], steps=3)

    assert module.ref_model is not student.student  # teacher and student differ: the reference is its own copy
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, policy0[k])]
    assert changed, "no policy parameter changed"
    for name, before, model in (("reference", ref0, module.ref_model), ("student", student0, student.student)):
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), f"{name} weights changed"
        assert not any(p.requires_grad for p in model.parameters()), f"{name} has trainable parameters"
        assert not model.training, f"{name} is in train mode"

    assert len(rec.steps) == 3
    for step in rec.steps:
        for key in ("train/reward", "train/rss", "train/rkl", "train/match_rate", "train/policy_loss", "train/kl"):
            assert key in step and math.isfinite(step[key]), (key, step)
        matched = step["train/match_rate"] * 16  # 4 prompts x 4 samples: a count of closed completions
        assert matched == pytest.approx(round(matched), abs=1e-4), step["train/match_rate"]
        assert "train/skipped_steps" not in step
    # the last step's logged reward terms are the means of that step's scored batch
    result, questions = module.last_score
    assert len(questions) == 16
    last = rec.steps[-1]
    assert last["train/match_rate"] == pytest.approx(result.matched.float().mean().item(), abs=1e-6)
    for key, value in (("reward", result.output.reward), ("rss", result.output.rss), ("rkl", result.output.rkl)):
        assert last[f"train/{key}"] == pytest.approx(value.mean().item(), rel=1e-5, abs=1e-5), key
    assert "train/count/token_mismatch" in rec.steps[-1] and "train/count/unmatched" in rec.steps[-1]


def test_missing_student_callback_is_a_clear_error(compact_dirs):
    module, _ = _setup(compact_dirs, lr=1e-3, max_new_tokens=8)
    with pytest.raises(ValueError, match="StudentRewardCallback"):
        _fit(module, [], steps=1)


def test_explicit_reward_is_refused(compact_dirs):
    with pytest.raises(ValueError, match="StudentRewardCallback"):
        TeacherRLModule(ModelConfig(str(compact_dirs["teacher"]), dtype="float32"), reward=object())


def test_rlt_reward_rises(compact_dirs):
    """The reward rises over 25 steps of teacher RL on synthetic addition (Q/S pairs).

    Weaker than the paper's setting, on purpose: with a *random* tiny student the rKL term (teacher − student
    log-probs over the explanation) only grows as the teacher sharpens, so the full reward falls on CPU-sized runs
    (tried: 30 steps, reward −6.6 → −7.6 while match rate rose). Here rKL is switched off
    (`kl_penalty_coeffs: 0`), leaving rSS + the not-matched penalty (SakanaAI/RLT, §2.7): the teacher can raise its
    reward by closing `</E>` within the token budget, which a random student does not hide. The full reward, rKL
    on, is climbed with a pre-trained student in `test_full_rlt_reward_rises_on_a_pretrained_student` (slow).
    """
    L.seed_everything(0)
    reward = RewardConfig(kl_penalty_coeffs=(0.0, 0.0))
    module, student = _setup(compact_dirs, lr=1e-2, max_new_tokens=12, reward=reward)
    rec = MetricsRecorder()
    _fit(module, [student, rec], steps=25)
    rewards = [s["train/reward"] for s in rec.steps]
    match = [s["train/match_rate"] for s in rec.steps]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last, rewards)
    assert sum(match[-5:]) > sum(match[:5]), match
    assert all(s["train/rkl"] == 0.0 for s in rec.steps)


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory) -> dict:
    """The demo's first two stages, short: a student pre-trained on 1-3 digit scratchpads (300 steps; the frozen
    reward student) and a teacher SFT'd from it on 50% good / 25% leak / 25% noise explanations (200 steps)."""
    out = tmp_path_factory.mktemp("pretrained_rl")
    dirs = build_compact_assets(out / "assets", CompactFormat().tag_tokens(), seed=0)
    opts = {
        "format": CompactFormat(),
        "lr": 3e-3,
        "betas": (0.9, 0.98),
        "lr_schedule": "linear",
        "warmup_ratio": 0.02,
        "max_length": 64,
    }
    L.seed_everything(0)
    pre = StudentDistillModule(ModelConfig(str(dirs["student"]), dtype="float32"), export_dir=str(out / "pre"), **opts)
    data = AdditionDataModule(num_train=20000, num_heldout=8, min_digits=1, max_digits=3, batch_size=64, seed=1)
    _fit(pre, [], 300, data)
    sft = TeacherSFTModule(ModelConfig(str(out / "pre"), dtype="float32"), export_dir=str(out / "sft"), **opts)
    mix = {"good": 0.5, "leak": 0.25, "noise": 0.25}
    _fit(sft, [], 200, AdditionDataModule(num_train=2000, num_heldout=8, batch_size=64, explanation_mix=mix))
    return {"student": out / "pre", "teacher": out / "sft"}


@pytest.mark.slow  # pre-training, teacher SFT and 30 RL steps: minutes on 2 cores
def test_full_rlt_reward_rises_on_a_pretrained_student(pretrained_dirs):
    """The paper's reward, rKL on (weights 3 / 0.03): with a reward student that can read task-length scratchpads,
    30 GRPO steps (8 prompts x 8 samples, lr 1e-4) drive the teacher from leaks and noise to scratchpads, so rKL falls
    and the reward rises. Measured (seeds 0/1/2, mean of the first vs last 5 steps): reward -16.9 -> -4.8,
    -19.2 -> -4.6, -20.0 -> -5.0; rKL 12.4 -> 1.4, 14.4 -> 1.3, 15.0 -> 1.5; the last 10 steps of a run spread
    by <= 1.9, so the margins below are several times the seed noise."""
    L.seed_everything(0)
    module = TeacherRLModule(
        ModelConfig(str(pretrained_dirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        num_generations=8,
        micro_batch_size=64,
        lr=1e-4,
        sampling=SamplingConfig(max_new_tokens=40, temperature=0.7),
        sample_table_every_n_steps=0,
    )
    student = StudentRewardCallback(ModelConfig(str(pretrained_dirs["student"]), dtype="float32"))
    assert student.reward_config == RewardConfig()  # the paper's weights, rKL included
    rec = MetricsRecorder()
    _fit(module, [student, rec], 30, AdditionDataModule(num_train=2000, num_heldout=8, batch_size=8))
    rewards = [s["train/reward"] for s in rec.steps]
    rkl = [s["train/rkl"] for s in rec.steps]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 6.0, (first, last, rewards)
    assert sum(rkl[-5:]) / 5 < sum(rkl[:5]) / 5 - 5.0, rkl
    assert sum(s["train/match_rate"] for s in rec.steps[-5:]) / 5 > 0.9


def test_reward_temperature_must_equal_sampling_temperature(compact_dirs):
    """The reward's teacher log-probs are those of the sampling distribution: a different T fails before training."""
    module, student = _setup(compact_dirs, lr=1e-3, max_new_tokens=8, reward=RewardConfig(teacher_temperature=1.0))
    with pytest.raises(ValueError, match="teacher_temperature=1.0 differs from model.init_args.sampling.temperature"):
        _fit(module, [student], steps=1)
