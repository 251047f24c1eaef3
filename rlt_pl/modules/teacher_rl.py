"""`TeacherRLModule`: GRPO on the teacher with the RLT reward (SakanaAI/RLT).

The teacher sees a question and its solution and writes an explanation after the RL prompt. The reward comes from
the frozen student owned by `StudentRewardCallback`: rSS (student log-probs of the solution given question +
explanation) minus rKL (teacher − student log-probs over the explanation), plus the not-matched penalty.

The teacher log-probs of the explanation are taken from the no-grad policy forward over the sampled ids that GRPO
runs anyway (P17), at the sampling temperature (P10); rows whose sampled tokens are not the canonical tokenization
are re-scored from text (counted as `train/count/token_mismatch`). `recompute_teacher_logprobs` forces the text
path everywhere (the authors' way, for parity checks).
"""

from __future__ import annotations

import unicodedata

import torch

from rlt_pl.callbacks.student_reward import StudentRewardCallback, find_student_reward
from rlt_pl.models import ModelConfig
from rlt_pl.modules.grpo import PROMPT_TAIL_TOKENS, GRPOModule, Reward, RewardResult
from rlt_pl.scoring import teacher_logprobs_from_policy


class RLTReward(Reward):
    """The RLT reward, computed by the trainer's `StudentRewardCallback`."""

    needs_policy_logprobs = True

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        cb: StudentRewardCallback = module.student_reward
        questions = [r["question"] for r in rows]
        solutions = [r["solution"] for r in rows]
        # Sampled bytes need not be NFC (e.g. a letter + combining accent); the tokenizer's normaliser would rewrite
        # them and the span check refuses such text. Score the NFC form: those rows no longer match the sampled ids,
        # so they take the text path (counted as token_mismatch) and are counted here as `nfc_normalized`.
        texts = [unicodedata.normalize("NFC", t) for t in gen.texts]
        nfc_changed = sum(a != b for a, b in zip(texts, gen.texts))
        teacher_tokens = None
        if not module.recompute_teacher_logprobs and cb.reward_config.kl_enabled:
            lp = policy_logprobs
            if abs(cb.reward_config.teacher_temperature - module.loss_temperature) > 1e-12:
                lp = module.policy_logprobs(gen, cb.reward_config.teacher_temperature)  # reward scored at another T
            scorer = cb.scorer(module)
            teacher_tokens = teacher_logprobs_from_policy(
                module.format,
                scorer.offsets,
                gen.prompt_ids,
                gen.prompt_mask,
                gen.completion_ids,
                gen.completion_mask,
                texts,
                lp.cpu(),
                scored_from=max(0, lp.shape[1] - gen.completion_ids.shape[1] - PROMPT_TAIL_TOKENS),
            )
        result, metrics = cb.score(module, questions, solutions, texts, teacher_tokens, module.model, gen.prompts)
        metrics["explanation_chars"] = torch.tensor([float(len(e)) for e in result.explanations])
        return RewardResult(
            result.output.reward.float(),
            metrics,
            counts=dict(result.counts, nfc_normalized=nfc_changed),
            texts={"rss": [f"{x:.3f}" for x in result.output.rss.tolist()]},
        )


class TeacherRLModule(GRPOModule):
    """GRPO training of an RLT teacher. Needs a `StudentRewardCallback` in `trainer.callbacks`.

    Args:
        model: the teacher policy (paper: the SFT warm-up checkpoint of Qwen2.5-7B-Instruct).
        recompute_teacher_logprobs: score the teacher side from re-encoded text with an extra forward (parity).
        **kwargs: GRPOModule arguments (num_generations, loss, sampling, lr, ...).
    """

    def __init__(self, model: ModelConfig, recompute_teacher_logprobs: bool = False, **kwargs) -> None:
        if kwargs.get("reward") is not None:
            raise ValueError("TeacherRLModule's reward is the RLT reward; configure it on StudentRewardCallback")
        super().__init__(model=model, reward=RLTReward(), **kwargs)
        self.recompute_teacher_logprobs = recompute_teacher_logprobs
        self.student_reward: StudentRewardCallback | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.student_reward = find_student_reward(self.trainer)
        if self.student_reward is None:
            raise ValueError(
                "TeacherRLModule needs a StudentRewardCallback in trainer.callbacks (it owns the reward student)"
            )

    def shared_reference(self) -> torch.nn.Module | None:
        """Reuse the reward student as the reference when both are the same frozen weights (one copy, not two)."""
        cb = self.student_reward
        same = cb is not None and cb.student is not None and cb.student_config == self.model_config
        return cb.student if same and not self.reference_is_trained() else None

    def build_prompt(self, row: dict) -> str:
        return self.format.teacher_prompt(row["question"], row["solution"], self.tokenizer)

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.format.teacher_stop_strings())
