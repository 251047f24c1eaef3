"""Benchmark evaluator: grades k sampled responses per question with a task, aggregates pass@k, breakdowns and
response statistics, and writes per-question records atomically. Protocol: arXiv 2506.08388 (SkyThought reports accuracy
averaged over samples, i.e. our pass@1 when n > 1).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from rlt_pl.metrics import pass_at_k
from rlt_pl.tasks.base import Task

DEFAULT_BREAKDOWN_KEYS = ("subject", "level", "domain")


class BenchmarkEvaluator:
    """Accumulates graded samples for one benchmark.

    Args:
        task: The grader (``rlt_pl.tasks``).
        name: Benchmark name; prefixes every metric key (``"math500/pass@1"``).
        k_values: The k's of pass@k to report (pass@1 is always reported). Every question needs >= max(k) samples.
        output_path: Where ``write_jsonl()`` writes per-question records by default (``None``: only on request).
        breakdown_keys: Row ``metadata`` keys that get a per-value pass@1 (``"math500/pass@1/subject=Algebra"``).
    """

    def __init__(
        self,
        task: Task,
        name: str,
        k_values: Sequence[int] = (1,),
        output_path: str | None = None,
        breakdown_keys: Sequence[str] = DEFAULT_BREAKDOWN_KEYS,
    ) -> None:
        if not k_values or any(k < 1 for k in k_values):
            raise ValueError(f"k_values must be non-empty positive ints, got {k_values}")
        self.task = task
        self.name = name
        self.k_values = tuple(sorted({1, *k_values}))
        self.output_path = output_path
        self.breakdown_keys = tuple(breakdown_keys)
        self.records: list[dict] = []

    def reset(self) -> None:
        """Forget all graded questions."""
        self.records = []

    def update(
        self,
        rows: Sequence[dict],
        responses: Sequence[Sequence[str]],
        token_counts: Sequence[Sequence[int]] | None = None,
    ) -> list[dict]:
        """Grade ``responses[i]`` (all samples for ``rows[i]``).

        Args:
            rows: Normalised rows.
            responses: One list of sampled responses per row.
            token_counts: Optional response lengths in tokens, same nesting as ``responses``.

        Returns:
            The per-question records added.
        """
        if len(rows) != len(responses):
            raise ValueError(f"{self.name}: {len(rows)} rows but {len(responses)} response lists")
        if token_counts is not None and [len(t) for t in token_counts] != [len(r) for r in responses]:
            raise ValueError(f"{self.name}: token_counts must have the same shape as responses")
        added = []
        for i, (row, samples) in enumerate(zip(rows, responses)):
            if isinstance(samples, str):
                raise TypeError(f"{self.name}: responses[{i}] is a str; pass a list of samples per question")
            if len(samples) < self.k_values[-1]:
                need = self.k_values[-1]
                raise ValueError(
                    f"{self.name}: question {row['id']!r} has {len(samples)} samples, pass@{need} needs more"
                )
            graded = [self.task.grade(s, row) for s in samples]
            record = {
                "id": row["id"],
                "question": row["question"],
                "answer": row["answer"],
                "metadata": {
                    k: v for k, v in row.get("metadata", {}).items() if k in self.breakdown_keys and v is not None
                },
                "responses": list(samples),
                "extracted": [g[0] for g in graded],
                "correct": [bool(g[1]) for g in graded],
                "response_chars": [len(s) for s in samples],
            }
            if token_counts is not None:
                record["response_tokens"] = [int(t) for t in token_counts[i]]
            self.records.append(record)
            added.append(record)
        return added

    def compute(self) -> dict[str, float]:
        """Aggregate metrics over all graded questions (empty dict when there are none).

        Returns:
            Keys ``{name}/pass@{k}``, ``{name}/pass@1/{key}={value}``, ``{name}/no_answer_rate``,
            ``{name}/response_chars_mean``, ``{name}/response_tokens_mean`` (if given), ``{name}/num_questions``.
        """
        if not self.records:
            return {}
        p = self.name
        out: dict[str, float] = {}
        for k in self.k_values:
            scores = [pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in self.records]
            out[f"{p}/pass@{k}"] = sum(scores) / len(scores)
        groups: dict[str, list[float]] = defaultdict(list)
        for r in self.records:
            p1 = sum(r["correct"]) / len(r["correct"])
            for key, value in r["metadata"].items():
                groups[f"{p}/pass@1/{key}={value}"].append(p1)
        out.update({key: sum(v) / len(v) for key, v in sorted(groups.items())})
        samples = [x for r in self.records for x in r["extracted"]]
        out[f"{p}/no_answer_rate"] = sum(x is None for x in samples) / len(samples)
        chars = [c for r in self.records for c in r["response_chars"]]
        out[f"{p}/response_chars_mean"] = sum(chars) / len(chars)
        out[f"{p}/response_chars_max"] = float(max(chars))
        if all("response_tokens" in r for r in self.records):
            tokens = [t for r in self.records for t in r["response_tokens"]]
            out[f"{p}/response_tokens_mean"] = sum(tokens) / len(tokens)
        out[f"{p}/num_questions"] = float(len(self.records))
        return out

    def write_jsonl(self, path: str | None = None) -> Path:
        """Write one JSON line per question atomically (temp file in the same folder, then ``os.replace``).

        Args:
            path: Destination; defaults to ``output_path``.

        Returns:
            The written path.
        """
        target = path or self.output_path
        if target is None:
            raise ValueError(f"{self.name}: no path given and output_path is None")
        dest = Path(target).expanduser().resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for record in self.records:
                    f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest
