"""Trace generation: the teacher explains (question, solution) rows; `TraceWriter` stores them as atomic shards.

`python -m rlt_pl predict -c ...` with a teacher module (`TeacherSFTModule`, `TeacherRLModule`) and this callback
writes one JSONL shard per predict batch (`shard-00000.jsonl`, temp file + `os.replace`), so a killed run leaves
only complete shards and a rerun skips them (the module asks `is_done(batch_idx)` before generating). With
`predict_num_samples` N > 1 and a `StudentRewardCallback`, the explanation with the highest RLT reward is kept
(best-of-N, as the authors' offline scorer does). Traces longer than the student's context budget are counted and
kept, dropped or truncated as configured. `lineage.json` records the teacher, its hash, sampling and time.
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


def find_trace_writer(trainer) -> TraceWriter | None:
    found = [cb for cb in trainer.callbacks if isinstance(cb, TraceWriter)] if trainer is not None else []
    return found[0] if found else None


@torch.no_grad()
def generate_traces(module, rows: list[dict], batch_idx: int, n: int = 1) -> list[dict] | None:
    """Sample n explanations per row with the teacher, keep the best by RLT reward (if n > 1), return trace rows."""
    writer = find_trace_writer(module.trainer)
    if writer is not None and writer.is_done(batch_idx):
        return None
    fmt = module.format
    prompts = [fmt.teacher_prompt(r["question"], r["solution"], module.tokenizer) for r in rows]
    sampling = replace(module.sampling, stop_strings=tuple(fmt.teacher_stop_strings()))
    keep = module.prompts_within_limit(prompts, sampling)  # over-long prompts: counted, skipped
    if writer is not None:
        writer.counts["skipped_long_prompts"] += len(rows) - len(keep)
    rows, prompts = [rows[i] for i in keep], [prompts[i] for i in keep]
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
        )
        scores = torch.nan_to_num(result.output.reward.view(len(rows), n), nan=-float("inf"))
        best = (scores.argmax(-1) + torch.arange(len(rows)) * n).tolist()
        rewards = scores.max(-1).values.tolist()
    out = []
    for i, row in enumerate(rows):
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
    """

    def __init__(
        self,
        output_dir: str,
        max_trace_tokens: int | None = None,
        overflow: Literal["keep", "drop", "truncate"] = "keep",
        drop_unmatched: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.max_trace_tokens = max_trace_tokens
        self.overflow = overflow
        self.drop_unmatched = drop_unmatched
        self.counts = {"rows": 0, "written": 0, "unmatched": 0, "overflow": 0, "dropped": 0, "skipped_shards": 0}
        self.counts["skipped_long_prompts"] = 0

    def shard_path(self, batch_idx: int) -> Path:
        return self.output_dir / f"shard-{batch_idx:05d}.jsonl"

    def is_done(self, batch_idx: int) -> bool:
        done = self.shard_path(batch_idx).exists()
        if done:
            self.counts["skipped_shards"] += 1
        return done

    def on_predict_start(self, trainer, pl_module) -> None:
        from rlt_pl.modules.base import lineage

        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".shard-*.tmp"):  # left by a run killed mid-write; never a finished shard
            stale.unlink(missing_ok=True)
        info = lineage(pl_module, {"output_dir": str(self.output_dir)})
        atomic_write_text(self.output_dir / "lineage.json", json.dumps(info, indent=2))

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
        lines = []
        for trace in prediction:
            self.counts["rows"] += 1
            if not trace["matched"]:
                self.counts["unmatched"] += 1
                if self.drop_unmatched:
                    self.counts["dropped"] += 1
                    continue
            trace = self._fit_budget(pl_module, trace)
            if trace is not None:
                lines.append(json.dumps(trace, ensure_ascii=False))
        atomic_write_text(self.shard_path(batch_idx), "".join(line + "\n" for line in lines))
        self.counts["written"] += len(lines)

    def on_predict_end(self, trainer, pl_module) -> None:
        atomic_write_text(self.output_dir / "summary.json", json.dumps(self.counts, indent=2))
        rank_zero_info(f"traces → {self.output_dir}: {self.counts}")
