"""Config scenarios: each flag given a bad value, at construction (the typed `__init__` / dataclass schema) and
through the CLI (`rlt_pl.cli.cli_main(..., run=False)`: parse and build, no run)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from benchmarks.scenarios import Scenario

NAN, INF = float("nan"), float("inf")
UNWRITABLE = "/proc/rlt_pl_unwritable/out"
ROOT = Path(__file__).resolve().parents[2]


def _direct(dirs: dict, cdirs: dict, tmp: Path) -> list[tuple[str, Callable[[], object], tuple[str, ...]]]:
    from rlt_pl.callbacks.ref_sync import ReferenceSyncCallback
    from rlt_pl.callbacks.shutdown import GracefulShutdown
    from rlt_pl.callbacks.student_reward import StudentRewardCallback
    from rlt_pl.callbacks.trace_writer import TraceWriter
    from rlt_pl.datamodules.addition import AdditionDataModule
    from rlt_pl.datamodules.cold_start import ColdStartDataModule
    from rlt_pl.datamodules.countdown import CountdownDataModule
    from rlt_pl.datamodules.math500 import MATH500DataModule
    from rlt_pl.datamodules.traces import TracesDataModule
    from rlt_pl.generation import SamplingConfig
    from rlt_pl.grpo import PolicyLossConfig
    from rlt_pl.models import LoraConfig, ModelConfig
    from rlt_pl.modules.grpo import GRPOModule
    from rlt_pl.modules.sft import StudentDistillModule, TeacherSFTModule
    from rlt_pl.rewards import RewardConfig

    m = lambda **kw: ModelConfig(str(dirs["teacher"]), **kw)  # noqa: E731
    student = ModelConfig(str(dirs["student"]))
    grpo = lambda **kw: GRPOModule(m(), num_generations=4, **kw)  # noqa: E731
    sft = lambda model=None, **kw: TeacherSFTModule(model or m(), **kw)  # noqa: E731
    afile = tmp / "afile"
    afile.write_text("x")
    S, R, L, P = "sampling.", "RewardConfig.", "model.lora.", "PolicyLossConfig."
    cases = [
        # SamplingConfig
        ("SamplingConfig temperature=nan", lambda: SamplingConfig(temperature=NAN), (S + "temperature",)),
        ("SamplingConfig temperature=inf", lambda: SamplingConfig(temperature=INF), (S + "temperature",)),
        ("SamplingConfig temperature=-1", lambda: SamplingConfig(temperature=-1.0), (S + "temperature",)),
        ("SamplingConfig top_p=0", lambda: SamplingConfig(top_p=0.0), (S + "top_p",)),
        ("SamplingConfig top_p=nan", lambda: SamplingConfig(top_p=NAN), (S + "top_p",)),
        ("SamplingConfig top_k=0", lambda: SamplingConfig(top_k=0), (S + "top_k",)),
        ("SamplingConfig top_k=-1", lambda: SamplingConfig(top_k=-1), (S + "top_k",)),
        ("SamplingConfig min_p=1", lambda: SamplingConfig(min_p=1.0), (S + "min_p",)),
        ("SamplingConfig repetition_penalty=nan", lambda: SamplingConfig(repetition_penalty=NAN), (S + "repetition",)),
        ("SamplingConfig repetition_penalty=inf", lambda: SamplingConfig(repetition_penalty=INF), (S + "repetition",)),
        ("SamplingConfig max_new_tokens=0", lambda: SamplingConfig(max_new_tokens=0), (S + "max_new_tokens",)),
        ("SamplingConfig max_prompt_tokens=0", lambda: SamplingConfig(max_prompt_tokens=0), (S + "max_prompt",)),
        # ModelConfig / LoraConfig
        ("ModelConfig name_or_path=''", lambda: TeacherSFTModule(ModelConfig("")), ("name_or_path",)),
        ("ModelConfig dtype='float17'", lambda: TeacherSFTModule(m(dtype="float17")), ("dtype",)),
        ("ModelConfig quantization='3bit'", lambda: TeacherSFTModule(m(quantization="3bit")), ("quantization",)),
        (
            "ModelConfig flash attention on CPU",
            lambda: sft(model=m(attn_implementation="flash_attention_2")),
            ("attn",),
        ),
        ("LoraConfig r=0", lambda: TeacherSFTModule(m(lora=LoraConfig(r=0))), (L + "r",)),
        ("LoraConfig alpha=0", lambda: TeacherSFTModule(m(lora=LoraConfig(alpha=0))), (L + "alpha",)),
        ("LoraConfig dropout=1.5", lambda: TeacherSFTModule(m(lora=LoraConfig(dropout=1.5))), (L + "dropout",)),
        ("LoraConfig dropout=-0.1", lambda: TeacherSFTModule(m(lora=LoraConfig(dropout=-0.1))), (L + "dropout",)),
        (
            "student ModelConfig dtype bogus",
            lambda: StudentRewardCallback(ModelConfig(str(dirs["student"]), dtype="x")),
            ("student.dtype",),
        ),
        # RewardConfig
        ("RewardConfig penalty_margin=-1", lambda: RewardConfig(penalty_margin=-1.0), (R + "penalty_margin",)),
        ("RewardConfig penalty_margin=nan", lambda: RewardConfig(penalty_margin=NAN), (R + "penalty_margin",)),
        ("RewardConfig penalty_floor=inf", lambda: RewardConfig(penalty_floor=INF), (R + "penalty_floor",)),
        ("RewardConfig teacher_temperature=0", lambda: RewardConfig(teacher_temperature=0.0), (R + "teacher_temp",)),
        ("RewardConfig student_temperature=nan", lambda: RewardConfig(student_temperature=NAN), (R + "student_temp",)),
        (
            "RewardConfig kl_penalty_coeffs=(nan, 0)",
            lambda: RewardConfig(kl_penalty_coeffs=(NAN, 0.0)),
            (R + "kl_pen",),
        ),
        ("RewardConfig coeffs/reductions lengths", lambda: RewardConfig(kl_penalty_coeffs=(3.0,)), (R + "kl_pen",)),
        ("RewardConfig kl_reductions=median", lambda: RewardConfig(kl_reductions=("mean", "median")), (R + "kl_red",)),
        ("RewardConfig not_matched_penalty=+1", lambda: RewardConfig(not_matched_penalty=1.0), (R + "not_matched",)),
        ("RewardConfig clip_kl=0", lambda: RewardConfig(clip_kl=0.0), (R + "clip_kl",)),
        ("RewardConfig clip_log_prob=-1", lambda: RewardConfig(clip_log_prob=-1.0), (R + "clip_log_prob",)),
        ("RewardConfig normalize_kl_fn=bogus", lambda: RewardConfig(normalize_kl_fn="bogus"), (R + "normalize",)),
        # PolicyLossConfig
        ("PolicyLossConfig beta=-1", lambda: PolicyLossConfig(beta=-1.0), (P + "beta",)),
        ("PolicyLossConfig beta=nan", lambda: PolicyLossConfig(beta=NAN), (P + "beta",)),
        ("PolicyLossConfig clip_eps_low=1.5", lambda: PolicyLossConfig(clip_eps_low=1.5), (P + "clip_eps_low",)),
        ("PolicyLossConfig kl_estimator=k2", lambda: PolicyLossConfig(kl_estimator="k2"), (P + "kl_estimator",)),
        ("PolicyLossConfig aggregation=bogus", lambda: PolicyLossConfig(aggregation="bogus"), (P + "aggregation",)),
        # module base flags (TeacherSFTModule)
        ("module lr=-1", lambda: sft(lr=-1.0), ("lr",)),
        ("module lr=nan", lambda: sft(lr=NAN), ("init_args.lr",)),
        ("module lr=inf", lambda: sft(lr=INF), ("init_args.lr",)),
        ("module betas=(1.5, 0.9)", lambda: sft(betas=(1.5, 0.9)), ("betas",)),
        ("module betas=(0.9, -0.1)", lambda: sft(betas=(0.9, -0.1)), ("betas",)),
        ("module weight_decay=-1", lambda: sft(weight_decay=-1.0), ("weight_decay",)),
        ("module weight_decay=nan", lambda: sft(weight_decay=NAN), ("weight_decay",)),
        ("module warmup_ratio=1", lambda: sft(warmup_ratio=1.0), ("warmup_ratio",)),
        ("module lr_schedule=bogus", lambda: sft(lr_schedule="bogus"), ("lr_schedule",)),
        ("module export_dir is a file", lambda: sft(export_dir=str(afile)), ("export_dir",)),
        ("module export_dir unwritable", lambda: sft(export_dir=UNWRITABLE), ("export_dir",)),
        ("TeacherSFTModule max_length=0", lambda: sft(max_length=0), ("max_length",)),
        ("TeacherSFTModule eval_k=(4,) > eval_num_samples", lambda: sft(eval_k=(4,)), ("eval_k",)),
        ("TeacherSFTModule eval_output_dir unwritable", lambda: sft(eval_output_dir=UNWRITABLE), ("eval_output_dir",)),
        (
            "StudentDistillModule log_reward_every_n_steps=-1",
            lambda: StudentDistillModule(m(), log_reward_every_n_steps=-1),
            ("log_reward_every",),
        ),
        # GRPOModule
        ("GRPO num_generations=1", lambda: GRPOModule(m(), num_generations=1), ("num_generations",)),
        ("GRPO num_generations=0", lambda: GRPOModule(m(), num_generations=0), ("num_generations",)),
        ("GRPO temperature=0", lambda: grpo(sampling=SamplingConfig(temperature=0.0)), ("temperature",)),
        ("GRPO top_k=1", lambda: grpo(sampling=SamplingConfig(top_k=1)), ("top_k",)),
        ("GRPO max_grad_norm=-1", lambda: grpo(max_grad_norm=-1.0), ("max_grad_norm",)),
        ("GRPO max_grad_norm=0", lambda: grpo(max_grad_norm=0.0), ("max_grad_norm",)),
        ("GRPO max_grad_norm=nan", lambda: grpo(max_grad_norm=NAN), ("max_grad_norm",)),
        ("GRPO micro_batch_size=0", lambda: grpo(micro_batch_size=0), ("micro_batch_size",)),
        ("GRPO micro_batch_tokens=0", lambda: grpo(micro_batch_tokens=0), ("micro_batch_tokens",)),
        ("GRPO num_iterations=0", lambda: grpo(num_iterations=0), ("num_iterations",)),
        ("GRPO num_iterations=2 without clip", lambda: grpo(num_iterations=2), ("num_iterations", "clip")),
        ("GRPO token_budget=0", lambda: grpo(token_budget=0), ("token_budget",)),
        ("GRPO max_nonfinite_steps=-1", lambda: grpo(max_nonfinite_steps=-1), ("max_nonfinite_steps",)),
        ("GRPO sample_table_every_n_steps=-1", lambda: grpo(sample_table_every_n_steps=-1), ("sample_table",)),
        ("GRPO val_num_generations=0", lambda: grpo(val_num_generations=0), ("val_num_generations",)),
        ("GRPO reference=bogus", lambda: grpo(reference="bogus"), ("reference",)),
        ("GRPO advantage_scale=bogus", lambda: grpo(advantage_scale="bogus"), ("advantage_scale",)),
        # callbacks
        ("ReferenceSyncCallback alpha=1.5", lambda: ReferenceSyncCallback(alpha=1.5), ("alpha",)),
        ("ReferenceSyncCallback alpha=nan", lambda: ReferenceSyncCallback(alpha=NAN), ("alpha",)),
        ("ReferenceSyncCallback every_n_steps=0", lambda: ReferenceSyncCallback(every_n_steps=0), ("every_n_steps",)),
        ("StudentRewardCallback max_length=0", lambda: StudentRewardCallback(student, max_length=0), ("max_length",)),
        (
            "StudentRewardCallback token_budget=0",
            lambda: StudentRewardCallback(student, token_budget=0),
            ("token_budget",),
        ),
        (
            "TraceWriter max_trace_tokens=0",
            lambda: TraceWriter(str(tmp / "tw"), max_trace_tokens=0),
            ("max_trace_tokens",),
        ),
        ("TraceWriter overflow=bogus", lambda: TraceWriter(str(tmp / "tw"), overflow="bogus"), ("overflow",)),
        ("TraceWriter output_dir is a file", lambda: TraceWriter(str(afile)), ("output_dir",)),
        ("TraceWriter output_dir unwritable", lambda: TraceWriter(UNWRITABLE), ("output_dir",)),
        ("GracefulShutdown dirpath unwritable", lambda: GracefulShutdown(dirpath=UNWRITABLE), ("dirpath",)),
        # DataModule flags
        ("AdditionDataModule num_train=-1", lambda: AdditionDataModule(num_train=-1), ("num_train",)),
        ("AdditionDataModule num_heldout=-1", lambda: AdditionDataModule(num_heldout=-1), ("num_heldout",)),
        ("AdditionDataModule heldout_digits=0", lambda: AdditionDataModule(heldout_digits=0), ("heldout_digits",)),
        (
            "AdditionDataModule min_digits > max_digits",
            lambda: AdditionDataModule(min_digits=4, max_digits=3),
            ("digits",),
        ),
        (
            "AdditionDataModule explanation_mix nan",
            lambda: AdditionDataModule(explanation_mix={"good": NAN}),
            ("explanation_mix",),
        ),
        ("AdditionDataModule batch_size=0", lambda: AdditionDataModule(batch_size=0), ("batch_size",)),
        ("AdditionDataModule limit=0", lambda: AdditionDataModule(limit=0), ("limit",)),
        (
            "CountdownDataModule max_expression_chars=0",
            lambda: CountdownDataModule(synthetic=True, max_expression_chars=0),
            ("max_expression_chars",),
        ),
        (
            "CountdownDataModule num_numbers=1",
            lambda: CountdownDataModule(synthetic=True, num_numbers=1),
            ("num_numbers",),
        ),
        (
            "CountdownDataModule val+test > rows",
            lambda: CountdownDataModule(synthetic=True, num_examples=10, val_size=20).setup(),
            ("val_size",),
        ),
        (
            "MATH500DataModule timeout_seconds=0",
            lambda: MATH500DataModule(data_path="x.jsonl", timeout_seconds=0),
            ("timeout_seconds",),
        ),
        (
            "MATH500DataModule num_workers=-1",
            lambda: MATH500DataModule(data_path="x.jsonl", num_workers=-1),
            ("num_workers",),
        ),
        (
            "MATH500DataModule stage_splits bogus",
            lambda: MATH500DataModule(data_path="x.jsonl", stage_splits={"fit": "all"}),
            ("stage_splits",),
        ),
        ("TracesDataModule without data_path", lambda: TracesDataModule(), ("data_path",)),
        (
            "ColdStartDataModule num_train_prompts=0",
            lambda: ColdStartDataModule(CountdownDataModule(synthetic=True), num_train_prompts=0),
            ("num_train_prompts",),
        ),
        (
            "ColdStartDataModule benchmark without train",
            lambda: ColdStartDataModule(MATH500DataModule(data_path="x.jsonl")),
            ("benchmark",),
        ),
    ]
    return cases


def _cli(args: list[str], cwd: Path, run: bool = False) -> object:
    """Parse and build the run (`run=False`), or run `fit` (checks made at setup, before the first step)."""
    from rlt_pl.cli import cli_main, error_line

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli_main(["fit", *args, "--trainer.max_steps=1"] if run else args, run=run)
    except Exception as exc:
        if not getattr(exc, "rlt_pl_construction", False):
            raise
        raise SystemExit(error_line(exc)) from exc
    finally:
        os.chdir(old)


def _cli_cases(cdirs: dict, tmp: Path) -> list[Scenario]:
    sft = str(ROOT / "configs/teacher/sft_tiny.yaml")
    rlt = str(ROOT / "configs/teacher/rlt_tiny.yaml")
    base = [
        "--trainer.logger=false",
        f"--model.init_args.model.name_or_path={cdirs['teacher']}",
        f"--model.init_args.export_dir={tmp / 'export'}",
    ]
    rl_base = [*base, f"--trainer.callbacks.init_args.student.name_or_path={cdirs['student']}"]
    cases = {
        "CLI: lr=abc": ([sft], ["--model.init_args.lr=abc"], ("lr",)),
        "CLI: lr_schedule=bogus": ([sft], ["--model.init_args.lr_schedule=bogus"], ("lr_schedule",)),
        "CLI: model dtype=float17": ([sft], ["--model.init_args.model.dtype=float17"], ("dtype",)),
        "CLI: quantization=3bit": ([sft], ["--model.init_args.model.quantization=3bit"], ("quantization",)),
        "CLI: unknown model flag": ([sft], ["--model.init_args.no_such_flag=1"], ("no_such_flag",)),
        "CLI: missing model path": (
            [sft],
            ["--model.init_args.model.name_or_path=runs/none/teacher"],
            ("name_or_path",),
        ),
        "CLI: data batch_size=0": ([sft], ["--data.init_args.batch_size=0"], ("batch_size",)),
        "CLI: RL num_generations=1": ([rlt, "--model.init_args.num_generations=1"], [], ("num_generations",)),
        "CLI: RL sampling.temperature=0": ([rlt, "--model.init_args.sampling.temperature=0"], [], ("temperature",)),
        "CLI: RL reward temperature != sampling": (
            [rlt, "--trainer.callbacks.init_args.reward.teacher_temperature=1.0"],
            [],
            ("temperature",),
        ),
        "CLI: ckpt dirpath unwritable": (
            [sft, f"--trainer.callbacks.init_args.dirpath={UNWRITABLE}"],
            [],
            ("dirpath",),
        ),
    }
    at_setup = {"CLI: RL reward temperature != sampling", "CLI: ckpt dirpath unwritable"}
    out = []
    for name, (head, extra, culprit) in cases.items():
        is_rl = head[0] == rlt
        args = ["-c", head[0], *(rl_base if is_rl else base), *head[1:], *extra]
        run = name in at_setup
        out.append(Scenario("config", name, lambda args=args, run=run: _cli(args, tmp, run), culprit=culprit))
    return out


def scenarios(dirs: dict, cdirs: dict, tmp: Path) -> list[Scenario]:
    tmp.mkdir(parents=True)
    out = [Scenario("config", name, fn, culprit=culprit) for name, fn, culprit in _direct(dirs, cdirs, tmp)]
    return out + _cli_cases(cdirs, tmp)
