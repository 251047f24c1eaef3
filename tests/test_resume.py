"""Exact resume: a run stopped at a checkpoint and resumed with `ckpt_path` equals the uninterrupted run, step for step
(TeacherRLModule on tiny compact models, CPU); what a checkpoint holds and what it leaves out; the resumable loader."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from rlt_pl.callbacks import ReferenceSyncCallback, StudentRewardCallback
from rlt_pl.callbacks.checkpoint import AtomicModelCheckpoint
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.datamodules.loader import ResumableDataLoader, resumable_loader
from rlt_pl.datamodules.samplers import EpochShuffleSampler
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.teacher_rl import TeacherRLModule
from rlt_pl.rng import collect_rng_states, restore_rng_states
from rlt_pl.tiny import build_compact_assets

STEPS = 6  # 8 training rows / batch 4 = 2 batches per epoch: 3 epochs, validation after each
SKIP_METRICS = ("time/", "train/tokens_per_s")  # wall-clock


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; one thread keeps timings stable on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("compact_resume"), CompactFormat().tag_tokens(), seed=0)


class StepRecorder(L.Callback):
    """Logged metrics of every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith(SKIP_METRICS)}
        metrics["batch_ids"] = hash(tuple(r["id"] for r in batch))
        self.steps[trainer.global_step] = metrics


def _fit(dirs: dict, ckpt_dir: Path, max_steps: int, ckpt_path: str | None = None, ref_sync: bool = False):
    L.seed_everything(0)
    module = TeacherRLModule(
        ModelConfig(str(dirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=3,  # shuffled micro-batches: the loss also draws from the RNG
        lr=1e-3,
        lr_schedule="cosine",
        warmup_ratio=0.2,
        sampling=SamplingConfig(max_new_tokens=12, temperature=0.7),
        sample_table_every_n_steps=0,
    )
    recorder = StepRecorder()
    callbacks = [
        StudentRewardCallback(ModelConfig(str(dirs["student"]), dtype="float32")),
        recorder,
        AtomicModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1),
    ]
    if ref_sync:
        callbacks.append(ReferenceSyncCallback(alpha=0.5, every_n_steps=2))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        log_every_n_steps=1,  # GRPO step metrics are logged on logging steps
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        callbacks=callbacks,
    )
    data = AdditionDataModule(num_train=8, num_heldout=4, batch_size=4)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, recorder, trainer


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.fixture(scope="module")
def straight_run(compact_dirs, tmp_path_factory):
    """The uninterrupted 6-step run, checkpointing after every step."""
    ckpt_dir = tmp_path_factory.mktemp("ckpt_straight")
    module, recorder, _ = _fit(compact_dirs, ckpt_dir, STEPS)
    return {"dir": ckpt_dir, "steps": recorder.steps, "params": _params(module), "module": module}


def _assert_same_run(resumed: dict[int, dict], straight: dict[int, dict], first: int) -> None:
    assert sorted(resumed) == list(range(first, STEPS + 1))
    for step in resumed:
        a, b = resumed[step], straight[step]
        train_keys = sorted(k for k in a if k.startswith("train/"))  # callback_metrics keep conditional keys
        assert len(train_keys) > 10 and "train/reward" in train_keys and "train/policy_loss" in train_keys
        assert a["batch_ids"] == b["batch_ids"], f"step {step}: different rows"
        for k in train_keys:
            assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), (step, k, a[k], b[k])


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid_epoch", "epoch_end"])
def test_resumed_run_equals_uninterrupted_run(compact_dirs, straight_run, tmp_path, stop_at):
    """Resume from the step-3 checkpoint (mid-epoch: the loader skips the consumed batch of the same shuffle) and from
    the step-4 one (end of an epoch, before validation): steps after it log the same reward, loss, KL, grad norm, lr
    and rows as the straight run, and the final weights are equal."""
    ckpt = straight_run["dir"] / f"step={stop_at}.ckpt"
    module, recorder, trainer = _fit(compact_dirs, tmp_path, STEPS, ckpt_path=str(ckpt))
    assert trainer.global_step == STEPS
    _assert_same_run(recorder.steps, straight_run["steps"], stop_at + 1)
    rewards = [straight_run["steps"][s]["train/reward"] for s in range(1, STEPS + 1)]
    assert len(set(rewards)) > 1  # the comparison is not vacuous: steps differ from each other
    final = _params(module)
    for k, v in straight_run["params"].items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6)


def test_checkpoint_contents(compact_dirs, straight_run):
    """A mid-run checkpoint holds policy, optimizer, scheduler, loader position, RNG states and the nonfinite count;
    the frozen reference and reward student are left out and recorded by source instead."""
    ckpt = torch.load(straight_run["dir"] / "step=3.ckpt", weights_only=False, map_location="cpu")
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("model.") for k in keys)
    assert not any(k.startswith("ref_model.") for k in keys)
    assert not any("student" in k for k in keys)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 1
    assert ckpt["optimizer_states"][0]["state"], "optimizer moments missing"
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "batches": 1}]
    rlt = ckpt["rlt_pl"]
    assert rlt["nonfinite_steps"] == 0
    assert rlt["frozen_models"] == {"reference": str(compact_dirs["teacher"])}
    assert set(rlt["rng"]) >= {"torch", "python", "numpy"}
    assert ckpt["callbacks"]["StudentRewardCallback"] == {"student": str(compact_dirs["student"])}


def test_ref_sync_state_is_checkpointed(compact_dirs, tmp_path):
    """With TR-DPO sync the reference diverges from its source: then it is stored, with the sync count, and
    restored on resume."""
    module, _, _ = _fit(compact_dirs, tmp_path, 2, ref_sync=True)
    ckpt = torch.load(tmp_path / "step=2.ckpt", weights_only=False, map_location="cpu")
    ref_keys = [k for k in ckpt["state_dict"] if k.startswith("ref_model.")]
    assert ref_keys
    assert "reference" not in ckpt["rlt_pl"]["frozen_models"]
    assert ckpt["callbacks"]["ReferenceSyncCallback"] == {"syncs": 1}
    resumed, _, _ = _fit(compact_dirs, tmp_path / "resumed", 2, ckpt_path=str(tmp_path / "step=2.ckpt"), ref_sync=True)
    for k in ref_keys:
        torch.testing.assert_close(resumed.state_dict()[k], ckpt["state_dict"][k], rtol=0, atol=0)


def test_student_mismatch_on_resume_is_refused(compact_dirs):
    """The checkpoint names its reward student; resuming with another one is a clear error."""
    cb = StudentRewardCallback(ModelConfig(str(compact_dirs["teacher"]), dtype="float32"))
    with pytest.raises(ValueError, match="trained with student"):
        cb.load_state_dict({"student": str(compact_dirs["student"])})


def test_loader_resumes_at_the_right_batch_with_the_same_shuffle():
    """Unit level: the loader's state after k batches makes a fresh loader yield the remaining batches of that epoch,
    and the next epochs' orders do not depend on the interruption."""
    rows = [{"id": str(i)} for i in range(10)]

    def epoch_ids(loader: ResumableDataLoader, epoch: int) -> list[list[str]]:
        loader.sampler.set_epoch(epoch)
        return [[r["id"] for r in b] for b in loader]

    straight = resumable_loader(rows, batch_size=3, seed=7)
    full = [epoch_ids(straight, e) for e in range(3)]
    assert full[0] != full[1] and sorted(sum(full[1], [])) == sorted(r["id"] for r in rows)

    first = resumable_loader(rows, batch_size=3, seed=7)
    first.sampler.set_epoch(1)
    it = iter(first)
    consumed = [[r["id"] for r in next(it)] for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = resumable_loader(rows, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert consumed + epoch_ids(resumed, 1) == full[1]
    assert epoch_ids(resumed, 2) == full[2]  # the skip applies once

    end = resumable_loader(rows, batch_size=3, seed=7)
    end.load_state_dict({"epoch": 1, "batches": 4})  # saved at the end of epoch 1: next epoch starts from its start
    assert epoch_ids(end, 2) == full[2]
    with pytest.raises(ValueError, match="unexpected loader state"):
        end.load_state_dict({"position": 3})


def test_epoch_zero_order_matches_torch_random_sampler():
    """Epoch 0 keeps the order a seeded `RandomSampler` gave before the loader became resumable."""
    gen = torch.Generator().manual_seed(5)
    expected = list(torch.utils.data.RandomSampler(range(9), generator=gen))
    assert list(EpochShuffleSampler(9, seed=5)) == expected
    assert list(EpochShuffleSampler(4, seed=5, shuffle=False)) == [0, 1, 2, 3]


def test_rng_states_round_trip():
    """torch, python and numpy streams are all captured and restored."""
    state = collect_rng_states()
    draws = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_states(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_length_bucketing_is_deterministic_groups_lengths_and_covers_every_row():
    from rlt_pl.datamodules.samplers import LengthBucketSampler

    lengths = [(i * 37) % 101 for i in range(300)]
    sampler = LengthBucketSampler(lengths, batch_size=10, seed=3, window_batches=5)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(300)) and order == list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != order
    spread = [
        max(lengths[i] for i in order[k : k + 10]) - min(lengths[i] for i in order[k : k + 10])
        for k in range(0, 300, 10)
    ]
    random_spread = [max(lengths[k : k + 10]) - min(lengths[k : k + 10]) for k in range(0, 300, 10)]
    assert sum(spread) < 0.5 * sum(random_spread)
