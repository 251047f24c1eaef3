"""Offline RLT scorer: rSS / rKL rewards for (question, solution, completion) rows in a JSONL file.

    python -m rlt_pl.score --teacher DIR --student DIR --input IN.jsonl|TRACE_DIR [--output OUT.jsonl]

Each input row has `question`, `solution` (the content between the solution tags, verbatim) and one of
`completion` (the raw text after the RL prompt, end tag included when closed), `explanation` (the text between
the explanation tags; the completion is then that text, minus the leading padding, plus the end tag) or `thought`
(a `TraceWriter` trace: like `explanation`, closed only when its `matched` is not false). `--input` may be a trace
directory: its `shard-*.jsonl` are read in order and its `lineage.json` gives the format (`--format`, if given,
must agree). Rows are scored on the text path (the teacher model re-scores the re-encoded completion, spec P3), in
batches; every forward is bounded by `--max-length` (default: the student's context size).

Output rows are the input rows plus `reward`, `rss`, `rkl`, `matched`, `penalised` (null, or why the reward is a
penalty: overflow, unmatched, empty_explanation, empty_solution) and the reward components. Penalised rows get at
most the worst regular reward of rows with the same question and solution (of the whole file when that group has
no regular row), minus `--penalty-margin`. Malformed rows (bad JSON or UTF-8, NaN / Infinity, lone surrogates,
nesting or integers too large to parse, missing fields, an empty question, a non-bool `matched`) are counted and
reported by line number (a UTF-8 BOM is ignored); text is NFC-normalised (counted). The output path, the model
paths and the flags are checked before any model is loaded; the output may not be the input and is written
atomically with the umask's permissions.
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
from rlt_pl.rewards import RewardConfig, penalise_below_group
from rlt_pl.spans import loads_finite, nfc_text

FORMATS = {"stratos": StratosFormat, "compact": CompactFormat}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_FIELDS = ("question", "solution", "completion", "explanation", "thought")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m rlt_pl.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher model directory (its tokenizer is used for both)")
    p.add_argument("--student", required=True, help="student model directory")
    p.add_argument("--input", required=True, help="input JSONL")
    p.add_argument("--output", default=None, help="output JSONL (default: <input>.scored.jsonl)")
    p.add_argument(
        "--format", choices=sorted(FORMATS), default=None, help="default: the trace lineage's format, else stratos"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="context limit of every forward (student and teacher); longer rows are penalised "
        "(default: the student's max_position_embeddings)",
    )
    p.add_argument("--penalty-margin", type=float, default=1.0, help="penalties go this far below the worst row")
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="model dtype (auto: bfloat16 on CUDA, else float32)"
    )
    p.add_argument(
        "--allow-tokenizer-mismatch", action="store_true", help="score although the student's tokenizer differs"
    )
    p.add_argument("--kl-coeffs", type=float, nargs=2, default=(3.0, 0.03), help="weights of rKL mean, max")
    p.add_argument("--rss-coeffs", type=float, nargs=2, default=(1.0, 0.01), help="weights of rSS mean, min")
    p.add_argument("--temperature", type=float, default=0.7, help="teacher log-prob temperature")
    p.add_argument("--student-temperature", type=float, default=0.7)
    p.add_argument("--token-budget", type=int, default=65536, help="max tokens per forward chunk")
    p.add_argument("--per-token", action="store_true", help="add per-token log-probs (input of rlt_pl.inspect)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _clean_text(row: dict) -> tuple[str | None, bool]:
    """Reject lone surrogates (not encodable as UTF-8) and NFC-normalise the text fields in place.
    Returns (reason it is malformed or None, whether a field changed)."""
    changed = False
    for key in TEXT_FIELDS:
        value = row.get(key)
        if not isinstance(value, str):
            continue
        try:
            nfc = nfc_text(key, value)
        except ValueError as err:
            return str(err), False
        if nfc != value:
            row[key], changed = nfc, True
    return None, changed


def parse_row(line: str | bytes, fmt: RLTFormat) -> tuple[dict | None, str | None]:
    """One JSONL line -> (row with a `completion` to score, None) or (None, reason it is malformed).

    The row gets `_completion` (what is scored) and `_nfc` (True when NFC normalisation changed a field); its
    text fields are NFC-normalised, the original row is kept under `_raw` for the output.

    Args:
        line: the raw line (bytes are decoded as strict UTF-8).
        fmt: the format (explanation tags and padding).
    """
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return None, f"invalid UTF-8 (byte {err.start})"
    try:
        raw = loads_finite(line.removeprefix("\ufeff"))  # a BOM (first line of some files) is not part of the row
    except json.JSONDecodeError as err:
        return None, f"bad JSON ({err.msg})"
    except RecursionError:
        return None, "bad JSON (nested too deeply)"
    except ValueError as err:  # e.g. an integer longer than the int parsing limit
        return None, f"bad JSON ({err})"
    if not isinstance(raw, dict):
        return None, "not a JSON object"
    row = dict(raw)
    reason, changed = _clean_text(row)
    if reason is not None:
        return None, reason
    for key in ("question", "solution"):
        if not isinstance(row.get(key), str):
            return None, f"missing or non-string field {key!r}"
    if not row["question"].strip():
        return None, "empty field 'question'"
    if "matched" in row and not isinstance(row["matched"], bool):
        return None, f"field 'matched' is {type(row['matched']).__name__}, expected true or false"
    kind = next((k for k in ("completion", "explanation", "thought") if isinstance(row.get(k), str)), None)
    if kind is None:
        return None, "needs a string 'completion', 'explanation' or 'thought'"
    if kind == "completion":
        return {**row, "_completion": row["completion"], "_nfc": changed, "_raw": raw}, None
    expl = row[kind]
    pad = fmt.explanation_padding
    body = expl[len(pad) :] if pad and expl.startswith(pad) else expl
    closed = kind == "explanation" or row.get("matched") is not False
    completion = body + fmt.explanation_end if closed else body
    return {**row, "_completion": completion, "_nfc": changed, "_raw": raw}, None


def input_files(path: Path) -> list[Path]:
    """The JSONL file, or a trace directory's `shard-*.jsonl` in order."""
    if path.is_dir():
        shards = sorted(path.glob("shard-*.jsonl"))
        if not shards:
            raise SystemExit(f"--input {path}: a directory without shard-*.jsonl files")
        return shards
    if not path.is_file():
        raise SystemExit(f"--input {path}: no such file or directory")
    return [path]


def read_rows(path: Path, fmt: RLTFormat) -> tuple[list[dict], list[tuple[str, str]]]:
    """Parse the input (a file or a trace directory); return the good rows and `(file:line, reason)` of the others.

    Args:
        path: input JSONL or trace directory.
        fmt: the format.
    """
    rows, bad = [], []
    for file in input_files(path):
        with file.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row, reason = parse_row(line, fmt)
                if row is None:
                    bad.append((f"{file}:{number}", reason))
                else:
                    rows.append(row)
    return rows, bad


def lineage_format(path: Path) -> str | None:
    """The format key recorded in a trace directory's `lineage.json` (beside a shard, or in the directory)."""
    lineage = (path if path.is_dir() else path.parent) / "lineage.json"
    if not lineage.is_file():
        return None
    try:
        name = json.loads(lineage.read_text(encoding="utf-8")).get("format")
    except (ValueError, AttributeError) as err:
        raise SystemExit(f"{lineage}: unreadable lineage ({err}); fix it or move it away") from err
    by_class = {cls.__name__: key for key, cls in FORMATS.items()}
    if name is not None and name not in by_class:
        raise SystemExit(f"{lineage}: format {name!r} is not one of {sorted(by_class)}")
    return by_class.get(name)


def choose_format(requested: str | None, path: Path) -> str:
    """`--format` checked against the trace lineage (or taken from it)."""
    recorded = lineage_format(path)
    if requested is not None and recorded is not None and requested != recorded:
        raise SystemExit(f"--format {requested} disagrees with the traces' lineage.json (format {recorded})")
    return requested or recorded or "stratos"


def check_format_against_rows(fmt_key: str, rows: Sequence[dict]) -> None:
    """Refuse a format whose end tag no raw completion contains when another format's end tag is in them."""
    completions = [r["completion"] for r in rows if isinstance(r.get("completion"), str)]
    if not completions:
        return
    own = FORMATS[fmt_key]().explanation_end
    if any(own in c for c in completions):
        return
    for key, cls in FORMATS.items():
        other = cls().explanation_end
        if key != fmt_key and sum(other in c for c in completions) > 0:
            raise SystemExit(
                f"--format {fmt_key}: no completion contains its end tag {own!r}, but some contain {other!r} "
                f"(--format {key}); every row would be scored as unmatched"
            )


def check_output(out_path: Path, in_path: Path) -> None:
    """Before any work: the output is not the input, is not a directory, and its directory is writable."""
    if out_path.resolve() == in_path.resolve() or (out_path.exists() and out_path.samefile(in_path)):
        raise SystemExit(f"--output {out_path} is the input file; choose another path")
    if in_path.is_dir() and out_path.resolve().parent == in_path.resolve() and out_path.name.startswith("shard-"):
        raise SystemExit(f"--output {out_path} would be read as a trace shard of --input; choose another name")
    if out_path.is_dir():
        raise SystemExit(f"--output {out_path} is a directory")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SystemExit(f"--output {out_path}: cannot write there ({err.strerror})") from err


def check_model_path(flag: str, value: str) -> None:
    """Before any work: a local model path must be a model directory (a Hub id "org/name" is passed through)."""
    from rlt_pl.models import resolve_name_or_path

    try:
        resolved = resolve_name_or_path(value)
    except ValueError as err:
        raise SystemExit(f"{flag} {value}: no such model directory (nor a Hub id 'org/name')") from err
    path = Path(resolved)
    if path.exists() and not (path / "config.json").is_file():
        raise SystemExit(f"{flag} {value}: not a model directory (no config.json)")


def penalty_reason(record: dict) -> str | None:
    """Why a scored row's reward is a penalty (None: a regular reward)."""
    comps = record["components"]
    if not comps.get("penalised"):
        return None
    if comps.get("overflow"):
        return "overflow"
    if not record["matched"]:
        return "unmatched"
    if comps.get("explanation_tokens") == 0:
        return "empty_explanation"
    return "empty_solution"


def apply_group_penalties(scored: list[dict], margin: float | None) -> None:
    """Penalised rows go below the worst regular reward of the rows sharing their question and solution."""
    if not scored:
        return
    keys: dict[tuple[str, str], int] = {}
    groups = torch.tensor([keys.setdefault((r["_key"]), len(keys)) for r in scored])
    raw = torch.tensor([r["components"]["reward_unpenalised"] for r in scored], dtype=torch.float64)
    pen = torch.tensor([r["penalised"] is not None for r in scored])
    if margin is None:
        reward = raw
    else:
        reward = penalise_below_group(raw, pen, groups, margin)
        # a group with no regular row (e.g. every row of an empty solution) goes below the file's worst regular row
        has_regular = torch.zeros(len(keys), dtype=torch.bool).index_fill_(0, groups[~pen], True)
        orphan = pen & ~has_regular[groups]
        if bool(orphan.any()) and not bool(pen.all()):
            reward = penalise_below_group(reward, orphan, torch.zeros_like(groups), margin)
    for r, value in zip(scored, reward.tolist()):
        r["reward"] = value


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
            record = dict(row["_raw"])
            record.update(
                reward=_to_python(o.reward[j]),
                rss=_to_python(o.rss[j]),
                rkl=_to_python(o.rkl[j]),
                matched=bool(res.matched[j]),
                components={k: _to_python(v[j]) for k, v in o.components.items()},
            )
            record["penalised"] = penalty_reason(record)
            record["_key"] = (row["question"], row["solution"])
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
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; an output file gets the umask's permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False))
                fh.write("\n")
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
    if args.max_length is not None and args.max_length < 1:
        raise SystemExit("--max-length must be >= 1")
    if not 0 <= args.penalty_margin < float("inf"):
        raise SystemExit("--penalty-margin must be finite and >= 0")
    if args.token_budget < 1:
        raise SystemExit("--token-budget must be >= 1")
    for flag in ("--teacher", "--student"):
        check_model_path(flag, getattr(args, flag[2:]))
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f"--device {args.device}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    in_path = Path(args.input)
    input_files(in_path)
    default_out = in_path.with_name(in_path.name.removesuffix(".jsonl") + ".scored.jsonl")
    out_path = Path(args.output) if args.output else default_out
    check_output(out_path, in_path)
    fmt_key = choose_format(args.format, in_path)
    fmt = FORMATS[fmt_key]()
    flags = {
        "answer_log_prob_coeffs": "--rss-coeffs",
        "kl_penalty_coeffs": "--kl-coeffs",
        "student_temperature": "--student-temperature",
        "teacher_temperature": "--temperature",
        "penalty_margin": "--penalty-margin",
    }
    try:
        config = RewardConfig(
            answer_log_prob_coeffs=tuple(args.rss_coeffs),
            kl_penalty_coeffs=tuple(args.kl_coeffs),
            student_temperature=args.student_temperature,
            teacher_temperature=args.temperature,
            penalty_margin=args.penalty_margin,
        )
    except ValueError as err:
        named = [flag for field, flag in flags.items() if f"RewardConfig.{field} " in f"{err} "]
        raise SystemExit(f"{' / '.join(named) or 'reward flags'}: {err}") from err
    rows, bad = read_rows(in_path, fmt)
    check_format_against_rows(fmt_key, rows)
    for where, reason in bad:
        print(f"{where}: skipped: {reason}", file=sys.stderr)
    nfc = sum(r["_nfc"] for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlt_pl.models import check_tokenizers_compatible
    from rlt_pl.scoring import RLTScorer

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    if not args.allow_tokenizer_mismatch:
        probes = [fmt.explanation_start, fmt.explanation_end, fmt.thought_start, fmt.thought_end, "What is 12 + 30?"]
        try:
            check_tokenizers_compatible(
                tokenizer, AutoTokenizer.from_pretrained(args.student), [p for p in probes if p]
            )
        except ValueError as err:
            raise SystemExit(f"{err}\n(pass --allow-tokenizer-mismatch to score with the teacher's anyway)") from err
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(args.device).eval()
    teacher, student = load(args.teacher), load(args.student)
    for name, model in (("teacher", teacher), ("student", student)):
        size = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > size:
            raise SystemExit(
                f"--{name} has {size} embeddings but the teacher's tokenizer has {len(tokenizer)} tokens; "
                "the models do not share a vocabulary"
            )
    max_length = args.max_length or getattr(student.config, "max_position_embeddings", None)
    scorer = RLTScorer(student, tokenizer, fmt, config, max_length=max_length, token_budget=args.token_budget)
    scored, counts = score_rows(scorer, teacher, fmt, rows, args.batch_size, args.per_token)
    apply_group_penalties(scored, config.penalty_margin)
    write_atomic(out_path, scored)

    n = len(scored)
    mean = lambda key: sum(r[key] for r in scored) / n if n else float("nan")
    reasons: dict[str, int] = {}
    for r in scored:
        if r["penalised"] is not None:
            reasons[r["penalised"]] = reasons.get(r["penalised"], 0) + 1
    print(
        f"scored {n} rows -> {out_path} | malformed {len(bad)} | nfc_normalized {nfc} | mean reward "
        f"{mean('reward'):.4f} rss {mean('rss'):.4f} rkl {mean('rkl'):.4f} | unmatched {counts.get('unmatched', 0)} "
        f"overflow {counts.get('overflow', 0)} token_mismatch {counts.get('token_mismatch', 0)} | penalised "
        f"{sum(reasons.values())} {json.dumps(reasons, sort_keys=True)}"
    )
    return 0 if n else 2


if __name__ == "__main__":
    raise SystemExit(main())
