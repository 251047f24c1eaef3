"""Bad flag values are refused when the run is built, naming the flag (never accepted and acted on: a NaN learning
rate, a positive "penalty", a negative logging period, an unwritable directory found only when a signal comes)."""

from __future__ import annotations

import pytest

from rlt_pl.callbacks.shutdown import GracefulShutdown
from rlt_pl.callbacks.student_reward import StudentRewardCallback
from rlt_pl.callbacks.trace_writer import TraceWriter
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.grpo import GRPOModule
from rlt_pl.modules.sft import StudentDistillModule
from rlt_pl.rewards import RewardConfig

NAN, INF = float("nan"), float("inf")
UNWRITABLE = "/proc/rlt_pl_unwritable/out"  # not creatable, even by root


def _sft(tiny_dirs, **kw):
    from rlt_pl.modules.sft import TeacherSFTModule

    return TeacherSFTModule(ModelConfig(str(tiny_dirs["teacher"])), **kw)


CASES = {
    "sampling temperature nan": (lambda d: SamplingConfig(temperature=NAN), r"sampling\.temperature"),
    "sampling temperature inf": (lambda d: SamplingConfig(temperature=INF), r"sampling\.temperature"),
    "sampling repetition_penalty nan": (lambda d: SamplingConfig(repetition_penalty=NAN), r"repetition_penalty"),
    "sampling repetition_penalty inf": (lambda d: SamplingConfig(repetition_penalty=INF), r"repetition_penalty"),
    "sampling top_k 0": (lambda d: SamplingConfig(top_k=0), r"sampling\.top_k"),
    "sampling top_k -1": (lambda d: SamplingConfig(top_k=-1), r"sampling\.top_k"),
    "sampling max_prompt_tokens 0": (lambda d: SamplingConfig(max_prompt_tokens=0), r"sampling\.max_prompt_tokens"),
    "module lr nan": (lambda d: _sft(d, lr=NAN), r"model\.init_args\.lr "),
    "module lr inf": (lambda d: _sft(d, lr=INF), r"model\.init_args\.lr "),
    "module betas above 1": (lambda d: _sft(d, betas=(1.5, 0.9)), r"model\.init_args\.betas"),
    "module betas negative": (lambda d: _sft(d, betas=(0.9, -0.1)), r"model\.init_args\.betas"),
    "module weight_decay negative": (lambda d: _sft(d, weight_decay=-1.0), r"model\.init_args\.weight_decay"),
    "module weight_decay nan": (lambda d: _sft(d, weight_decay=NAN), r"model\.init_args\.weight_decay"),
    "module lr_schedule unknown": (lambda d: _sft(d, lr_schedule="bogus"), r"model\.init_args\.lr_schedule"),
    "reward student_temperature inf": (lambda d: RewardConfig(student_temperature=INF), r"student_temperature"),
    "reward teacher_temperature inf": (lambda d: RewardConfig(teacher_temperature=INF), r"teacher_temperature"),
    "reward not_matched_penalty positive": (lambda d: RewardConfig(not_matched_penalty=1.0), r"not_matched_penalty"),
    "StudentRewardCallback max_length 0": (
        lambda d: StudentRewardCallback(ModelConfig(str(d["student"])), max_length=0),
        r"StudentRewardCallback\.max_length",
    ),
    "StudentRewardCallback token_budget 0": (
        lambda d: StudentRewardCallback(ModelConfig(str(d["student"])), token_budget=0),
        r"StudentRewardCallback\.token_budget",
    ),
    "TraceWriter max_trace_tokens 0": (
        lambda d: TraceWriter(str(d["teacher"].parent / "tw"), max_trace_tokens=0),
        r"max_trace_tokens",
    ),
    "TraceWriter overflow unknown": (
        lambda d: TraceWriter(str(d["teacher"].parent / "tw"), overflow="bogus"),
        r"TraceWriter\.init_args\.overflow",
    ),
    "GracefulShutdown dirpath unwritable": (lambda d: GracefulShutdown(dirpath=UNWRITABLE), r"dirpath"),
    "TeacherSFTModule eval_output_dir unwritable": (
        lambda d: _sft(d, eval_output_dir=UNWRITABLE),
        r"model\.init_args\.eval_output_dir",
    ),
    "StudentDistillModule log_reward_every_n_steps -1": (
        lambda d: StudentDistillModule(ModelConfig(str(d["teacher"])), log_reward_every_n_steps=-1),
        r"log_reward_every_n_steps",
    ),
    "GRPOModule sample_table_every_n_steps -1": (
        lambda d: GRPOModule(ModelConfig(str(d["teacher"])), num_generations=2, sample_table_every_n_steps=-1),
        r"sample_table_every_n_steps",
    ),
    "AdditionDataModule num_train -1": (lambda d: AdditionDataModule(num_train=-1), r"num_train"),
    "AdditionDataModule num_heldout -1": (lambda d: AdditionDataModule(num_heldout=-1), r"num_heldout"),
    "AdditionDataModule heldout_digits 0": (lambda d: AdditionDataModule(heldout_digits=0), r"heldout_digits"),
    "AdditionDataModule explanation_mix nan": (
        lambda d: AdditionDataModule(explanation_mix={"good": NAN}),
        r"explanation_mix",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_values_are_refused_at_construction_naming_the_flag(tiny_dirs, name) -> None:
    build, flag = CASES[name]
    with pytest.raises(ValueError, match=flag):
        build(tiny_dirs)


def test_valid_sampling_settings_are_kept() -> None:
    s = SamplingConfig(temperature=0.0, top_k=1, max_prompt_tokens=1, repetition_penalty=1.1)
    assert (s.temperature, s.top_k, s.max_prompt_tokens) == (0.0, 1, 1)


def test_checkpoint_dirpath_is_checked_when_fit_starts_not_at_the_first_save(tmp_path) -> None:
    import lightning as L

    from rlt_pl.callbacks.checkpoint import AtomicModelCheckpoint

    ckpt = AtomicModelCheckpoint(dirpath=UNWRITABLE, save_last=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ckpt], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"AtomicModelCheckpoint\.init_args\.dirpath"):
        ckpt.setup(trainer, L.LightningModule(), "fit")
    ok = AtomicModelCheckpoint(dirpath=str(tmp_path / "ckpts"))
    ok.setup(L.Trainer(accelerator="cpu", logger=False, callbacks=[ok], default_root_dir=tmp_path), None, "fit")
    assert not (tmp_path / "ckpts").exists()  # checked, not created


@pytest.mark.parametrize(
    "bad",
    [
        b'{"id": "x", "question": "q", "solution": "5", "thought": "t", "metadata": [1]}',
        b'{"id": "x", "question": "q", "solution": "5", "thought": "t", "answer": {"a": 1}}',
        b'{"id": "x", "question": "q", "solution": "5", "thought": "t", "n": Infinity}',
        b'{"id": "x", "question": "q", "solution": "5", "thought": "t", "n": 1e999}',
    ],
    ids=["metadata list", "answer object", "Infinity", "overflowing float"],
)
def test_trace_rows_with_wrong_field_types_or_nonfinite_numbers_are_counted(tmp_path, bad) -> None:
    from rlt_pl.datamodules.traces import TracesDataModule

    good = b'{"id": "ok", "question": "q", "solution": "5", "thought": "t", "answer": 5}'
    (tmp_path / "shard-00000.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    dm = TracesDataModule(data_path=str(tmp_path))
    dm.setup("fit")
    assert [r["id"] for r in dm.rows] == ["ok"] and dm.rows[0]["answer"] == "5"
    [(rid, reason)] = dm.invalid_rows  # reported by position (traces-1: the second row), with the reason
    assert rid == "traces-1" and any(w in reason for w in ("metadata", "answer", "non-finite", "overflows"))
