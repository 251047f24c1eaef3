"""B2: one GRPO optimizer step, rlt_pl `GRPOModule` vs TRL `GRPOTrainer`, same model, data, G, lengths and β.

Both load the same tiny Qwen2 directory whose `generation_config.json` sets `min_new_tokens = max_new_tokens` (fixed
completion length), sample with HF `generate` at T = 0.7, use a toy reward (share of digit characters), fp32, CPU,
one micro-batch per step, constant LR, grad-norm clip 1.0. Prompts all have the same token length, so neither side
pads them (TRL derives positions from `arange`, rlt_pl from the mask; equal without padding).

Both sides log at the same cadence (`log_every`: Lightning's `log_every_n_steps`, TRL's `logging_steps`). Step time is
wall time per optimizer step (median after warm-up), measured by a callback on each side; rlt_pl also reports its own
split (`time/generate`, `time/logprobs`, `time/reward`, `time/loss`). On a shared machine the load drifts within
minutes, so the two sides run in alternating rounds (rlt_pl, TRL, rlt_pl, TRL, ...) and the reported ratio is the
median of the per-round ratios. The first-step loss is compared
on TRL's own tensors: inside TRL's `compute_loss` of step 1 we run rlt_pl's forward (`token_logprobs`) and
`rlt_pl.grpo.policy_loss` on TRL's completions, reference log-probs and advantages, and compare the loss and its
gradient w.r.t. every parameter (at step 1 the loss value is ~0: ratio 1, zero-mean advantages, KL 0, so the
gradient is the informative part); rlt_pl's `group_advantages` on the rewards TRL's reward function received is
compared with TRL's advantages as sorted multisets (TRL shuffles the batch before the loss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import SHORT_STUDENT_PROMPT, load_tokenizer

BETA = 0.04
TEMPERATURE = 0.7
LR = 1e-4


def digit_share(text: str) -> float:
    """Toy reward: the share of digit characters in a completion."""
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


def fixed_length_model(src: str | Path, dst: str | Path, new_tokens: int) -> Path:
    """Copy a model dir and force `min_new_tokens = max_new_tokens = new_tokens` in its generation config.

    Args:
        src: source model dir.
        dst: destination dir.
        new_tokens: completion length.
    """
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    path.write_text(json.dumps(cfg, indent=2))
    return dst


def make_prompts(tokenizer, n: int) -> tuple[list[dict], list[str]]:
    """`n` questions of identical token length and their rendered student prompts.

    Args:
        tokenizer: the shared tokenizer.
        n: number of prompts.
    """
    from benchmarks import short_format

    fmt = short_format()
    rows = [{"question": f"What is {100 + 37 * i} + {200 + 11 * i}?"} for i in range(n)]
    prompts = [fmt.student_prompt(r["question"], tokenizer) for r in rows]
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"B2 prompts must have one token length (no padding), got {sorted(lengths)}")
    return rows, prompts


# ------------------------------------------------------------------ rlt_pl
def run_rlt_pl(model_dir: Path, rows: list[dict], group: int, new_tokens: int, steps: int, log_every: int = 1) -> dict:
    """GRPOModule steps on `rows` (all prompts in one step); returns step times and the module's split."""
    import lightning as L
    from torch.utils.data import DataLoader

    from benchmarks import short_format
    from rlt_pl.datamodules.loader import collate_rows
    from rlt_pl.generation import SamplingConfig
    from rlt_pl.grpo import PolicyLossConfig
    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult

    class DigitReward(Reward):
        def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
            return RewardResult(torch.tensor([digit_share(t) for t in gen.texts]))

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.split: list[dict[str, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            if len(self.times) % log_every == 0:  # the split is logged on logging steps (one batch per epoch here)
                m = trainer.callback_metrics
                self.split.append({k[5:]: float(v) for k, v in m.items() if k.startswith("time/")})

    module = GRPOModule(
        model=ModelConfig(name_or_path=str(model_dir), dtype="float32"),
        format=short_format(),
        reward=DigitReward(),
        num_generations=group,
        micro_batch_size=len(rows) * group,
        loss=PolicyLossConfig(beta=BETA),
        lr=LR,
        sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=TEMPERATURE),
        sample_table_every_n_steps=0,
    )
    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader(rows, batch_size=len(rows), collate_fn=collate_rows)
    trainer.fit(module, loader)
    return {"step_times": timer.times, "cpu_times": timer.cpu, "split": timer.split}


# ------------------------------------------------------------------ TRL
def run_trl(
    model_dir: Path, prompts: list[str], group: int, new_tokens: int, steps: int, out_dir: Path, log_every: int = 1
) -> dict:
    """GRPOTrainer steps; returns step times and the step-1 loss comparison on TRL's tensors."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlt_pl.grpo import PolicyLossConfig, group_advantages, policy_loss
    from rlt_pl.rewards import token_logprobs

    seen_rewards: list[list[float]] = []

    def reward_fn(prompts, completions, **kwargs) -> list[float]:
        r = [digit_share(c) for c in completions]
        seen_rewards.append(r)
        return r

    compare: dict = {}

    class Trainer(GRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not compare:
                params = [q for q in model.parameters() if q.requires_grad]
                g_trl = torch.autograd.grad(loss, params, retain_graph=True)
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
                attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
                c = inputs["completion_ids"].shape[1]
                pos = (attn.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=c + 1).logits
                lp = token_logprobs(logits, ids[:, -(c + 1) :], TEMPERATURE)[:, 1:]
                ref = inputs.get("ref_per_token_logps")
                ours = policy_loss(
                    lp, None, ref, inputs["advantages"], inputs["completion_mask"], PolicyLossConfig(beta=BETA)
                )
                g_ours = torch.autograd.grad(ours.loss, params)
                # TRL shuffles the generation batch before the loss: compare advantages as sorted multisets.
                adv = group_advantages(torch.tensor(seen_rewards[0]), group).sort().values
                compare.update(
                    trl_loss=float(loss.detach()),
                    rlt_pl_loss=float(ours.loss.detach()),
                    loss_abs_diff=abs(float(loss.detach()) - float(ours.loss.detach())),
                    grad_max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(g_trl, g_ours)),
                    grad_norm=float(torch.stack([g.norm() for g in g_trl]).norm()),
                    advantage_max_abs_diff=float((adv - inputs["advantages"].float().sort().values).abs().max()),
                    completion_tokens=int(inputs["completion_mask"].sum()),
                )
            return loss

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    n = len(prompts) * group
    config = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=group,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=TEMPERATURE,
        top_p=1.0,
        beta=BETA,
        loss_type="grpo",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=log_every,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": prompts * steps * 2})
    timer = Timer()
    trainer = Trainer(
        model=model,
        reward_funcs=reward_fn,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return {"step_times": timer.times, "cpu_times": timer.cpu, "compare": compare}


def run(
    assets: dict,
    work_dir: str | Path,
    n_prompts: int = 2,
    group: int = 8,
    new_tokens: int = 32,
    steps: int = 4,
    rounds: int = 1,
    log_every: int = 1,
):
    """Run B2 on the tiny model: `rounds` alternating rlt_pl/TRL runs of `steps` steps each; the first step of every
    run is warm-up, the median of the rest is that run's step time.

    Args:
        assets: `benchmarks.build_assets(...)` output (uses `tiny/teacher`).
        work_dir: scratch directory.
        n_prompts: prompts per step.
        group: G.
        new_tokens: fixed completion length.
        steps: optimizer steps per run (>= 2).
        rounds: alternating rounds (>= 1); the ratio is the median of the per-round ratios.
        log_every: logging cadence of both sides.
    """
    if steps < 2:
        raise ValueError("B2 needs steps >= 2 (one warm-up step)")
    if rounds < 1 or log_every < 1:
        raise ValueError(f"B2 needs rounds >= 1 and log_every >= 1, got {rounds} and {log_every}")
    work_dir = Path(work_dir)
    model_dir = fixed_length_model(assets["tiny"]["teacher"], work_dir / "b2_model", new_tokens)
    tokenizer = load_tokenizer(model_dir)
    rows, prompts = make_prompts(tokenizer, n_prompts)
    load_start = os.getloadavg()
    ours_t, trl_t, ratios, cpu_ratios, splits, compare = [], [], [], [], [], None
    for _ in range(rounds):
        ours = run_rlt_pl(model_dir, rows, group, new_tokens, steps, log_every)
        theirs = run_trl(model_dir, prompts, group, new_tokens, steps, work_dir / "b2_trl", log_every)
        compare = compare or theirs["compare"]
        a, b = statistics.median(ours["step_times"][1:]), statistics.median(theirs["step_times"][1:])
        ours_t.append(a)
        trl_t.append(b)
        ratios.append(a / b)
        cpu_ratios.append(statistics.median(ours["cpu_times"][1:]) / statistics.median(theirs["cpu_times"][1:]))
        splits += ours["split"][1:] if log_every == 1 else ours["split"]
    split = {k: statistics.median(s[k] for s in splits) for k in splits[-1]} if splits else {}
    return {
        "setup": {
            "prompts_per_step": n_prompts,
            "G": group,
            "completion_tokens": new_tokens,
            "steps": steps,
            "rounds": rounds,
            "log_every": log_every,
            "beta": BETA,
            "temperature": TEMPERATURE,
            "torch_threads": torch.get_num_threads(),
            "system_prompt": SHORT_STUDENT_PROMPT,
        },
        "rlt_pl_step_s": statistics.median(ours_t),
        "trl_step_s": statistics.median(trl_t),
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "cpu_ratio": statistics.median(cpu_ratios),
        "round_cpu_ratios": cpu_ratios,
        "load_avg": {"start": load_start, "end": os.getloadavg()},
        "rlt_pl_split_s": split,
        "compare": compare,
    }


def update_results(b2: dict, out: Path) -> None:
    """Replace the B2 section and B2 targets of `out/RESULTS.md` and `out/results.json` with `b2`.

    Args:
        b2: `run(...)` output.
        out: directory holding RESULTS.md and results.json (as written by `benchmarks.run`).
    """
    from benchmarks.run import render_b2

    md = (out / "RESULTS.md").read_text()
    start = md.index("## B2 ")
    end = md.index("\n## ", start) + 1
    md = md[:start] + "\n".join(render_b2(b2)) + "\n" + md[end:]
    targets = {"b2_step_time_vs_trl": b2["ratio"], "b2_first_loss_abs_diff": b2["compare"]["loss_abs_diff"]}
    lines = md.split("\n")
    for key, value in targets.items():
        lines = [f"| {key} | {value:.4g} |" if line.startswith(f"| {key} |") else line for line in lines]
    md = "\n".join(lines)
    (out / "RESULTS.md").write_text(md)
    data = json.loads((out / "results.json").read_text())
    data["targets"]["b2_step_time_vs_trl"] = b2["ratio"]
    data["targets"]["b2_first_loss_abs_diff"] = b2["compare"]["loss_abs_diff"]
    data["details"]["b2"] = b2
    (out / "results.json").write_text(json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.b2_grpo_vs_trl [--rounds R] [--steps S] [--threads N] [--out benchmarks]`."""
    from benchmarks import build_assets, set_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rlt_pl/TRL rounds")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--log-every", type=int, default=1, help="logging cadence of both sides")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: benchmarks.THREADS)")
    parser.add_argument("--work", default=None, help="scratch dir (default: $TMPDIR/rlt_pl_bench)")
    parser.add_argument("--out", default=None, help="update the B2 section of OUT/RESULTS.md and OUT/results.json")
    args = parser.parse_args(argv)
    set_threads(*(() if args.threads is None else (args.threads,)))
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / "rlt_pl_bench"
    assets = build_assets(work / "models", ("tiny",))
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs: keep stdout for the JSON
        b2 = run(assets, work, steps=args.steps, rounds=args.rounds, log_every=args.log_every)
    if args.out:
        update_results(b2, Path(args.out))
    print(json.dumps(b2, indent=2))


if __name__ == "__main__":
    main()
