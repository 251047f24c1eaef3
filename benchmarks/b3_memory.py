"""B3: peak RSS of one `TeacherRLModule` RL step, and a cProfile of that step.

Each measurement runs in a fresh child process (`python -m benchmarks.b3_memory --child ...`), so `ru_maxrss` is the
peak of that step alone (plus imports). Two layouts on the same model size:
- `shared`: the reward student is the same checkpoint as the policy's initial weights, so `TeacherRLModule` reuses it
  as the GRPO reference (`shared_reference`): policy + one frozen copy;
- `separate`: a different student checkpoint: policy + reference copy + student (three copies).
The difference of the peaks against `model_mb` (fp32 weight bytes) shows how many model copies are resident.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
from pathlib import Path

import torch


def rss_mb() -> float:
    """Peak resident set size of this process in MiB (`ru_maxrss` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_step(teacher_dir: str, student_dir: str, group: int, new_tokens: int, profile: bool) -> dict:
    """Fit `TeacherRLModule` for one optimizer step; return RSS, model copies and optionally the profile's top rows.

    Args:
        teacher_dir: policy checkpoint.
        student_dir: reward student checkpoint.
        group: G.
        new_tokens: max completion length.
        profile: run the step under cProfile.
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from benchmarks import n_params, set_threads, short_format
    from rlt_pl.callbacks import StudentRewardCallback
    from rlt_pl.datamodules.loader import collate_rows
    from rlt_pl.generation import SamplingConfig
    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.teacher_rl import TeacherRLModule

    set_threads()
    before = rss_mb()
    rows = [{"question": f"What is {100 + i} + {200 + i}?", "solution": f"\n\n{300 + 2 * i}\n\n"} for i in range(2)]
    module = TeacherRLModule(
        model=ModelConfig(name_or_path=teacher_dir, dtype="float32"),
        format=short_format(),
        num_generations=group,
        micro_batch_size=2 * group,
        lr=1e-4,
        sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=0.7),
        sample_table_every_n_steps=0,
    )
    reward = StudentRewardCallback(student=ModelConfig(name_or_path=student_dir, dtype="float32"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        max_epochs=-1,
        logger=False,
        log_every_n_steps=1,  # GRPO step metrics are logged on logging steps
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[reward],
    )
    loader = DataLoader(rows, batch_size=2, collate_fn=collate_rows)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    trainer.fit(module, loader)
    if prof is not None:
        prof.disable()
    frozen = {id(m) for m in (module.ref_model, reward.student) if m is not None}
    out = {
        "rss_before_mb": before,
        "peak_rss_mb": rss_mb(),
        "model_mb": n_params(module.model) * 4 / 2**20,
        "distinct_frozen_copies": len(frozen),
        "reference_is_student": module.ref_model is reward.student,
        "split_s": {k[5:]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")},
    }
    if prof is not None:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).sort_stats("tottime")
        rows_out = []
        for (file, line, name), (_, ncalls, tottime, cumtime, _) in sorted(
            stats.stats.items(), key=lambda kv: kv[1][2], reverse=True
        )[:15]:
            short = "/".join(Path(file).parts[-2:])
            rows_out.append(
                {"function": f"{short}:{line}({name})", "calls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime}
            )
        out["profile_top"] = rows_out
    return out


def child(args: list[str], timeout: float = 600) -> dict:
    """Run `one_step` in a fresh interpreter and return its JSON.

    Args:
        args: command-line arguments for `--child`.
        timeout: seconds before the child is killed.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.b3_memory", "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        raise RuntimeError(f"B3 child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(assets: dict, size: str = "small", group: int = 4, new_tokens: int = 32, profile_size: str = "tiny") -> dict:
    """Peak RSS of one RL step, shared vs separate reference/student, plus a profile of one tiny step.

    Args:
        assets: `benchmarks.build_assets(...)` output.
        size: model size for the memory runs.
        group: G.
        new_tokens: max completion length.
        profile_size: model size for the profiled step.
    """
    t, s = str(assets[size]["teacher"]), str(assets[size]["student"])
    common = ["--group", str(group), "--new-tokens", str(new_tokens)]
    shared = child(["--teacher", t, "--student", t, *common])
    separate = child(["--teacher", t, "--student", s, *common])
    pt = str(assets[profile_size]["teacher"])
    profiled = child(["--teacher", pt, "--student", str(assets[profile_size]["student"]), *common, "--profile"])
    return {
        "size": size,
        "shared": shared,
        "separate": separate,
        "extra_copy_mb": separate["peak_rss_mb"] - shared["peak_rss_mb"],
        "profile": profiled,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", action="store_true", help="run one step in this process and print JSON")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = one_step(args.teacher, args.student, args.group, args.new_tokens, args.profile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
