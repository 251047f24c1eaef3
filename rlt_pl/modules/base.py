"""Shared LightningModule plumbing for causal LMs: loading in `configure_model`, optimizer, schedule, export.

`__init__` stays cheap (no weights), so every YAML can be instantiated in a test; the model is born in
`configure_model` (idempotent, so FSDP can build it sharded) and the tokenizer in `setup`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rlt_pl.distributed import full_state_dict, shard_model
from rlt_pl.formats import RLTFormat, StratosFormat
from rlt_pl.generation import GenerationEngine, HFGenerationEngine, SamplingConfig
from rlt_pl.models import ModelConfig, export_model, load_causal_lm, load_tokenizer
from rlt_pl.optim import build_scheduler, weight_decay_groups
from rlt_pl.paths import check_writable_dir

_HALF = (torch.bfloat16, torch.float16)


def check_master_weights(params: Sequence[torch.nn.Parameter], dtype_flag: str) -> None:
    """Refuse to train bf16/fp16 parameters: AdamW on them keeps no fp32 master copy and loses almost every small
    update (lr 1e-6, 3 GRPO steps on a tiny model: 1.9% of the weights moved; with fp32 weights: all of them).
    The paper's setting is fp32 weights with bf16 compute (`model.dtype: float32`, `trainer.precision: bf16-mixed`);
    LoRA adapters stay fp32 (peft) and quantized bases are frozen. Checked when `fit` starts, before any step
    (predict/test may load bf16 weights).

    Args:
        params: the trainable parameters after the precision plugin has converted the model.
        dtype_flag: `model.dtype` as configured, named in the error.
    """
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in _HALF})
    if low:
        raise ValueError(
            f"trainable parameters are {', '.join(low)} (model.init_args.model.dtype={dtype_flag}, or "
            "trainer.precision *-true): the optimizer has no fp32 master weights and drops updates below half an "
            "ulp; set model.init_args.model.dtype: float32 and trainer.precision: bf16-mixed"
        )


class CausalLMModule(LightningModule):
    """Base for the rlt_pl modules.

    Args:
        model: how to load the trained model.
        format: the RLT text format (tags, prompts).
        lr: learning rate of the default optimizer (AdamW).
        betas: AdamW betas of the default optimizer.
        weight_decay: AdamW weight decay of the default optimizer (not applied to biases and norm weights).
        optimizer: an optimizer given by `class_path` (e.g. `rlt_pl.optim.AdamW8bit`); replaces the default AdamW.
        lr_schedule: constant, cosine or linear decay.
        warmup_ratio: fraction of the total steps used for linear warmup.
        engine: generation engine (HF generate by default).
        sampling: sampling settings for generation.
        export_dir: where to write a Hugging Face checkpoint of the trained model at the end of `fit`.
        merge_lora_on_export: export a merged checkpoint instead of the LoRA adapter (a 4-bit base: dequantised,
            merged out of place, saved as a plain bf16 checkpoint).
    """

    def __init__(
        self,
        model: ModelConfig,
        format: RLTFormat | None = None,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: Literal["constant", "cosine", "linear"] = "constant",
        warmup_ratio: float = 0.0,
        engine: GenerationEngine | None = None,
        sampling: SamplingConfig | None = None,
        export_dir: str | None = None,
        merge_lora_on_export: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < lr < float("inf"):
            raise ValueError(f"model.init_args.lr must be finite and > 0, got {lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"model.init_args.betas must be two values in [0, 1), got {tuple(betas)}")
        if not 0 <= weight_decay < float("inf"):
            raise ValueError(f"model.init_args.weight_decay must be finite and >= 0, got {weight_decay}")
        if lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"model.init_args.lr_schedule must be constant, cosine or linear, got {lr_schedule!r}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"model.init_args.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if merge_lora_on_export and model.quantization == "8bit":
            raise ValueError(
                "model.init_args.merge_lora_on_export=true supports a model.quantization='4bit' base (dequantised "
                "and merged into a plain bf16 checkpoint), not '8bit'; export the adapter (merge_lora_on_export: false)"
            )
        model.validate()
        if export_dir:
            check_writable_dir(export_dir, "model.init_args.export_dir")  # not after all the training
        self.model_config = model
        self.format = format or StratosFormat()
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.optimizer_fn = optimizer
        self.lr_schedule, self.warmup_ratio = lr_schedule, warmup_ratio
        self.engine = engine or HFGenerationEngine()
        self.sampling = sampling or SamplingConfig()
        self.engine.check_sampling(self.sampling)
        self.export_dir = export_dir
        self.merge_lora_on_export = merge_lora_on_export
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.skipped_long_prompts = 0  # prompts over sampling.max_prompt_tokens, skipped (never a crash mid-run)

    # ---------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "trainer.strategy FSDPStrategy (FSDP1) is not supported: it runs training_step inside the root FSDP "
                "forward, where GRPO's manual backward fails, and its export needs a different gather. Use "
                "trainer.strategy rlt_pl.distributed.FSDP2Strategy (configs/trainer/fsdp.yaml) or DDPStrategy"
            )
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_config.name_or_path, self.model_config.trust_remote_code)
            if self.format.use_chat_template and not self.tokenizer.chat_template:
                raise ValueError(
                    f"tokenizer of {self.model_config.name_or_path} has no chat template but format "
                    f"{type(self.format).__name__} needs one (set format.use_chat_template: false or use a chat model)"
                )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.shard(load_causal_lm(self.model_config, trainable=True))

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under `rlt_pl.distributed.FSDP2Strategy` (a device mesh is set), `fully_shard` each decoder layer and the
        root; otherwise (one process, DDP) the model is returned as is.

        Each rank loads the full checkpoint into host memory first (transformers' loader), then `fully_shard` keeps
        only this rank's shard of every parameter and frees the rest.
        """
        mesh = self._device_mesh
        if mesh is None:
            return model
        return shard_model(model, mesh["data_parallel"])

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode
        check_master_weights(self.trainable_parameters(), self.model_config.dtype)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        # biases and norm weights are not decayed (as the HF Trainer does); a class_path optimizer keeps its own
        # weight_decay for the other group
        if self.optimizer_fn is not None:
            opt = self.optimizer_fn(weight_decay_groups(self.model))
        else:
            groups = weight_decay_groups(self.model, self.weight_decay)
            opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=1e-8)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        total = int(total) if total is not None and total != float("inf") else None
        sched = build_scheduler(opt, self.lr_schedule, warmup_ratio=self.warmup_ratio, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if not self.export_dir:
            return
        # Every rank takes part in gathering a sharded state dict; rank 0 writes; the others wait for the files.
        state = full_state_dict(self.model) if self._device_mesh is not None else None
        if self.trainer.is_global_zero:
            out = export_model(
                self.model, self.tokenizer, self.export_dir, merge_lora=self.merge_lora_on_export, state_dict=state
            )
            rank_zero_info(f"exported model to {out}")
        self.trainer.strategy.barrier("export")

    # ---------------------------------------------------------------- helpers
    def prompts_within_limit(
        self, prompts: Sequence[str], sampling: SamplingConfig | None = None
    ) -> tuple[list[int], list[str]]:
        """Over-long prompts (beyond `sampling.max_prompt_tokens`) are counted in `skipped_long_prompts` instead of
        stopping the run: one long dataset row must not end a training job.

        With one process they are skipped. With several, every rank must keep the same number of rows (the same
        generate and forward calls), so they are cut to their last `max_prompt_tokens - 8` tokens instead.

        Returns:
            indices of the rows kept and their prompts.
        """
        limit = (sampling or self.sampling).max_prompt_tokens
        if limit is None or not prompts:
            return list(range(len(prompts))), list(prompts)
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if not long:
            return list(range(len(prompts))), list(prompts)
        self.skipped_long_prompts += len(long)
        several_ranks = self._trainer is not None and self.trainer.world_size > 1
        action = "cut to their tail" if several_ranks else "skipped"
        rank_zero_warn(
            f"{len(long)} prompt(s) over sampling.max_prompt_tokens={limit} {action} "
            f"({self.skipped_long_prompts} so far)"
        )
        if several_ranks:
            out = list(prompts)
            for i in long:  # a margin of 8 tokens: re-encoding the decoded tail may merge differently
                out[i] = self.tokenizer.decode(encoded[i][-(limit - 8) :], skip_special_tokens=False)
            return list(range(len(prompts))), out
        keep = [i for i in range(len(prompts)) if i not in set(long)]
        return keep, [prompts[i] for i in keep]

    def generate(self, prompts: Sequence[str], n: int = 1, sampling: SamplingConfig | None = None):
        return self.engine.generate(self.model, self.tokenizer, prompts, n, sampling or self.sampling)

    def lineage(self, extra: dict | None = None) -> dict:
        """Where generated data came from: model path + hash, sampling settings, format, time (+ `extra`)."""
        path = self.model_config.name_or_path
        info = {
            "model": path,
            "model_sha256": file_digest(path) if Path(path).exists() else None,
            "sampling": asdict(self.sampling),
            "format": type(self.format).__name__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        info.update(extra or {})
        return info

    def log_text(self, tag: str, text: str) -> None:
        """Write a text entry to TensorBoard (no-op for loggers without `add_text`)."""
        logger = self.logger
        experiment = getattr(logger, "experiment", None) if logger is not None else None
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, global_step=self.global_step)


def markdown_table(rows: Sequence[dict], max_chars: int = 400) -> str:
    """A small markdown table for TensorBoard's text plugin."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(v) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        s = s.replace("|", "\\|").replace("\n", "⏎")
        return s[:max_chars] + ("…" if len(s) > max_chars else "")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def file_digest(path: str | Path, limit_bytes: int = 1 << 26) -> str:
    """SHA-256 of a file or of a directory's weight/config files (first `limit_bytes` of each), for lineage."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".ckpt", ".pt"}:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                h.update(fh.read(limit_bytes))
    return h.hexdigest()[:16]
