"""Scenarios run by `tests/test_multiprocess.py` in 1 or 2 processes (gloo on CPU), one launch for several scenarios.

Run by hand: `python tests/multiprocess_runs.py OUT_DIR ASSETS_DIR SCENARIO[,SCENARIO...]` with the usual
`RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT` environment (`launch` in the test sets it). Each scenario writes
`OUT_DIR/<scenario>/rank<r>.json` (per-step metrics and per-rank facts) and, from rank 0, `weights.pt` (the full
trained state dict, gathered from the shards by every rank).

Generation is made independent of how prompts are split over ranks: `PromptSeededEngine` seeds HF `generate` per
prompt (with a per-prompt length limit, so completion lengths differ across ranks) and `ScriptedEngine` returns
fixed completions (one of them a non-canonical tokenization, so one rank re-scores a token-mismatch row).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from rlt_pl.callbacks import StudentRewardCallback
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.distributed import FSDP2Strategy, full_state_dict, world
from rlt_pl.formats import CompactFormat, StratosFormat
from rlt_pl.generation import GenerationOutput, HFGenerationEngine, SamplingConfig, completion_mask_from_ids
from rlt_pl.grpo import PolicyLossConfig
from rlt_pl.models import LoraConfig, ModelConfig
from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult
from rlt_pl.modules.sft import StudentDistillModule
from rlt_pl.modules.teacher_rl import TeacherRLModule

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))  # read once: Lightning's teardown deletes it


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def _merge(outs: list[GenerationOutput], pad: int) -> GenerationOutput:
    prompts = [r[m.bool()].tolist() for o in outs for r, m in zip(o.prompt_ids, o.prompt_mask)]
    comps = [r.tolist() for o in outs for r in o.completion_ids]
    p_ids, p_mask = _pad(prompts, pad, left=True)
    c_ids, _ = _pad(comps, pad, left=False)
    width = c_ids.shape[1]
    c_mask = torch.cat(
        [torch.nn.functional.pad(o.completion_mask, (0, width - o.completion_mask.shape[1])) for o in outs]
    )
    return GenerationOutput(
        p_ids,
        p_mask,
        c_ids,
        c_mask,
        [t for o in outs for t in o.texts],
        torch.cat([o.finished for o in outs]),
        [p for o in outs for p in o.prompts],
    )


class PromptSeededEngine(HFGenerationEngine):
    """HF generate, one call per prompt, seeded by the prompt; a length limit of 2–12 tokens drawn per prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []  # this rank's completion width per call

    def generate(self, model, tokenizer, prompts, n, sampling):
        outs = []
        for p in prompts:
            key = zlib.crc32(p.encode())
            torch.manual_seed(key)
            s = SamplingConfig(**{**sampling.__dict__, "max_new_tokens": 2 + key % 11})
            outs.append(super().generate(model, tokenizer, [p], n, s))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        merged = _merge(outs, pad)
        self.widths.append(merged.completion_ids.shape[1])
        return merged


class ScriptedEngine(HFGenerationEngine):
    """Fixed teacher completions of uneven length; the prompt of `split_question` gets one merged token split."""

    def __init__(self, split_question: str) -> None:
        super().__init__()
        self.split_question = split_question
        self.split_rows = 0  # non-canonical rows this rank produced

    def generate(self, model, tokenizer, prompts, n, sampling):
        eos = tokenizer.eos_token_id
        prompt_rows, comp_rows, texts = [], [], []
        for p in prompts:
            for j in range(n):
                words = " ".join(["we add the digits"] * (1 + (zlib.crc32(p.encode()) + j) % 3))
                ids = tokenizer(words + " <|end_of_explanation|>", add_special_tokens=False)["input_ids"]
                if self.split_question in p and j == 0:
                    k = next(i for i, t in enumerate(ids) if len(tokenizer.convert_ids_to_tokens(t)) == 2)
                    halves = tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(ids[k])))
                    ids = ids[:k] + halves + ids[k + 1 :]
                    self.split_rows += 1
                prompt_rows.append(tokenizer(p, add_special_tokens=False)["input_ids"])
                comp_rows.append(ids + [eos])
                texts.append(tokenizer.decode(ids + [eos], skip_special_tokens=True))
        p_ids, p_mask = _pad(prompt_rows, tokenizer.pad_token_id, left=True)
        c_ids, c_pad = _pad(comp_rows, tokenizer.pad_token_id, left=False)
        c_mask = completion_mask_from_ids(c_ids, [eos], c_pad)
        finished = torch.ones(len(texts), dtype=torch.bool)
        return GenerationOutput(p_ids, p_mask, c_ids, c_mask, texts, finished, [p for p in prompts for _ in range(n)])


class DigitsReward(Reward):
    """Fraction of digit characters in the completion (varies within every group of a random tiny model)."""

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        frac = [sum(c.isdigit() for c in t) / max(len(t), 1) for t in gen.texts]
        return RewardResult(torch.tensor(frac), {"digits": torch.tensor(frac)})


class Recorder(L.Callback):
    """Per-step metrics (identical on all ranks when reduced) and per-rank facts."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.local: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.detach().cpu().clone() for k, v in (full_state_dict(pl_module.model) or {}).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.local.append({"ids": [r["id"] for r in batch]})


class EqualLengthAdditions(AdditionDataModule):
    """Additions whose sum has 3 digits: every row has the same number of completion tokens."""

    def _load_raw(self) -> list:
        return [r for r in super()._load_raw() if len(r["answer"]) == 3]


def _strategy(kind: str):
    if kind == "fsdp":
        return FSDP2Strategy()
    if kind == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    return "auto"


def _trainer(kind: str, steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=_strategy(kind),
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        log_every_n_steps=1,  # GRPO step metrics are logged on logging steps
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{"limit_val_batches": 0} | kwargs,
    )


def _finish(out: Path, module, rec: Recorder, extra: dict | None = None) -> None:
    rank, n = world()
    out.mkdir(parents=True, exist_ok=True)
    state = full_state_dict(module.model)  # collective under FSDP2
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / "weights.pt")
        torch.save(rec.initial, out / "initial.pt")
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.model.parameters())
    full = sum(p.numel() for p in module.model.parameters())  # a DTensor's numel is its global size
    facts = {"world_size": n, "steps": rec.steps, "local": rec.local, "local_numel": local, "full_numel": full}
    facts |= extra or {}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


def grpo(out: Path, assets: Path, kind: str, lora: bool = False, steps: int = 3, resume: str | None = None) -> None:
    L.seed_everything(0)
    module = GRPOModule(
        ModelConfig(
            str(assets / "compact" / "teacher"), dtype="float32", lora=LoraConfig(r=4, dropout=0.0) if lora else None
        ),
        reward=DigitsReward(),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=3,
        lr=1e-2,
        loss=PolicyLossConfig(beta=0.04),
        reference="adapter" if lora else "copy",
        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0),
        engine=PromptSeededEngine(),
        sample_table_every_n_steps=0,
        export_dir=str(out / "export") if lora else None,  # the LoRA adapter
    )
    rec = Recorder()
    callbacks: list = [rec]
    if resume is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1)
        )
    trainer = _trainer(kind, steps, callbacks, enable_checkpointing=resume is not None)
    data = AdditionDataModule(num_train=64, num_heldout=4, batch_size=4)
    ckpt = None
    if resume == "resume":
        ckpt = str(out / "ckpt" / "epoch=0-step=2.ckpt")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    _finish(out, module, rec, {"widths": module.engine.widths})


def teacher_rl(out: Path, assets: Path, kind: str) -> None:
    L.seed_everything(0)
    data = AdditionDataModule(num_train=64, num_heldout=4, batch_size=4)
    data.setup("fit")
    split_q = data.rows_for("train")[_global_first_batch(data)[3]]["question"]  # last row of the global batch
    module = TeacherRLModule(
        ModelConfig(str(assets / "tiny" / "teacher"), dtype="float32"),
        format=StratosFormat(),
        num_generations=2,
        micro_batch_size=2,
        lr=1e-2,
        sampling=SamplingConfig(max_new_tokens=16, temperature=0.7),
        engine=ScriptedEngine(split_q),
        sample_table_every_n_steps=0,
    )
    student = StudentRewardCallback(ModelConfig(str(assets / "tiny" / "student"), dtype="float32"))
    rec = Recorder()
    trainer = _trainer(kind, 2, [student, rec], enable_checkpointing=False)
    trainer.fit(module, datamodule=AdditionDataModule(num_train=64, num_heldout=4, batch_size=4))
    _finish(out, module, rec, {"split_question": split_q, "split_rows": module.engine.split_rows})


def _global_first_batch(data) -> list[int]:
    from rlt_pl.datamodules.samplers import EpochShuffleSampler

    return list(EpochShuffleSampler(len(data.rows_for("train")), data.seed))[:4]


def sft(out: Path, assets: Path, kind: str, equal: bool = True, export: bool = False) -> None:
    L.seed_everything(0)
    module = StudentDistillModule(
        ModelConfig(str(assets / "compact" / "student"), dtype="float32"),
        format=CompactFormat(),
        lr=1e-2,
        max_length=64,
        export_dir=str(out / "export") if export else None,
    )
    cls = EqualLengthAdditions if equal else AdditionDataModule
    mix = None if equal else {"good": 0.5, "none": 0.25, "leak": 0.25}
    rec = Recorder()
    trainer = _trainer(kind, 3, [rec], enable_checkpointing=False)
    trainer.fit(module, datamodule=cls(num_train=64, num_heldout=4, batch_size=4, explanation_mix=mix))
    _finish(out, module, rec)


def evaluate(out: Path, assets: Path, kind: str) -> None:
    """`validate` on 5 held-out questions (global batch 2: the last batch has a padding row)."""
    module = StudentDistillModule(
        ModelConfig(str(assets / "compact" / "student"), dtype="float32"),
        format=CompactFormat(),
        eval_sampling=SamplingConfig(max_new_tokens=6, temperature=0.0),
        eval_output_dir=str(out / "evals"),
    )
    trainer = _trainer(kind, 1, [], enable_checkpointing=False, limit_val_batches=1.0)
    metrics = trainer.validate(module, datamodule=AdditionDataModule(num_train=8, num_heldout=5, batch_size=2))[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{world()[0]}.json").write_text(json.dumps({"metrics": metrics}))


def traces(out: Path, assets: Path, kind: str) -> None:
    """`predict` of teacher traces for 5 rows (global batch 2: the last batch has a padding row)."""
    from rlt_pl.callbacks.trace_writer import TraceWriter
    from rlt_pl.modules.sft import TeacherSFTModule

    module = TeacherSFTModule(
        ModelConfig(str(assets / "compact" / "teacher"), dtype="float32"),
        format=CompactFormat(),
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.7),
    )
    writer = TraceWriter(str(out / "traces"))
    trainer = _trainer(kind, 1, [writer], enable_checkpointing=False)
    trainer.predict(
        module, datamodule=AdditionDataModule(num_train=5, num_heldout=2, batch_size=2), return_predictions=False
    )


SCENARIOS = {
    "grpo": lambda o, a, k: grpo(o, a, k),
    "grpo_lora": lambda o, a, k: grpo(o, a, k, lora=True),
    "grpo_ckpt": lambda o, a, k: grpo(o, a, k, steps=2, resume="save"),
    "grpo_resume": lambda o, a, k: grpo(o, a, k, steps=3, resume="resume"),
    "teacher_rl": teacher_rl,
    "sft": sft,
    "distill_export": lambda o, a, k: sft(o, a, k, equal=False, export=True),
    "eval": evaluate,
    "traces": traces,
}


def main() -> None:
    out, assets, jobs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    for job in jobs:  # "<scenario>:<kind>[:<dir>]", kind in single/fsdp/ddp
        name, kind, *rest = job.split(":")
        SCENARIOS[name](out / (rest[0] if rest else f"{name}_{kind}"), assets, kind)
    if world()[1] > 1:
        torch.distributed.barrier()  # no rank exits while another still reads shared files


if __name__ == "__main__":
    import faulthandler

    # a collective hang prints every thread's stack and exits instead of blocking (the test also has a timeout)
    faulthandler.dump_traceback_later(float(os.environ.get("RLT_HANG_SECONDS", "240")), exit=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    main()
