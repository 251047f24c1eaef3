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

import json
import unicodedata
from pathlib import Path

import torch

from rlt_pl.callbacks.student_reward import StudentRewardCallback, find_student_reward
from rlt_pl.models import ModelConfig
from rlt_pl.modules.grpo import PROMPT_TAIL_TOKENS, GRPOModule, Reward, RewardResult
from rlt_pl.scoring import ScoreResult, teacher_logprobs_from_policy

INSPECT_GROUPS, INSPECT_SAMPLES = 2, 8  # groups, and samples per group, on each inspector page


def group_ids(rows) -> torch.Tensor:
    """[N] group id per completion: the rollout repeats each prompt's row object n times, consecutively."""
    ids, last = [], None
    for row in rows:
        ids.append(len(ids) and ids[-1] + (row is not last))
        last = row
    return torch.tensor(ids, dtype=torch.long)


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
        groups = group_ids(rows)
        result, metrics = cb.score(
            module, questions, solutions, texts, teacher_tokens, module.model, gen.prompts, groups=groups
        )
        module.last_score = (result, questions)  # per-token terms for the inspector page
        metrics["explanation_chars"] = torch.tensor([float(len(e)) for e in result.explanations])
        return RewardResult(
            result.output.reward.float(),
            metrics,
            counts=dict(result.counts, nfc_normalized=nfc_changed),
            texts={"rss": [f"{x:.3f}" for x in result.output.rss.tolist()]},
        )


def check_reward_temperature(teacher_temperature: float, sampling_temperature: float) -> None:
    """The reward's teacher log-probs are those of the sampling distribution (the authors score at the sampling
    temperature): refuse a reward temperature that departs from `sampling.temperature`."""
    if sampling_temperature > 0 and abs(teacher_temperature - sampling_temperature) > 1e-12:
        raise ValueError(
            f"StudentRewardCallback.reward.teacher_temperature={teacher_temperature} differs from "
            f"model.init_args.sampling.temperature={sampling_temperature}; set them equal"
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
        self.last_score: tuple[ScoreResult, list[str]] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.student_reward = find_student_reward(self.trainer)
        if self.student_reward is None:
            raise ValueError(
                "TeacherRLModule needs a StudentRewardCallback in trainer.callbacks (it owns the reward student)"
            )
        check_reward_temperature(self.student_reward.reward_config.teacher_temperature, self.sampling.temperature)

    def shared_reference(self) -> torch.nn.Module | None:
        """Reuse the reward student as the reference when both are the same frozen weights (one copy, not two)."""
        cb = self.student_reward
        same = cb is not None and cb.student is not None and cb.student_config == self.model_config
        return cb.student if same and not self.reference_is_trained() else None

    def _log_step(self, buf, rewards, adv, *args, **kwargs) -> None:
        super()._log_step(buf, rewards, adv, *args, **kwargs)
        every = self.sample_table_every_n_steps
        if every and self.global_step % every == 0 and self.last_score is not None:
            self.write_inspector_page(adv)

    def write_inspector_page(self, advantages: torch.Tensor) -> Path | None:
        """`<log_dir>/inspect/step_NNNNNN.{jsonl,html}`: the last batch's first groups, per-token terms and advantages
        (`python -m rlt_pl.inspect` re-renders the JSONL). Rank zero, loggers with a `log_dir` only."""
        from rlt_pl.inspect import sample_records, write_page

        log_dir = getattr(self.logger, "log_dir", None) if self.logger is not None else None
        if log_dir is None or not self.trainer.is_global_zero:
            return None
        result, questions = self.last_score
        g = self.num_generations
        rows = [i for grp in range(INSPECT_GROUPS) for i in range(grp * g, grp * g + min(g, INSPECT_SAMPLES))]
        rows = [i for i in rows if i < len(questions)]
        groups = [i // g for i in range(len(questions))]
        records = sample_records(result, self.tokenizer, questions, rows, advantages.tolist(), groups)
        base = Path(log_dir) / "inspect" / f"step_{self.global_step:06d}"
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        title = f"RLT explanation inspector — step {self.global_step}"
        return write_page(records, base.with_suffix(".html"), title=title)

    def build_prompt(self, row: dict) -> str:
        return self.format.teacher_prompt(row["question"], row["solution"], self.tokenizer)

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.format.teacher_stop_strings())
