"""`StudentRewardCallback`: the frozen student and the batched rSS/rKL scoring, shared by the modules.

The callback loads the student in `setup` (frozen, eval mode, optionally 4-/8-bit), never puts it in a checkpoint
(it is not a submodule of the LightningModule; checkpoints record its source instead), and exposes an `RLTScorer`
to whichever module it is attached to: `TeacherRLModule` uses it as the GRPO reward; `StudentDistillModule` logs how
well the student reads the traces it trains on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rlt_pl.diagnostics import copy_stats
from rlt_pl.models import ModelConfig, check_tokenizers_compatible, load_causal_lm, load_tokenizer
from rlt_pl.rewards import RewardConfig
from rlt_pl.scoring import PackedTokens, RLTScorer, ScoreResult


class StudentRewardCallback(Callback):
    """Own the frozen reward student and score teacher explanations with the RLT reward.

    Args:
        student: how to load the student (paper: `bespokelabs/Bespoke-Stratos-7B`); `quantization` 4bit/8bit allowed.
        reward: reward options (paper defaults: rSS [1, 0.01]·[mean, min], rKL [3, 0.03]·[mean, max], T = 0.7).
        max_length: student context budget in tokens; longer contexts are counted and get the penalties.
        token_budget: tokens per student forward chunk.
        allow_tokenizer_mismatch: accept a student tokenizer that differs from the teacher's (not supported by the
            exact-span path: refused unless set, and then only the text path with the teacher's tokenizer is used).
    """

    def __init__(
        self,
        student: ModelConfig,
        reward: RewardConfig | None = None,
        max_length: int | None = None,
        token_budget: int = 65536,
        allow_tokenizer_mismatch: bool = False,
    ) -> None:
        try:
            student.validate()
        except ValueError as exc:  # ModelConfig names its fields `model.*`; here the flag is `student.*`
            raise ValueError(re.sub(r"^model\.", "student.", str(exc))) from None
        if max_length is not None and max_length < 1:
            raise ValueError(f"StudentRewardCallback.max_length must be >= 1 or null, got {max_length}")
        if token_budget < 1:
            raise ValueError(f"StudentRewardCallback.token_budget must be >= 1, got {token_budget}")
        self.student_config = student
        self.reward_config = reward or RewardConfig()
        self.max_length = max_length
        self.token_budget = token_budget
        self.allow_tokenizer_mismatch = allow_tokenizer_mismatch
        self.student: torch.nn.Module | None = None
        self._scorer: RLTScorer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.student is None:
            self.student = load_causal_lm(self.student_config, trainable=False)
        self.student.to(pl_module.device)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.student.to(pl_module.device).eval()

    def scorer(self, pl_module: LightningModule) -> RLTScorer:
        """The scorer bound to the module's tokenizer and format (tokenizers checked once, P13)."""
        if self._scorer is None:
            if self.student is None:
                raise RuntimeError("StudentRewardCallback.scorer() called before setup()")
            tokenizer = pl_module.tokenizer
            if not self.allow_tokenizer_mismatch:
                student_tok = load_tokenizer(self.student_config.name_or_path, self.student_config.trust_remote_code)
                fmt = pl_module.format
                probes = [fmt.explanation_start, fmt.explanation_end, fmt.thought_start, fmt.thought_end]
                probes += [fmt.student_solution_start, fmt.student_solution_end, "What is 12 + 30?\n\n"]
                try:
                    check_tokenizers_compatible(tokenizer, student_tok, [p for p in probes if p])
                except ValueError as err:
                    raise ValueError(
                        f"{err}\nThe reward compares teacher and student log-probs token by token (P13); use a student "
                        "with the teacher's tokenizer, or set StudentRewardCallback.allow_tokenizer_mismatch: true "
                        "to score everything with the teacher's tokenizer anyway"
                    ) from err
            self._scorer = RLTScorer(
                self.student, tokenizer, pl_module.format, self.reward_config, self.max_length, self.token_budget
            )
        return self._scorer

    def score(
        self,
        pl_module: LightningModule,
        questions: Sequence[str],
        solutions: Sequence[str],
        completions: Sequence[str],
        teacher_tokens: PackedTokens | None = None,
        teacher_model: torch.nn.Module | None = None,
        prompts: Sequence[str] | None = None,
        groups: torch.Tensor | None = None,
    ) -> tuple[ScoreResult, dict[str, torch.Tensor]]:
        """Score completions; returns the result and per-completion metrics (reward components, diagnostics).
        `groups` [B]: the prompt each completion belongs to (penalties go below the worst regular reward of it)."""
        scorer = self.scorer(pl_module)
        result = scorer.score(questions, solutions, completions, teacher_tokens, teacher_model, prompts, groups)
        out = result.output
        metrics = {"rss": out.rss, "rkl": out.rkl, "match_rate": result.matched.float()}
        for k, v in out.components.items():
            metrics[k] = v
        metrics.update(copy_stats(result.explanations, solutions))
        return result, metrics

    def state_dict(self) -> dict:
        """Only the student's source is checkpointed; its weights are re-loaded on resume."""
        return {"student": self.student_config.name_or_path}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("student")
        if saved is not None and saved != self.student_config.name_or_path:
            raise ValueError(
                f"checkpoint was trained with student {saved!r} but the config loads "
                f"{self.student_config.name_or_path!r}"
            )


def find_student_reward(trainer: Trainer | None) -> StudentRewardCallback | None:
    """The trainer's StudentRewardCallback, if any."""
    if trainer is None:
        return None
    found = [cb for cb in trainer.callbacks if isinstance(cb, StudentRewardCallback)]
    if len(found) > 1:
        raise ValueError("more than one StudentRewardCallback in trainer.callbacks")
    return found[0] if found else None
