"""GRPO as a LightningModule, generic over its reward.

One `training_step` reads like the paper (SakanaAI/RLT): sample G completions per prompt → score → group advantages →
policy loss, then one optimizer step. The generation batch is buffered, shuffled and split into micro-batches for
the backward passes (the paper's gradient accumulation, §3.1); with `num_iterations` μ > 1 the buffer is replayed
μ times with one optimizer step per pass (TRL's semantics) and PPO clipping against the rollout's log-probs.
Manual optimisation keeps the whole cycle in one place; a step never ends mid-buffer, so a checkpoint between steps
holds everything needed to resume (policy, optimizer, scheduler, reference, RNG).

Rewards are classes chosen by `class_path` (`TaskReward` for verifiable student RL; the RLT reward comes from
`StudentRewardCallback` through `TeacherRLModule`); their interface lives in `rlt_pl.modules.grpo_reward` and is
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from rlt_pl.datamodules.base import is_padding
from rlt_pl.distributed import agree_max, all_gather_objects, all_gather_tensor, all_ranks_true, all_reduce_sum, world
from rlt_pl.generation import GenerationOutput
from rlt_pl.grpo import PolicyLossConfig, group_advantages, policy_loss
from rlt_pl.models import ModelConfig, load_causal_lm, reference_mode
from rlt_pl.modules.base import CausalLMModule, markdown_table
from rlt_pl.modules.grpo_reward import Reward, RewardResult, TaskReward
from rlt_pl.rng import collect_rng_states, restore_rng_states
from rlt_pl.scoring import causal_logprobs, completion_logprobs


def sequences(gen: GenerationOutput, device: torch.device) -> tuple[Tensor, Tensor]:
    """`[prompt ‖ completion]` ids and attention mask of a generation batch, on `device`."""
    ids = torch.cat([gen.prompt_ids, gen.completion_ids], 1).to(device)
    return ids, torch.cat([gen.prompt_mask, gen.completion_mask], 1).to(device)


# Prompt tokens scored by the no-grad policy forward besides the completion (the RLT explanation padding).
PROMPT_TAIL_TOKENS = 32


class GRPOModule(CausalLMModule):
    """GRPO training of a causal LM.

    Args:
        model: the policy.
        reward: the reward (`class_path`); subclasses may supply it instead (TeacherRLModule).
        num_generations: group size G (paper: 64).
        micro_batch_size: completions per forward/backward pass (memory knob; no effect on the math).
        micro_batch_tokens: if set, caps a micro-batch at this many padded tokens (long sequences get fewer rows).
        num_iterations: μ, optimizer updates per generation batch (paper: 1; TRL semantics: each is one pass over
            the buffer); > 1 needs `loss.clip_eps_low`. `trainer.max_steps` counts optimizer updates.
        loss: policy-loss options (β = 0.04, k3, per-sequence mean as in the paper).
        reference: `copy` (frozen copy of the initial policy), `adapter` (LoRA with the adapter off) or `none`.
        unbias_logprobs: divide logits by the sampling temperature for policy/reference log-probs (paper: true).
        advantage_scale: `std` (paper) or `none` (Dr. GRPO).
        token_budget: tokens per chunk of the no-grad policy/reference forwards.
        sampler_logprobs: with μ = 1, take the completions' policy log-probs (the RLT reward's teacher side) from the
            sampler when the engine recorded them at the loss temperature (`GenerationOutput.logprobs`; plain
            tempered sampling), instead of a no-grad policy forward over every completion: one forward less per
            step, equal to it up to decode-vs-prefill kernel rounding (1e-5 in fp32). False: always the forward.
        max_nonfinite_steps: skipped steps with non-finite loss/reward tolerated before the run stops.
        sample_table_every_n_steps: write a text table of samples to TensorBoard every N steps (0: never).
        val_num_generations: samples per prompt in `validate` (mean reward on held-out prompts).
    """

    def __init__(
        self,
        model: ModelConfig,
        reward: Reward | None = None,
        num_generations: int = 64,
        micro_batch_size: int = 1,
        micro_batch_tokens: int | None = None,
        num_iterations: int = 1,
        loss: PolicyLossConfig | None = None,
        reference: str = "copy",
        unbias_logprobs: bool = True,
        advantage_scale: str = "std",
        token_budget: int = 65536,
        sampler_logprobs: bool = True,
        max_grad_norm: float | None = 1.0,
        max_nonfinite_steps: int = 10,
        sample_table_every_n_steps: int = 10,
        val_num_generations: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(model=model, **kwargs)
        if num_generations < 1:
            raise ValueError("model.init_args.num_generations must be >= 1")
        if num_generations == 1:
            raise ValueError(
                "model.init_args.num_generations=1 makes GRPO a no-op (a group of one has advantage 0); use >= 2"
            )
        if max_grad_norm is not None and not 0 < max_grad_norm < float("inf"):
            raise ValueError(
                f"model.init_args.max_grad_norm must be > 0 (or null: no clipping), got {max_grad_norm}; a negative "
                "norm would flip the update's sign"
            )
        for name, value in (("token_budget", token_budget), ("val_num_generations", val_num_generations)):
            if value < 1:
                raise ValueError(f"model.init_args.{name} must be >= 1, got {value}")
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"model.init_args.micro_batch_tokens must be >= 1 or null, got {micro_batch_tokens}")
        if max_nonfinite_steps < 0:
            raise ValueError(f"model.init_args.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        if sample_table_every_n_steps < 0:
            raise ValueError(
                f"model.init_args.sample_table_every_n_steps must be >= 0 (0: never), got {sample_table_every_n_steps}"
            )
        if micro_batch_size < 1:
            raise ValueError("model.init_args.micro_batch_size must be >= 1")
        if num_iterations < 1:
            raise ValueError("model.init_args.num_iterations must be >= 1")
        self.loss_config = loss or PolicyLossConfig()
        if num_iterations > 1 and self.loss_config.clip_eps_low is None:
            raise ValueError("model.init_args.num_iterations > 1 needs loss.clip_eps_low (PPO clipping)")
        if reference not in ("copy", "adapter", "none"):
            raise ValueError(f"model.init_args.reference must be copy, adapter or none, got {reference!r}")
        if reference == "adapter" and model.lora is None:
            raise ValueError("model.init_args.reference='adapter' needs model.lora (the adapter is switched off)")
        if reference == "none" and self.loss_config.beta > 0:
            raise ValueError("model.init_args.reference='none' needs loss.beta: 0")
        if advantage_scale not in ("std", "none"):
            raise ValueError("model.init_args.advantage_scale must be std or none")
        if self.sampling.temperature == 0 or self.sampling.top_k == 1:
            raise ValueError(
                "model.init_args.sampling.temperature=0 / top_k=1 (greedy) samples G identical completions: every "
                "advantage is 0 and GRPO never updates; use a temperature > 0 (paper: 0.7)"
            )
        self.reward = reward
        self.num_generations = num_generations
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.num_iterations = num_iterations
        self.reference = reference
        self.unbias_logprobs = unbias_logprobs
        self.advantage_scale = advantage_scale
        self.token_budget = token_budget
        self.sampler_logprobs = sampler_logprobs
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite_steps = max_nonfinite_steps
        self.sample_table_every_n_steps = sample_table_every_n_steps
        self.val_num_generations = val_num_generations
        self.ref_model: torch.nn.Module | None = None
        self.nonfinite_steps = 0
        self.ref_synced = False  # set by ReferenceSyncCallback: the reference then diverges and is checkpointed
        self._pending_rng: dict | None = None  # RNG state from a checkpoint, applied before the next train batch
        self._rng_before_val: dict | None = None  # training RNG stream, set aside while validation samples
        self.automatic_optimization = False

    # ---------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.reference == "copy" and self.loss_config.beta > 0:
            self.ref_model = self.shared_reference() or self.shard(load_causal_lm(self.model_config, trainable=False))

    def shared_reference(self) -> torch.nn.Module | None:
        """A frozen model with the reference's weights that is already loaded elsewhere (see TeacherRLModule)."""
        return None

    @property
    def loss_temperature(self) -> float:
        t = self.sampling.temperature
        return t if self.unbias_logprobs and t > 0 else 1.0

    def reference_logprobs(self, ids: Tensor, attn: Tensor, last_n: int | None = None) -> Tensor | None:
        if self.loss_config.beta <= 0:
            return None
        t, budget = self.loss_temperature, self.token_budget
        if self.reference == "adapter":
            with reference_mode(self.model):
                return causal_logprobs(self.model, ids, attn, t, budget, last_n, share_prefix=True)
        return causal_logprobs(self.ref_model, ids, attn, t, budget, last_n, share_prefix=True)

    # ---------------------------------------------------------------- prompts and reward
    def build_prompt(self, row: dict) -> str:
        """Student RL: the student format around the task's question."""
        task = self.reward.task if isinstance(self.reward, TaskReward) else None
        question = task.format_question(row) if task is not None else row["question"]
        return self.format.student_prompt(question, self.tokenizer)

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.format.student_stop_strings())

    def compute_reward(self, rows, gen, policy_logprobs) -> RewardResult:
        if self.reward is None:
            raise ValueError("GRPOModule needs model.init_args.reward (class_path of a Reward)")
        return self.reward(self, rows, gen, policy_logprobs)

    def needs_policy_logprobs(self) -> bool:
        return self.num_iterations > 1 or (self.reward is not None and self.reward.needs_policy_logprobs)

    @torch.no_grad()
    def policy_logprobs(self, gen: GenerationOutput, temperature: float) -> Tensor:
        """No-grad policy log-probs of `[prompt ‖ completion]`: the completion plus a prompt tail (the RLT reward
        scores the explanation padding that ends the prompt); earlier columns are 0. A group's shared prompt runs
        once per chunk (`share_prefix`: no-grad, so the KV cache is built even under gradient checkpointing)."""
        ids, attn = sequences(gen, self.device)
        last_n = gen.completion_ids.shape[1] + PROMPT_TAIL_TOKENS
        return causal_logprobs(self.model, ids, attn, temperature, self.token_budget, last_n=last_n, share_prefix=True)

    def rollout_logprobs(self, gen: GenerationOutput) -> Tensor:
        """Policy log-probs of `[prompt ‖ completion]` at the loss temperature for the reward (and μ > 1's ratio).

        With `sampler_logprobs`, μ = 1 and log-probs the engine recorded at that temperature, the completion columns
        are the sampler's and only the prompt tail is scored, once per distinct prompt; else `policy_logprobs`."""
        t = self.loss_temperature
        recorded = gen.logprobs is not None and gen.logprobs_temperature == t
        if not (self.sampler_logprobs and self.num_iterations == 1 and recorded):
            return self.policy_logprobs(gen, t)
        rows = torch.cat([gen.prompt_ids, gen.prompt_mask], 1)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        width = gen.prompt_ids.shape[1]
        ids, attn = unique[:, :width].to(self.device), unique[:, width:].to(self.device)
        tail = causal_logprobs(self.model, ids, attn, t, self.token_budget, last_n=PROMPT_TAIL_TOKENS)
        return torch.cat([tail[inverse.to(self.device)], gen.logprobs.to(self.device)], 1)

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, rows: Sequence[dict], n: int, sampling=None) -> dict | None:
        """Generate n completions per row, score them, compute advantages. Returns the generation buffer (None when
        every prompt was over `sampling.max_prompt_tokens`)."""
        sampling = replace(sampling or self.sampling, stop_strings=self.stop_strings())
        t0 = time.perf_counter()
        prompts = [self.build_prompt(r) for r in rows]
        keep, prompts = self.prompts_within_limit(prompts, sampling)  # over-long prompts are counted and skipped
        rows = [rows[i] for i in keep]
        if not prompts:
            return None
        gen = self.generate(prompts, n, sampling)
        t1 = time.perf_counter()
        ids, attn = sequences(gen, self.device)
        policy_lp = self.rollout_logprobs(gen) if self.needs_policy_logprobs() else None
        ref_lp = self.reference_logprobs(ids, attn, last_n=gen.completion_ids.shape[1])
        t2 = time.perf_counter()
        repeated = [r for r in rows for _ in range(n)]
        result = self.compute_reward(repeated, gen, policy_lp)
        t3 = time.perf_counter()
        return {
            "rows": repeated,
            "gen": gen,
            "ids": ids,
            "attn": attn,
            "old_lp": policy_lp,
            "ref_lp": ref_lp,
            "result": result,
            "times": {"generate": t1 - t0, "logprobs": t2 - t1, "reward": t3 - t2},
        }

    # ---------------------------------------------------------------- training
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        t_start = time.perf_counter()
        buf = self.rollout(batch, self.num_generations)
        self.log("train/count/skipped_long_prompts", float(self.skipped_long_prompts))
        if buf is None:
            return
        result: RewardResult = buf["result"]
        rewards = result.rewards.float()
        finite = torch.isfinite(rewards)
        if not all_ranks_true(bool(finite.all())):  # every rank skips, or none
            self._nonfinite(f"{int((~finite).sum())} non-finite rewards on this rank")
            return
        adv = group_advantages(rewards, self.num_generations, scale=self.advantage_scale).to(self.device)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        prompt_len = buf["gen"].prompt_ids.shape[1]
        comp_mask = buf["gen"].completion_mask.to(self.device)
        # DDP and FSDP average gradients over ranks; each rank holds n of the world_size · n completions. A token
        # mean divides by the tokens of all ranks (× world_size to undo the averaging); a sequence mean by n.
        n_ranks = world()[1]
        total_tokens = all_reduce_sum([float(comp_mask.sum())])[0] / n_ranks
        total_tokens = max(total_tokens, 1.0 / n_ranks)
        width = agree_max(buf["ids"].shape[1])  # same micro-batch count on every rank
        t_loss = time.perf_counter()
        stats: dict[str, list[Tensor]] = {}
        measure = self.logs_this_step()  # logged-only metrics: measured on the steps whose metrics the loggers write
        # μ optimizer updates per generation batch (TRL's num_iterations): each pass over the buffer accumulates the
        # whole batch's gradient and steps; from the second pass on the policy has moved away from the old
        # log-probs captured at rollout, so the ratio leaves 1 and the PPO clip acts.
        objective = torch.zeros((), device=self.device)  # this rank's share of the optimised loss, summed over passes
        for _ in range(self.num_iterations):
            ok, pass_objective = self._accumulate_pass(
                buf, adv, prompt_len, comp_mask, total_tokens, width, stats, measure
            )
            if not ok:
                opt.zero_grad()
                self._nonfinite("non-finite loss")
                return
            objective = objective + pass_objective / self.num_iterations
            grad_norm = self._clip_and_step(opt)
            if not torch.isfinite(grad_norm):
                return
            if sched is not None:
                sched.step()
        t_end = time.perf_counter()
        times = dict(buf["times"], loss=t_end - t_loss, total=t_end - t_start)
        if measure:  # ranks' gradients are averaged, so the optimised loss is the mean of their shares
            stats["loss_total"] = [torch.tensor(all_reduce_sum([float(objective)])[0] / n_ranks)]
        self._log_step(buf, rewards, adv, stats, grad_norm, times, measure)

    def _accumulate_pass(
        self, buf, adv, prompt_len, comp_mask, total_tokens, width, stats, measure: bool = True
    ) -> tuple[bool, Tensor]:
        """One shuffled pass over the generation buffer in micro-batches, gradients accumulated.

        Returns (all ranks' losses finite, this rank's share of the pass's loss). `width` is the padded length agreed
        over ranks, so every rank runs the same number of micro-batches (the same collectives). `measure`: also
        collect the logged-only per-micro-batch stats into `stats` (loss parts, KL, clip fraction, entropy)."""
        n = len(adv)
        # the gradient is accumulated over the whole buffer before the step, so micro-batch composition does not
        # change it: rows sorted by (prompt length, total length) keep padding and the prompt-length spread small
        lengths = buf["attn"].sum(-1).tolist()
        prompts = buf["gen"].prompt_mask.sum(-1).tolist()
        order = sorted(range(n), key=lambda i: (prompts[i], lengths[i]))
        rows = self.micro_batch_size
        if self.micro_batch_tokens is not None:
            rows = max(1, min(rows, self.micro_batch_tokens // width))
        objective = torch.zeros((), device=self.device)
        for start in range(0, n, rows):
            idx = order[start : start + rows]
            out = self._micro_step(buf, idx, adv, prompt_len, measure)
            if self.loss_config.aggregation == "token_mean":
                scale = comp_mask[idx].sum() / total_tokens
            else:
                scale = len(idx) / n
            loss = out.loss * scale
            if not all_ranks_true(bool(torch.isfinite(loss))):
                return False, objective
            self.manual_backward(loss)
            objective = objective + loss.detach().float()
            if not measure:
                continue
            # a micro-batch's stats count by its share of the loss (uneven micro-batches: not a plain mean)
            weight = float(scale) / self.num_iterations
            for k, v in out.metrics.items():
                stats.setdefault(k, []).append(v.detach().float() * weight)
        return True, objective

    def _micro_step(self, buf: dict, idx: list[int], adv: Tensor, prompt_len: int, entropy: bool = True):
        """Loss of one micro-batch; all-padding columns (left of prompts, right of completions) are trimmed.
        `entropy`: add the token entropy to the metrics (no effect on the loss)."""
        ids, attn = buf["ids"][idx], buf["attn"][idx]
        used = attn.any(0).nonzero().squeeze(-1)
        lo = min(int(used.min()), prompt_len - 1)
        hi = max(int(used.max()) + 1, prompt_len + 1)
        ids, attn = ids[:, lo:hi], attn[:, lo:hi]
        comp_len = hi - prompt_len
        lp, h = completion_logprobs(self.model, ids, attn, prompt_len - lo, self.loss_temperature, entropy)
        mask = buf["gen"].completion_mask[idx][:, :comp_len].to(self.device).bool()
        old = buf["old_lp"][idx][:, prompt_len:hi] if buf["old_lp"] is not None and self.num_iterations > 1 else None
        ref = buf["ref_lp"][idx][:, prompt_len:hi] if buf["ref_lp"] is not None else None
        out = policy_loss(lp, old, ref, adv[idx], mask, self.loss_config)
        if h is not None:
            out.metrics["entropy"] = (h * mask).sum() / mask.sum().clamp(min=1)
        return out

    def _clip_and_step(self, opt) -> Tensor:
        """Clip by global norm (FSDP: the sharded model's own `clip_grad_norm_`), then step unless non-finite."""
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")  # inf: measure only
        # DDP: gradients are already averaged, identical on every rank. FSDP2: DTensor gradients, the norm is global.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            opt.zero_grad()
            self._nonfinite("non-finite gradient norm")
            return grad_norm
        opt.step()
        opt.zero_grad()
        self.engine.weights_changed()
        return grad_norm

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_steps += 1
        rank_zero_warn(f"step {self.global_step}: {what}; step skipped ({self.nonfinite_steps} so far)")
        self.log("train/skipped_steps", float(self.nonfinite_steps))
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_steps} steps had non-finite loss/reward > model.init_args.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}; stopping the run"
            )

    # ---------------------------------------------------------------- logging
    def logs_this_step(self) -> bool:
        """Whether the loggers write this training step's metrics (`trainer.log_every_n_steps`, as Lightning decides
        it). The step metrics are only logged, so they are measured and logged on these steps alone (the token entropy
        costs a pass over the logits, Lightning's `log` a fixed overhead per key); other steps log the progress-bar
        reward only. True outside a trainer."""
        if self._trainer is None:
            return True
        return self._trainer._logger_connector.should_update_logs

    def _log_step(self, buf, rewards, adv, stats, grad_norm, times, measure: bool) -> None:
        """Log the step: its metrics when `measure` (a logging step, `logs_this_step`, the same on every rank), else
        the progress-bar reward; the sample table every `sample_table_every_n_steps`."""
        if measure:
            self._log_metrics(buf, rewards, adv, stats, grad_norm, times)
        else:
            self.log("reward", all_gather_tensor(rewards.detach().float().cpu()).mean(), prog_bar=True, logger=False)
        every = self.sample_table_every_n_steps
        if every and self.global_step % every == 0:
            gen, rows, result, g = buf["gen"], buf["rows"], buf["result"], self.num_generations
            table = [
                {"question": rows[i]["question"], "completion": gen.texts[i], "reward": float(rewards[i])}
                | {k: v[i] for k, v in result.texts.items()}
                for i in range(0, len(rows), max(1, g))[:8]
            ]
            self.log_text("samples", markdown_table(table))

    def _log_metrics(self, buf, rewards, adv, stats, grad_norm, times) -> None:
        """Step metrics over the global batch: per-completion values are gathered from all ranks (every rank
        computes the same numbers), counts are summed, per-micro-batch stats weighted by their share of the loss, times
        are the slowest rank's."""
        gen: GenerationOutput = buf["gen"]
        result: RewardResult = buf["result"]
        g = self.num_generations
        local_lengths = gen.completion_mask.sum(-1).float()
        rewards_all = all_gather_tensor(rewards.detach().float().cpu())
        adv_all = all_gather_tensor(adv.detach().float().cpu())
        lengths = all_gather_tensor(local_lengths)
        finished = all_gather_tensor(gen.finished.float())
        group_std = rewards_all.view(-1, g).std(-1, unbiased=True) if g > 1 else torch.zeros(1)
        slowest = dict(zip(times, all_gather_tensor(torch.tensor([list(times.values())])).max(0).values.tolist()))
        metrics = {
            "train/reward": rewards_all.mean(),
            "train/reward_std": group_std.mean(),
            "train/reward_max": rewards_all.max(),
            "train/advantage_abs_mean": adv_all.abs().mean(),
            "train/zero_variance_groups": (group_std == 0).float().mean(),
            "train/completion_length": lengths.mean(),
            "train/completion_length_max": lengths.max(),
            "train/truncated_rate": 1 - finished.mean(),
            "train/grad_norm": grad_norm.float(),
            "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
            "train/tokens_per_s": lengths.sum() / max(slowest["total"], 1e-9),
        }
        names = sorted(stats)
        if names:
            means = torch.stack([torch.stack(stats[k]).sum().cpu() for k in names])  # weights sum to 1
            means = torch.tensor(all_reduce_sum(means.tolist())) / world()[1]
            metrics.update({f"train/{k}": v for k, v in zip(names, means)})
        for k in sorted(result.metrics):
            v = all_gather_tensor(result.metrics[k].detach().float().cpu())
            metrics[f"train/{k}"] = v.nanmean() if v.numel() else torch.tensor(float("nan"))
        count_names = sorted(set().union(*all_gather_objects(sorted(result.counts))))
        counts = all_reduce_sum([float(result.counts.get(k, 0.0)) for k in count_names])
        metrics.update({f"train/count/{k}": torch.tensor(v) for k, v in zip(count_names, counts)})
        metrics.update({f"time/{k}": torch.tensor(v) for k, v in slowest.items()})
        if len(rewards_all) > 2 and float(lengths.std()) > 0 and float(rewards_all.std()) > 0:
            metrics["train/length_reward_corr"] = torch.corrcoef(torch.stack([lengths, rewards_all]))[0, 1]
        self.log_dict({k: v.detach().float().cpu() for k, v in metrics.items()}, prog_bar=False, on_step=True)
        self.log("reward", rewards_all.mean(), prog_bar=True, logger=False)

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        buf = self.rollout(batch, self.val_num_generations)
        if buf is None:
            return
        result = buf["result"]
        # Padding rows (equal batch counts on every rank) are left out; Lightning's synced mean is weighted by
        # batch_size, so the epoch value is the mean over the real rows of all ranks.
        real = torch.tensor([not is_padding(r) for r in buf["rows"]])
        n = int(real.sum())

        def mean(v: Tensor) -> Tensor:
            v = v.float()[real]
            return v.nanmean() if n else torch.tensor(0.0)

        self.log("val/reward", mean(result.rewards), batch_size=n, add_dataloader_idx=False, sync_dist=True)
        for k in sorted(result.metrics):
            self.log(f"val/{k}", mean(result.metrics[k]), batch_size=n, add_dataloader_idx=False, sync_dist=True)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the training stream, even if saved mid-validation; with several ranks each rank's own (each samples its own)
        per_rank = all_gather_objects(self._rng_before_val or collect_rng_states())
        checkpoint["rlt_pl"] = {
            "nonfinite_steps": self.nonfinite_steps,
            "frozen_models": self.frozen_model_sources(),
            "rng": per_rank[0],
        }
        if len(per_rank) > 1:
            checkpoint["rlt_pl"]["rng_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rlt_pl", {})
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        # Applied right before the next training batch, not here: Lightning draws from the global RNG between
        # restoring and training (sanity check, dataloader iterators), which an uninterrupted run did earlier.
        rank, n = world()
        per_rank = state.get("rng_per_rank")
        self._pending_rng = per_rank[rank] if per_rank is not None and len(per_rank) == n else state.get("rng")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng)
            self._pending_rng = None

    def on_validation_start(self) -> None:
        # Validation samples too; set the training RNG stream aside so training (and resume) does not depend on
        # when or whether validation runs.
        self._rng_before_val = collect_rng_states()

    def on_validation_end(self) -> None:
        if self._rng_before_val is not None:
            restore_rng_states(self._rng_before_val)
            self._rng_before_val = None

    def frozen_model_sources(self) -> dict[str, str]:
        """Frozen models that are re-loaded on resume instead of stored."""
        out = {}
        if self.ref_model is not None and not self.reference_is_trained():
            out["reference"] = self.model_config.name_or_path
        return out

    def reference_is_trained(self) -> bool:
        """Whether the reference's weights differ from its source (TR-DPO sync): then it is checkpointed."""
        return self.ref_synced

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if not self.reference_is_trained():
            for k in [k for k in state if k.startswith("ref_model.")]:
                del state[k]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        has_ref = any(k.startswith("ref_model.") for k in state_dict)
        if self.ref_model is not None and not has_ref:
            strict = False
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


__all__ = [
    "GRPOModule",
    "Reward",
    "RewardResult",
    "TaskReward",
]
