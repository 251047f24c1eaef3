"""Explanation inspector: why an explanation is rewarded, token by token, as one self-contained HTML page.

    python -m rlt_pl.inspect RUN_DIR_OR_SCORES.jsonl --out report.html

Each explanation token is coloured by its rKL term `d_k = ℓT_k − ℓS_k` (teacher log-prob with the solution in
context minus student log-prob without it: red where the explanation relies on knowing the answer, blue where the
student finds the token likelier than the teacher), each solution token by the student's log-prob `ℓS` (white: the
student expects it; red: it does not). Beside each sample: its reward decomposition (rSS, rKL, match) and advantage,
and per group the advantages of all its samples. Hover a token for its values.

Input: a JSONL of sample records, written by `TeacherRLModule` every `sample_table_every_n_steps` into
`<log_dir>/inspect/step_NNNNNN.jsonl` (a run directory picks its newest), or by `python -m rlt_pl.score --per-token`.
A record holds `question`, `explanation`, `reward`, `rss`, `rkl`, optional `match`/`advantage`/`group`,
`explanation_tokens` as `[text, teacher_logprob, student_logprob]` triples and `solution_tokens` as
`[text, student_logprob]` pairs.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

# Colour scales: |d| of this many nats (rKL term) / this student log-prob (solution) is full intensity.
RKL_FULL_SCALE = 4.0
SOLUTION_FULL_SCALE = -6.0


def _row_tokens(tokenizer, ids: Tensor, mask: Tensor) -> list[str]:
    return [tokenizer.decode([int(t)]) for t, m in zip(ids.tolist(), mask.tolist()) if m]


def sample_records(
    result,
    tokenizer,
    questions: Sequence[str],
    rows: Sequence[int] | None = None,
    advantages: Sequence[float] | None = None,
    groups: Sequence[int] | None = None,
) -> list[dict]:
    """JSON-serialisable per-sample records with per-token terms, from an `RLTScorer` `ScoreResult`.

    Args:
        result: the `ScoreResult` (its `tokens` carry the per-token log-probs).
        tokenizer: the tokenizer the scorer used (decodes each token for display).
        questions: the batch's questions, one per scored row.
        rows: which rows to keep (default: all).
        advantages: per-row GRPO advantages of the whole batch (optional).
        groups: per-row group index of the whole batch (optional).
    """
    tok, out = result.tokens, result.output
    if tok is None:
        raise ValueError("sample_records needs a ScoreResult with per-token terms (RLTScorer.score fills `tokens`)")
    records = []
    for i in rows if rows is not None else range(len(questions)):
        k = tok.explanation_mask.shape[1]
        ids = tok.explanation_ids[i]
        ids = torch.nn.functional.pad(ids, (0, max(0, k - ids.shape[0])))[:k]  # to the aligned width
        mask = tok.explanation_mask[i].bool()
        t_lp = [float(x) for x, m in zip(tok.teacher_logprobs[i].tolist(), mask.tolist()) if m]
        s_lp = [float(x) for x, m in zip(tok.student_logprobs[i].tolist(), mask.tolist()) if m]
        sol_mask = tok.solution.mask[i].bool()
        sol_lp = [float(x) for x, m in zip(tok.solution.logprobs[i].tolist(), sol_mask.tolist()) if m]
        record = {
            "question": questions[i],
            "explanation": result.explanations[i],
            "reward": float(out.reward[i]),
            "rss": float(out.rss[i]),
            "rkl": float(out.rkl[i]),
            "match": float(out.match[i]),
            "explanation_tokens": [list(x) for x in zip(_row_tokens(tokenizer, ids, mask), t_lp, s_lp)],
            "solution_tokens": [list(x) for x in zip(_row_tokens(tokenizer, tok.solution.ids[i], sol_mask), sol_lp)],
        }
        if advantages is not None:
            record["advantage"] = float(advantages[i])
        if groups is not None:
            record["group"] = int(groups[i])
        records.append(record)
    return records


def _finite(x: float, fill: float = 0.0) -> float:
    return x if isinstance(x, int | float) and math.isfinite(x) else fill


def rkl_colour(d: float) -> str:
    """Background for an rKL term: white at 0, red for d > 0 (teacher surer than the student), blue for d < 0."""
    a = min(1.0, abs(_finite(d)) / RKL_FULL_SCALE)
    return f"rgba(220,40,40,{a:.2f})" if d > 0 else f"rgba(40,90,220,{a:.2f})"


def solution_colour(logprob: float) -> str:
    """Background for a solution token: white at log-prob 0 (expected), red towards `SOLUTION_FULL_SCALE`."""
    a = min(1.0, max(0.0, _finite(logprob, SOLUTION_FULL_SCALE) / SOLUTION_FULL_SCALE))
    return f"rgba(220,40,40,{a:.2f})"


def _span(text: str, colour: str, tip: str, cls: str) -> str:
    shown = html.escape(text).replace("\n", "↵<br>") or "∅"
    return f'<span class="tok {cls}" style="background:{colour}" title="{html.escape(tip)}">{shown}</span>'


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else "–"


def render_sample(record: dict) -> str:
    expl = "".join(
        _span(t, rkl_colour(tl - sl), f"d = {tl - sl:+.3f}  (teacher {tl:.3f}, student {sl:.3f})", "e")
        for t, tl, sl in record.get("explanation_tokens", [])
    )
    sol = "".join(
        _span(t, solution_colour(lp), f"student log-prob {lp:.3f}", "s") for t, lp in record.get("solution_tokens", [])
    )
    terms = [("reward", record.get("reward")), ("rSS", record.get("rss")), ("rKL", record.get("rkl"))]
    terms += [("match", record.get("match")), ("advantage", record.get("advantage"))]
    cells = "".join(f"<th>{k}</th><td>{_fmt(v)}</td>" for k, v in terms if v is not None)
    return (
        '<div class="sample">'
        f'<table class="terms"><tr>{cells}</tr></table>'
        f'<div class="q"><b>question</b> {html.escape(str(record.get("question", "")))}</div>'
        f'<div class="label">explanation (rKL term per token)</div><div class="expl">{expl or "∅"}</div>'
        f'<div class="label">solution (student log-prob per token)</div><div class="sol">{sol or "∅"}</div>'
        "</div>"
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin:18px 0 6px}
.sample{border:1px solid #ccc;border-radius:6px;padding:8px;margin:8px 0}
.terms th{font-weight:600;padding:0 4px 0 12px;text-align:right}.terms td{font-family:monospace}
.label{font-size:12px;color:#666;margin-top:6px}
.expl,.sol{font-family:monospace;font-size:14px;line-height:1.9;word-break:break-all}
.tok{padding:1px 0;border-right:1px solid #fff}
.adv{font-family:monospace}.legend span{padding:2px 6px;margin-right:4px}
"""


def render_html(records: Sequence[dict], title: str = "RLT explanation inspector") -> str:
    """A self-contained HTML page (inline CSS, no scripts, no external resources) of `records`, grouped."""
    groups: dict[int, list[dict]] = {}
    for k, r in enumerate(records):
        groups.setdefault(int(r.get("group", k)), []).append(r)
    legend = (
        '<div class="legend">rKL term d: '
        + "".join(_span(f"{d:+g}", rkl_colour(d), "", "") for d in (-4, -2, 0, 2, 4))
        + " &nbsp; solution log-prob: "
        + "".join(_span(f"{lp:g}", solution_colour(lp), "", "") for lp in (0, -1, -3, -6))
        + "</div>"
    )
    body = [f"<h1>{html.escape(title)}</h1>", legend]
    for g, members in groups.items():
        advs = [m["advantage"] for m in members if "advantage" in m]
        adv_text = " ".join(f"{a:+.2f}" for a in advs)
        head = f"group {g}" + (f' — advantages <span class="adv">[{adv_text}]</span>' if advs else "")
        body.append(f'<section class="group"><h2>{head}</h2>')
        body += [render_sample(m) for m in members]
        body.append("</section>")
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>"
    )


def find_records(path: Path) -> Path:
    """`path` itself if a file, else the newest `inspect/step_*.jsonl` under the run directory `path`."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: neither a JSONL file nor a run directory")
    found = sorted(path.rglob("inspect/step_*.jsonl"), key=lambda p: (p.stat().st_mtime, p.name))
    if not found:
        raise FileNotFoundError(f"{path}: no inspect/step_*.jsonl (written by TeacherRLModule's sample tables)")
    return found[-1]


def read_records(path: Path) -> list[dict]:
    """Records of a JSONL; lines without per-token terms are refused with their line number."""
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "explanation_tokens" not in row:
            raise ValueError(f"{path}:{n}: no explanation_tokens (score with `python -m rlt_pl.score --per-token`)")
        records.append(row)
    return records


def write_page(records: Sequence[dict], out: Path, title: str = "RLT explanation inspector") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(records, title), encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory (newest inspect/step_*.jsonl) or a JSONL of sample records")
    parser.add_argument("--out", default="report.html", help="HTML file to write")
    args = parser.parse_args(argv)
    try:
        path = find_records(Path(args.source))
        records = read_records(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"rlt_pl.inspect: error: {exc}") from None
    out = write_page(records, Path(args.out), title=f"RLT explanation inspector — {path.name}")
    print(f"{len(records)} samples from {path} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
