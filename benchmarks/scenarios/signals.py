"""Kill / signal scenarios: SIGTERM and SIGINT at several points of `fit` and `predict` (in process), `kill -9` of
`python -m rlt_pl predict` mid-run then reruns with the same and other batching, another lineage, and `kill -9` of
`fit` then `--ckpt_path last`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.scenarios import Observation, Scenario


def _module(cdirs: dict, temperature: float = 0.7):
    from rlt_pl.formats import CompactFormat
    from rlt_pl.generation import SamplingConfig
    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.sft import TeacherSFTModule

    return TeacherSFTModule(
        ModelConfig(str(cdirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        lr=1e-3,
        sampling=SamplingConfig(max_new_tokens=6, temperature=temperature),
    )


def _signal_run(cdirs: dict, root: Path, stage: str, signum: int, at: int, checkpointing: bool = False) -> dict:
    """Run `fit` or `predict`, signal the process at the end of batch `at`; return what was left behind."""
    import lightning as L
    import torch

    from rlt_pl.callbacks.checkpoint import AtomicModelCheckpoint
    from rlt_pl.callbacks.shutdown import GracefulShutdown
    from rlt_pl.callbacks.trace_writer import TraceWriter
    from rlt_pl.datamodules.addition import AdditionDataModule

    class At(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == at:
                os.kill(os.getpid(), signum)

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == at:
                os.kill(os.getpid(), signum)

    cbs = [GracefulShutdown(), At()]
    if stage == "predict":
        cbs.append(TraceWriter(str(root / "traces")))
    if checkpointing:
        cbs.append(AtomicModelCheckpoint(dirpath=str(root / "ckpts"), save_last=True, every_n_train_steps=100))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=checkpointing,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=cbs,
        max_steps=10,
        limit_val_batches=0,
    )
    data = AdditionDataModule(num_train=16, num_heldout=4, batch_size=2)
    previous = signal.getsignal(signal.SIGINT)
    code = 0
    try:
        (trainer.fit if stage == "fit" else trainer.predict)(_module(cdirs), datamodule=data)
    except SystemExit as err:
        code = err.code
    finally:
        signal.signal(signal.SIGINT, previous)
    found = {"code": code, "expected": 128 + signum}
    if stage == "fit":
        ckpt = (root / ("ckpts" if checkpointing else "checkpoints")) / "interrupted.ckpt"
        step = torch.load(ckpt, weights_only=False)["global_step"] if ckpt.is_file() else None
        found.update(saved_step=step, trainer_step=trainer.global_step)
    else:
        shards = sorted((root / "traces").glob("shard-*.jsonl"))
        found.update(shards=len(shards), expected_shards=at + 1)
    return found


def _fit_ok(obs: Observation) -> bool:
    v = obs.value
    return v["code"] == v["expected"] and v["saved_step"] is not None and v["saved_step"] == v["trainer_step"]


def _fit_lost(obs: Observation) -> bool:
    return obs.value["saved_step"] is None


def _predict_ok(obs: Observation) -> bool:
    v = obs.value
    return v["code"] == v["expected"] and v["shards"] >= v["expected_shards"]


def _predict_lost(obs: Observation) -> bool:
    return obs.value["shards"] < obs.value["expected_shards"]


FIT_YAML = """
seed_everything: 0
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  max_steps: {steps}
  limit_val_batches: 0
  callbacks:
    - class_path: rlt_pl.callbacks.checkpoint.AtomicModelCheckpoint
      init_args: {{dirpath: {ckpts}, save_last: true, save_top_k: 0, every_n_train_steps: 1}}
model:
  class_path: rlt_pl.modules.sft.TeacherSFTModule
  init_args:
    model: {{name_or_path: {teacher}, dtype: float32}}
    format: {{class_path: rlt_pl.formats.CompactFormat}}
    lr: 1.0e-3
    max_length: 64
data:
  class_path: rlt_pl.datamodules.addition.AdditionDataModule
  init_args: {{num_train: 400, num_heldout: 4, batch_size: 4}}
"""

N = 240


def _cli(tmp: Path, name: str, text: str, *extra: str, background: bool = False):
    config = tmp / f"{name}.yaml"
    config.write_text(text)
    stage = "predict" if "TraceWriter" in text else "fit"
    cmd = [sys.executable, "-m", "rlt_pl", stage, "-c", str(config), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if background:
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> bool:
    """SIGKILL `proc` once `ready()`; False when it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _trace_ids(out: Path) -> list[str]:
    return [json.loads(x)["id"] for s in sorted(out.glob("shard-*.jsonl")) for x in s.read_text().splitlines()]


class KillRuns:
    """One `kill -9` of trace generation shared by the rerun scenarios (run lazily, in order)."""

    def __init__(self, cdirs: dict, tmp: Path) -> None:
        self.cdirs, self.tmp = cdirs, tmp
        self.out = tmp / "traces"

    def yaml(self, batch: int, temperature: float = 0.7) -> str:
        from rlt_pl.tiny import trace_predict_yaml

        return trace_predict_yaml(self.out, self.cdirs["teacher"], N, batch, max_new_tokens=24, temperature=temperature)

    def kill_then_rerun_other_batching(self) -> dict:
        self.tmp.mkdir(parents=True, exist_ok=True)
        proc = _cli(self.tmp, "p10", self.yaml(10), background=True)
        killed = _kill_when(proc, lambda: len(list(self.out.glob("shard-*.jsonl"))) >= 3)
        before = len(_trace_ids(self.out))
        run = _cli(self.tmp, "p7", self.yaml(7))
        ids = _trace_ids(self.out)
        return {"killed": killed, "before": before, "rc": run.returncode, "ids": ids, "err": run.stderr[-300:]}

    def rerun_same(self) -> dict:
        run = _cli(self.tmp, "p10b", self.yaml(10))
        return {"rc": run.returncode, "ids": _trace_ids(self.out)}

    def rerun_other_lineage(self):
        run = _cli(self.tmp, "p10t", self.yaml(10, temperature=1.0))
        if run.returncode != 0:
            raise SystemExit(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode)
        return {"rc": 0}


def _all_ids(obs: Observation) -> bool:
    ids = obs.value["ids"]
    return obs.value["rc"] == 0 and sorted(ids) == sorted(f"add-train-{i}" for i in range(N))


def _ids_lost(obs: Observation) -> bool:
    ids = obs.value["ids"]
    return len(ids) != len(set(ids)) or set(ids) != {f"add-train-{i}" for i in range(N)}


def _kill_fit_resume(cdirs: dict, tmp: Path) -> dict:
    import torch

    tmp.mkdir(parents=True, exist_ok=True)
    ckpts = tmp / "ckpts"
    text = FIT_YAML.format(steps=60, ckpts=ckpts, teacher=cdirs["teacher"])
    proc = _cli(tmp, "fit", text, background=True)
    killed = _kill_when(proc, lambda: (ckpts / "last.ckpt").is_file() and _step(ckpts / "last.ckpt") >= 3)
    at_kill = _step(ckpts / "last.ckpt")
    run = _cli(tmp, "fit", text, "--ckpt_path", "last")
    final = (
        torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] if (ckpts / "last.ckpt").is_file() else None
    )
    return {"killed": killed, "at_kill": at_kill, "rc": run.returncode, "final": final, "err": run.stderr[-300:]}


def _step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - a checkpoint being replaced is read again on the next poll
        return -1


def scenarios(cdirs: dict, tmp: Path) -> list[Scenario]:
    tmp.mkdir(parents=True)
    out: list[Scenario] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        for at in (0, 2):
            root = tmp / f"fit-{name}-{at}"
            out.append(
                Scenario(
                    "signal",
                    f"{name} on fit after batch {at} (checkpointing off)",
                    lambda root=root, signum=signum, at=at: _signal_run(cdirs, root, "fit", signum, at),
                    correct=_fit_ok,
                    lost=_fit_lost,
                )
            )
        root = tmp / f"fitck-{name}"
        out.append(
            Scenario(
                "signal",
                f"{name} on fit with a checkpoint callback",
                lambda root=root, signum=signum: _signal_run(cdirs, root, "fit", signum, 1, checkpointing=True),
                correct=_fit_ok,
                lost=_fit_lost,
            )
        )
        for at in (0, 1):
            root = tmp / f"predict-{name}-{at}"
            out.append(
                Scenario(
                    "signal",
                    f"{name} on predict after batch {at}",
                    lambda root=root, signum=signum, at=at: _signal_run(cdirs, root, "predict", signum, at),
                    correct=_predict_ok,
                    lost=_predict_lost,
                )
            )
    kills = KillRuns(cdirs, tmp / "kill")
    out += [
        Scenario(
            "signal",
            "kill -9 mid trace generation, rerun with another batch_size",
            kills.kill_then_rerun_other_batching,
            correct=lambda obs: obs.value["killed"] and 0 < obs.value["before"] < N and _all_ids(obs),
            lost=_ids_lost,
        ),
        Scenario(
            "signal",
            "rerun of finished traces (nothing regenerated)",
            kills.rerun_same,
            correct=_all_ids,
            lost=_ids_lost,
        ),
        Scenario(
            "signal",
            "rerun with another sampling temperature (other lineage)",
            kills.rerun_other_lineage,
            culprit=("lineage",),
        ),
        Scenario(
            "signal",
            "kill -9 mid fit, rerun with --ckpt_path last",
            lambda: _kill_fit_resume(cdirs, tmp / "killfit"),
            correct=lambda obs: obs.value["killed"] and obs.value["rc"] == 0 and obs.value["final"] == 60,
            lost=lambda obs: obs.value["rc"] != 0 or obs.value["final"] != 60,
        ),
    ]
    return out
