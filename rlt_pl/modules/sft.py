"""Supervised stages of the RLT pipeline: teacher SFT warm-up and student distillation, plus evaluation.

Both render each row with the format (character span `completion` known by construction), tokenize once and train
with a completion-only cross-entropy, token-weighted over the whole accumulation window and all devices: the summed
token loss divided by the label-token count of the window (HF Trainer's `num_items_in_batch`, used by the authors'
TRL 0.14 and by SkyThought), so a 16K-token trace weighs 1,600 times a 10-token one, not the same (spec §3.9):
- `TeacherSFTModule`: question + solution → explanation (spec §1.5; loss after `<|begin_of_explanation|>` + padding).
  Its `predict` writes explanations for (question, solution) rows: the traces students are distilled on.
- `StudentDistillModule`: question → thought (= a teacher explanation) → solution (SakanaAI/RLT; loss on the
  whole assistant message). Its `validate`/`test` generate answers to benchmark questions and grade them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlt_pl.callbacks.student_reward import find_student_reward
from rlt_pl.datamodules.base import is_padding
from rlt_pl.distributed import all_gather_objects
from rlt_pl.evaluation import BenchmarkEvaluator
from rlt_pl.formats import Rendered
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.base import CausalLMModule
from rlt_pl.paths import check_writable_dir
from rlt_pl.rewards import token_logprobs
from rlt_pl.spans import ByteOffsets, encode_with_spans, nfc_fields


class SFTModule(CausalLMModule):
    """Completion-only SFT on rendered rows, with benchmark evaluation in validate/test.

    Args:
        model: the model to train.
        max_length: token budget per row; longer rows are truncated from the right and counted
            (`train/truncated_rows`); a row whose completion is cut away entirely contributes no loss.
        eval_sampling: sampling for validate/test (paper protocol: see configs/eval); default greedy.
        eval_num_samples: samples per question (pass@1 is their mean; pass@k uses the unbiased estimator).
        eval_k: k values reported.
        eval_output_dir: where per-question JSONL files of validate/test go (None: not written).
        **kwargs: CausalLMModule arguments (format, lr, optimizer, schedule, sampling, export_dir, ...).
    """

    def __init__(
        self,
        model: ModelConfig,
        max_length: int = 16384,
        eval_sampling: SamplingConfig | None = None,
        eval_num_samples: int = 1,
        eval_k: Sequence[int] = (1,),
        eval_output_dir: str | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("lr", 1e-5)
        super().__init__(model=model, **kwargs)
        if max_length < 8:
            raise ValueError("model.init_args.max_length must be >= 8")
        if any(k > eval_num_samples or k < 1 for k in eval_k):
            raise ValueError("model.init_args.eval_k values must be in [1, eval_num_samples]")
        self.max_length = max_length
        self.eval_sampling = eval_sampling or SamplingConfig(max_new_tokens=1024, temperature=0.0)
        self.engine.check_sampling(self.eval_sampling)
        self.eval_num_samples = eval_num_samples
        self.eval_k = tuple(eval_k)
        if eval_output_dir:
            check_writable_dir(eval_output_dir, "model.init_args.eval_output_dir")  # not after the evaluation
        self.eval_output_dir = eval_output_dir
        self._offsets: ByteOffsets | None = None
        self._evaluators: dict[int, BenchmarkEvaluator] = {}
        self._window_tokens = 0.0  # label tokens of this rank in the current accumulation window

    # ---------------------------------------------------------------- rendering
    def render(self, row: dict) -> Rendered:
        raise NotImplementedError

    @property
    def offsets(self) -> ByteOffsets:
        if self._offsets is None:
            self._offsets = ByteOffsets(self.tokenizer)
        return self._offsets

    def encode(self, rows: Sequence[dict]):
        rendered = [self.render(nfc_fields(r)) for r in rows]  # NFC: the DataModules already are
        eos = self.tokenizer.eos_token if not self.format.use_chat_template else ""
        texts = [r.text + eos for r in rendered]  # plain formats: EOS ends the sequence
        spans = [{"completion": (r.spans["completion"][0], len(t))} for r, t in zip(rendered, texts)]
        return encode_with_spans(self.tokenizer, self.offsets, texts, spans, None)

    def loss_on(self, rows: Sequence[dict]) -> tuple[Tensor, dict[str, Tensor]]:
        batch = self.encode(rows)
        ids, attn, mask = batch.input_ids, batch.attention_mask, batch.masks["completion"]
        truncated = (attn.sum(-1) > self.max_length).float()
        ids, attn, mask = ids[:, : self.max_length], attn[:, : self.max_length], mask[:, : self.max_length]
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # no KV cache to build
        lp = token_logprobs(logits, ids)  # [B, L] aligned to tokens
        count = mask.sum().clamp(min=1)
        loss = -(lp * mask).sum() / count
        stats = {"completion_tokens": mask.sum().float(), "truncated_rows": truncated.sum()}
        return loss, stats

    # ---------------------------------------------------------------- training
    def training_step(self, batch: list[dict], batch_idx: int) -> Tensor:
        loss, stats = self.loss_on(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)  # mean over ranks
        for k, v in stats.items():
            self.log(f"train/{k}", v, batch_size=len(batch), sync_dist=True, reduce_fx="sum")
        # Backward the summed token loss; `on_before_optimizer_step` divides the accumulated gradient by the
        # window's label-token count. Lightning divides each micro-batch loss by accumulate_grad_batches: undo it.
        tokens = stats["completion_tokens"]
        self._window_tokens += float(tokens)
        return loss * tokens * self.trainer.accumulate_grad_batches

    def on_before_optimizer_step(self, optimizer) -> None:
        """Turn the accumulated gradient of summed token losses into that of the window's token mean (all devices:
        the token count is summed over ranks, and the strategy's gradient mean over ranks is undone)."""
        tokens = torch.tensor(self._window_tokens, device=self.device, dtype=torch.float64)
        total = self.trainer.strategy.reduce(tokens, reduce_op="sum") if self.trainer.world_size > 1 else tokens
        scale = self.trainer.world_size / max(float(total), 1.0)
        for p in self.trainable_parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self._window_tokens = 0.0

    # ---------------------------------------------------------------- evaluation
    def _datamodule_task(self, dataloader_idx: int):
        dm = self.trainer.datamodule
        if dm is None:
            raise ValueError("evaluation needs a DataModule with a `task` (grader)")
        if hasattr(dm, "task_for"):
            return dm.task_for(dataloader_idx), dm.name_for(dataloader_idx)
        eval_data = getattr(dm, "eval_data", None)  # TracesDataModule evaluates on a benchmark (or several)
        if eval_data is not None:
            if hasattr(eval_data, "task_for"):
                return eval_data.task_for(dataloader_idx), eval_data.name_for(dataloader_idx)
            return eval_data.task, eval_data.name
        return dm.task, dm.name

    def _evaluate(self, batch: list[dict], dataloader_idx: int, stage: str) -> None:
        task, name = self._datamodule_task(dataloader_idx)
        if dataloader_idx not in self._evaluators:
            out = f"{self.eval_output_dir}/{stage}_{name}.jsonl" if self.eval_output_dir else None
            self._evaluators[dataloader_idx] = BenchmarkEvaluator(task, name, k_values=self.eval_k, output_path=out)
        prompts = [self.format.student_prompt(task.format_question(r), self.tokenizer) for r in batch]
        from dataclasses import replace

        sampling = replace(self.eval_sampling, stop_strings=tuple(self.format.student_stop_strings()))
        keep, prompts = self.prompts_within_limit(prompts, sampling)  # over-long questions: counted, skipped
        batch = [batch[i] for i in keep]
        if not batch:
            return
        gen = self.generate(prompts, self.eval_num_samples, sampling)
        n = self.eval_num_samples
        responses = [gen.texts[i * n : (i + 1) * n] for i in range(len(batch))]
        tokens = gen.completion_mask.sum(-1).view(len(batch), n).tolist()
        real = [i for i, r in enumerate(batch) if not is_padding(r)]  # padding rows only keep ranks in step
        ev = self._evaluators[dataloader_idx]
        ev.update([batch[i] for i in real], [responses[i] for i in real], token_counts=[tokens[i] for i in real])

    def _finish_eval(self, stage: str) -> None:
        """Gather every rank's graded questions (each question once), log the same metrics on all ranks, write one
        JSONL from rank 0."""
        for ev in self._evaluators.values():
            ev.records = [r for part in all_gather_objects(ev.records) for r in part]
            metrics = ev.compute()
            self.log_dict({f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)
            if ev.output_path and self.trainer.is_global_zero:
                ev.write_jsonl()
        self._evaluators = {}
        skipped = torch.tensor(float(self.skipped_long_prompts), device=self.device)
        self.log(f"{stage}/count/skipped_long_prompts", skipped, sync_dist=True, reduce_fx="sum")

    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def test_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")


class StudentDistillModule(SFTModule):
    """Distil a student on reasoning traces in the student format (question → thought → solution).

    If a `StudentRewardCallback` is attached, every `log_reward_every_n_steps` steps the rSS of the batch's traces
    under the frozen reward student is logged (`train/trace_rss`), i.e. how well a student reads these traces.
    """

    def __init__(self, model: ModelConfig, log_reward_every_n_steps: int = 50, **kwargs) -> None:
        super().__init__(model=model, **kwargs)
        if log_reward_every_n_steps < 0:
            raise ValueError(
                f"model.init_args.log_reward_every_n_steps must be >= 0 (0: never), got {log_reward_every_n_steps}"
            )
        self.log_reward_every_n_steps = log_reward_every_n_steps

    def render(self, row: dict) -> Rendered:
        return self.format.student_text(row["question"], row.get("thought") or "", row["solution"], self.tokenizer)

    def training_step(self, batch: list[dict], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        cb = find_student_reward(self.trainer)
        every = self.log_reward_every_n_steps
        if cb is not None and every and self.global_step % every == 0:
            with torch.no_grad():
                sol, _, _ = cb.scorer(self).student_side(
                    [r["question"] for r in batch],
                    [r["solution"] for r in batch],
                    [self.format.pad_explanation(r.get("thought") or "") for r in batch],
                )
            rss = (sol.logprobs * sol.mask).sum(-1) / sol.mask.sum(-1).clamp(min=1)
            self.log("train/trace_solution_logprob", rss.mean(), batch_size=len(batch))
        return loss


class TeacherSFTModule(SFTModule):
    """Teacher warm-up (SakanaAI/RLT): learn to explain a given solution; `predict` writes traces (see TraceWriter)."""

    def __init__(self, model: ModelConfig, predict_num_samples: int = 1, **kwargs) -> None:
        super().__init__(model=model, **kwargs)
        if predict_num_samples < 1:
            raise ValueError("model.init_args.predict_num_samples must be >= 1")
        self.predict_num_samples = predict_num_samples

    def lineage(self, extra: dict | None = None) -> dict:
        return super().lineage({"num_samples": self.predict_num_samples, **(extra or {})})

    def render(self, row: dict) -> Rendered:
        thought = row.get("thought")
        if thought is None:
            raise ValueError(f"row {row.get('id')}: teacher SFT needs a reference explanation in `thought`")
        return self.format.teacher_sft(row["question"], row["solution"], thought, self.tokenizer)

    def predict_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0):
        from rlt_pl.callbacks.trace_writer import generate_traces

        return generate_traces(self, batch, batch_idx, self.predict_num_samples)
