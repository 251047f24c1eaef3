"""Trace generation: the teacher explains (question, solution) rows; `TraceWriter` stores them as atomic shards.

`python -m rlt_pl predict -c ...` with a teacher module (`TeacherSFTModule`, `TeacherRLModule`) and this callback
writes one JSONL shard per predict batch (temp file + fsync + `os.replace`), so a killed run leaves only complete
shards. What is done is keyed by row id, not by batch position: a rerun reads the ids already in the shards (and
the ids a shard dropped, kept beside it in `shard-*.dropped.json`) and generates only the missing rows, whatever
its batch size. `lineage.json` records the teacher, its hash, the sampling settings and the format; a rerun whose
lineage differs is refused (naming the difference) unless `restart: true` clears the directory first. With
`predict_num_samples` N > 1 and a `StudentRewardCallback`, the explanation with the highest RLT reward is kept
(best-of-N, as the authors' offline scorer does). Traces longer than the student's context budget are counted and
kept, dropped or truncated as configured.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from rlt_pl.callbacks.student_reward import find_student_reward
from rlt_pl.datamodules.base import is_padding
from rlt_pl.distributed import all_ranks_true, all_reduce_sum, world
from rlt_pl.paths import check_writable_dir


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and `os.replace` (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# What a trace depends on besides the data: a rerun that differs in any of these is refused (time is not compared).
LINEAGE_KEYS = ("model", "model_sha256", "sampling", "format", "num_samples")


def find_trace_writer(trainer) -> TraceWriter | None:
    found = [cb for cb in trainer.callbacks if isinstance(cb, TraceWriter)] if trainer is not None else []
    return found[0] if found else None


@torch.no_grad()
def generate_traces(module, rows: list[dict], batch_idx: int, n: int = 1) -> list[dict] | None:
    """Sample n explanations per row with the teacher, keep the best by RLT reward (if n > 1), return trace rows."""
    writer = find_trace_writer(module.trainer)
    if writer is not None:
        pending = writer.pending(rows)
        if all_ranks_true(not pending):  # ranks generate together or not at all
            return None
        if world()[1] == 1:
            rows = pending
        # several ranks: every rank generates its whole batch (the same generate calls everywhere); rows written
        # before are filtered out when the shard is written
    fmt = module.format
    prompts = [fmt.teacher_prompt(r["question"], r["solution"], module.tokenizer) for r in rows]
    sampling = replace(module.sampling, stop_strings=tuple(fmt.teacher_stop_strings()))
    before = module.skipped_long_prompts
    keep, prompts = module.prompts_within_limit(prompts, sampling)  # over-long prompts: counted, skipped
    if writer is not None:
        writer.counts["skipped_long_prompts"] += module.skipped_long_prompts - before
    rows = [rows[i] for i in keep]
    if not rows:
        return []
    gen = module.generate(prompts, n, sampling)
    best = list(range(0, len(rows) * n, n))
    rewards = [None] * len(rows)
    cb = find_student_reward(module.trainer)
    if n > 1 and cb is not None:
        rep = [r for r in rows for _ in range(n)]
        result, _ = cb.score(
            module,
            [r["question"] for r in rep],
            [r["solution"] for r in rep],
            gen.texts,
            None,
            module.model,
            gen.prompts,
            groups=torch.arange(len(rep)) // n,
        )
        scores = torch.nan_to_num(result.output.reward.view(len(rows), n), nan=-float("inf"))
        best = (scores.argmax(-1) + torch.arange(len(rows)) * n).tolist()
        rewards = scores.max(-1).values.tolist()
    out = []
    for i, row in enumerate(rows):
        if is_padding(row):  # keeps the ranks' batch counts equal; not a row of the data
            continue
        j = best[i]
        parsed = fmt.parse_completion(gen.texts[j])
        out.append(
            {
                "id": row["id"],
                "question": row["question"],
                "solution": row["solution"],
                "answer": row.get("answer", ""),
                "thought": parsed.explanation,
                "matched": parsed.matched,
                "completion_tokens": int(gen.completion_mask[j].sum()),
                "reward": rewards[i],
                "metadata": row.get("metadata", {}),
            }
        )
    return out


class TraceWriter(BasePredictionWriter):
    """Write teacher traces as JSONL shards with lineage.

    Args:
        output_dir: directory of the shards.
        max_trace_tokens: student context budget for a rendered trace (None: no check).
        overflow: what to do with traces over the budget: keep (counted), drop (counted) or truncate the thought.
        drop_unmatched: drop traces whose explanation never closed its tag (counted either way).
        restart: delete the shards of an earlier run in `output_dir` first (needed when its lineage differs).
    """

    def __init__(
        self,
        output_dir: str,
        max_trace_tokens: int | None = None,
        overflow: Literal["keep", "drop", "truncate"] = "keep",
        drop_unmatched: bool = False,
        restart: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        check_writable_dir(output_dir, "TraceWriter.init_args.output_dir")
        if max_trace_tokens is not None and max_trace_tokens < 1:
            raise ValueError(f"TraceWriter.init_args.max_trace_tokens must be >= 1 or null, got {max_trace_tokens}")
        if overflow not in ("keep", "drop", "truncate"):
            raise ValueError(f"TraceWriter.init_args.overflow must be keep, drop or truncate, got {overflow!r}")
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.max_trace_tokens = max_trace_tokens
        self.overflow = overflow
        self.drop_unmatched = drop_unmatched
        self.restart = restart
        self.done_ids: set[str] = set()
        self.counts = {
            "rows": 0,
            "written": 0,
            "unmatched": 0,
            "overflow": 0,
            "dropped": 0,
            "skipped_shards": 0,
            "skipped_rows": 0,
            "skipped_long_prompts": 0,
        }

    def shard_path(self, batch_idx: int) -> Path:
        """A free shard name for this batch and rank (`shard-00007.jsonl`, `shard-00007-rank001.jsonl` with several
        ranks, or `shard-00007.1.jsonl` when a rerun with other batching already wrote one of that number)."""
        rank, n = world()
        stem = f"shard-{batch_idx:05d}" + (f"-rank{rank:03d}" if n > 1 else "")  # each rank writes its own part
        path, k = self.output_dir / f"{stem}.jsonl", 0
        while path.exists():
            k += 1
            path = self.output_dir / f"{stem}.{k}.jsonl"
        return path

    def pending(self, rows: list[dict]) -> list[dict]:
        """The rows of a batch whose traces are not written yet (by id); a fully done batch counts as skipped."""
        todo = [r for r in rows if str(r["id"]) not in self.done_ids]
        if not todo:
            self.counts["skipped_shards"] += 1
        self.counts["skipped_rows"] += len(rows) - len(todo)
        return todo

    def _finished_ids(self) -> set[str]:
        ids: set[str] = set()
        for shard in self.output_dir.glob("shard-*.jsonl"):
            for line in shard.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    ids.add(str(json.loads(line)["id"]))
        for side in self.output_dir.glob("shard-*.dropped.json"):
            ids.update(str(i) for i in json.loads(side.read_text(encoding="utf-8")))
        return ids

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".shard-*.tmp"):  # left by a run killed mid-write; never a finished shard
            stale.unlink(missing_ok=True)
        # compared as stored (tuples -> lists)
        info = json.loads(json.dumps(pl_module.lineage({"output_dir": str(self.output_dir)})))
        old_file = self.output_dir / "lineage.json"
        finished = list(self.output_dir.glob("shard-*.json*"))
        if finished and self.restart:
            for f in finished:
                f.unlink()
            (self.output_dir / "summary.json").unlink(missing_ok=True)
        elif finished:
            old = json.loads(old_file.read_text(encoding="utf-8")) if old_file.exists() else None
            if old is None:
                raise ValueError(
                    f"{self.output_dir} holds shards without a lineage.json; they may come from another teacher. "
                    "Set TraceWriter.init_args.restart: true to start afresh, or choose another output_dir"
                )
            diff = {k: (old.get(k), info.get(k)) for k in LINEAGE_KEYS if old.get(k) != info.get(k)}
            if diff:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise ValueError(
                    f"{self.output_dir} holds traces of another lineage ({shown}); refusing to mix them. Set "
                    "TraceWriter.init_args.restart: true to start afresh, or choose another output_dir"
                )
        self.done_ids = self._finished_ids()
        atomic_write_text(old_file, json.dumps(info, indent=2))

    def _fit_budget(self, pl_module, trace: dict) -> dict | None:
        if self.max_trace_tokens is None:
            return trace
        fmt, tok = pl_module.format, pl_module.tokenizer
        text = fmt.student_text(trace["question"], trace["thought"], trace["solution"], tok).text
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n <= self.max_trace_tokens:
            return trace
        self.counts["overflow"] += 1
        if self.overflow == "drop":
            self.counts["dropped"] += 1
            return None
        if self.overflow == "truncate":
            thought_ids = tok(trace["thought"], add_special_tokens=False)["input_ids"]
            keep = max(0, len(thought_ids) - (n - self.max_trace_tokens))
            trace = dict(trace, thought=tok.decode(thought_ids[:keep]), truncated=True)
        return trace

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if prediction is None:
            return
        # several ranks: rows written before were regenerated on another rank's behalf
        prediction = [t for t in prediction if str(t["id"]) not in self.done_ids]
        if not prediction:
            return
        lines, dropped = [], []
        for trace in prediction:
            self.counts["rows"] += 1
            if not trace["matched"]:
                self.counts["unmatched"] += 1
                if self.drop_unmatched:
                    self.counts["dropped"] += 1
                    dropped.append(str(trace["id"]))
                    continue
            kept = self._fit_budget(pl_module, trace)
            if kept is None:
                dropped.append(str(trace["id"]))
            else:
                lines.append(json.dumps(kept, ensure_ascii=False))
        path = self.shard_path(batch_idx)
        if dropped:  # before the shard: a kill in between regenerates the kept rows, never the dropped ones twice
            atomic_write_text(path.with_name(path.name[: -len(".jsonl")] + ".dropped.json"), json.dumps(dropped))
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        self.done_ids.update(str(t["id"]) for t in prediction)
        self.counts["written"] += len(lines)

    def on_predict_end(self, trainer, pl_module) -> None:
        keys = sorted(self.counts)
        counts = dict(zip(keys, (int(v) for v in all_reduce_sum([self.counts[k] for k in keys]))))  # all ranks
        if trainer.is_global_zero:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(counts, indent=2))
        rank_zero_info(f"traces → {self.output_dir}: {counts}")
