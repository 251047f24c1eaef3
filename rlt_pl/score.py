"""Offline RLT scorer: rSS / rKL rewards for (question, solution, completion) rows in a JSONL file.

    python -m rlt_pl.score --teacher DIR --student DIR --input IN.jsonl [--output OUT.jsonl] [--format stratos]

Each input row has `question`, `solution` (the content between the solution tags, verbatim) and either
`completion` (the raw text after the RL prompt, end tag included when closed) or `explanation` (the text between
the explanation tags; the completion is then that text, minus the leading padding, plus the end tag). Rows are
scored on the text path (the teacher model re-scores the re-encoded completion, spec P3), in batches. Output rows
are the input rows plus `reward`, `rss`, `rkl`, `matched` and the reward components. Malformed rows are counted
and reported by line number; the output file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from rlt_pl.formats import CompactFormat, RLTFormat, StratosFormat
from rlt_pl.rewards import RewardConfig

FORMATS = {"stratos": StratosFormat, "compact": CompactFormat}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m rlt_pl.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher model directory (its tokenizer is used for both)")
    p.add_argument("--student", required=True, help="student model directory")
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", default=None, help="output JSONL (default: <input>.scored.jsonl)")
    p.add_argument("--format", choices=sorted(FORMATS), default="stratos")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="student context limit; longer rows are penalised")
    p.add_argument("--kl-coeffs", type=float, nargs=2, default=(3.0, 0.03), help="weights of rKL mean, max")
    p.add_argument("--rss-coeffs", type=float, nargs=2, default=(1.0, 0.01), help="weights of rSS mean, min")
    p.add_argument("--temperature", type=float, default=0.7, help="teacher log-prob temperature")
    p.add_argument("--student-temperature", type=float, default=0.7)
    p.add_argument("--token-budget", type=int, default=65536, help="max tokens per forward chunk")
    p.add_argument("--per-token", action="store_true", help="add per-token log-probs (input of rlt_pl.inspect)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_row(line: str, fmt: RLTFormat) -> tuple[dict | None, str | None]:
    """One JSONL line -> (row with a `completion` to score, None) or (None, reason it is malformed).

    Args:
        line: the raw line.
        fmt: the format (explanation tags and padding).
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"bad JSON ({err.msg})"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    for key in ("question", "solution"):
        if not isinstance(row.get(key), str):
            return None, f"missing or non-string field {key!r}"
    has_c, has_e = isinstance(row.get("completion"), str), isinstance(row.get("explanation"), str)
    if not (has_c or has_e):
        return None, "needs a string 'completion' or 'explanation'"
    if has_c:
        return {**row, "_completion": row["completion"]}, None
    expl = row["explanation"]
    pad = fmt.explanation_padding
    body = expl[len(pad) :] if pad and expl.startswith(pad) else expl
    return {**row, "_completion": body + fmt.explanation_end}, None


def read_rows(path: Path, fmt: RLTFormat) -> tuple[list[dict], list[tuple[int, str]]]:
    """Parse the input file; return the good rows and `(line number, reason)` of the malformed ones.

    Args:
        path: input JSONL.
        fmt: the format.
    """
    rows, bad = [], []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row, reason = parse_row(line, fmt)
            if row is None:
                bad.append((number, reason))
            else:
                rows.append(row)
    return rows, bad


def _to_python(x: torch.Tensor) -> float | int | bool:
    return x.item()


def score_rows(
    scorer, teacher, fmt: RLTFormat, rows: list[dict], batch_size: int, per_token: bool = False
) -> tuple[list[dict], dict]:
    """Score rows in batches; return output rows and summed counters.

    Args:
        scorer: an `RLTScorer`.
        teacher: the teacher model (text path).
        fmt: the format.
        rows: parsed rows (with `_completion`).
        batch_size: rows per scorer call.
        per_token: add `explanation_tokens` / `solution_tokens` (the inspector's input, `rlt_pl.inspect`).
    """
    out, counts = [], {}
    for i in tqdm(range(0, len(rows), batch_size), desc="scoring", unit="batch", file=sys.stderr):
        chunk = rows[i : i + batch_size]
        qs = [r["question"] for r in chunk]
        ss = [r["solution"] for r in chunk]
        cs = [r["_completion"] for r in chunk]
        prompts = [fmt.teacher_prompt(q, s, scorer.tokenizer) for q, s in zip(qs, ss)]
        res = scorer.score(qs, ss, cs, teacher_model=teacher, prompts=prompts)
        for key, value in res.counts.items():
            counts[key] = counts.get(key, 0) + value
        o = res.output
        if per_token:
            from rlt_pl.inspect import sample_records

            tokens = sample_records(res, scorer.tokenizer, qs)
        for j, row in enumerate(chunk):
            record = {k: v for k, v in row.items() if k != "_completion"}
            record.update(
                reward=_to_python(o.reward[j]),
                rss=_to_python(o.rss[j]),
                rkl=_to_python(o.rkl[j]),
                matched=bool(res.matched[j]),
                components={k: _to_python(v[j]) for k, v in o.components.items()},
            )
            if per_token:
                record.update({k: tokens[j][k] for k in ("match", "explanation_tokens", "solution_tokens")})
            out.append(record)
    return out, counts


def write_atomic(path: Path, rows: Sequence[dict]) -> None:
    """Write JSONL to a temporary file beside `path`, then `os.replace` it into place.

    Args:
        path: destination.
        rows: JSON-serialisable rows.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scorer; returns 0 on success, 2 when nothing could be scored.

    Args:
        argv: command-line arguments (None: `sys.argv[1:]`).
    """
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlt_pl.scoring import RLTScorer

    fmt = FORMATS[args.format]()
    config = RewardConfig(
        answer_log_prob_coeffs=tuple(args.rss_coeffs),
        kl_penalty_coeffs=tuple(args.kl_coeffs),
        student_temperature=args.student_temperature,
        teacher_temperature=args.temperature,
    )
    in_path = Path(args.input)
    out_path = Path(args.output) if args.output else in_path.with_suffix(".scored.jsonl")
    rows, bad = read_rows(in_path, fmt)
    for number, reason in bad:
        print(f"{in_path}:{number}: skipped: {reason}", file=sys.stderr)

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(args.device).eval()
    teacher, student = load(args.teacher), load(args.student)
    scorer = RLTScorer(student, tokenizer, fmt, config, max_length=args.max_length, token_budget=args.token_budget)
    scored, counts = score_rows(scorer, teacher, fmt, rows, args.batch_size, args.per_token)
    write_atomic(out_path, scored)

    n = len(scored)
    mean = lambda key: sum(r[key] for r in scored) / n if n else float("nan")
    print(
        f"scored {n} rows -> {out_path} | malformed {len(bad)} | mean reward {mean('reward'):.4f} "
        f"rss {mean('rss'):.4f} rkl {mean('rkl'):.4f} | unmatched {counts.get('unmatched', 0)} "
        f"overflow {counts.get('overflow', 0)} token_mismatch {counts.get('token_mismatch', 0)}"
    )
    return 0 if n else 2


if __name__ == "__main__":
    raise SystemExit(main())
