"""Reading raw rows and building common-schema rows: local .json / .jsonl / .parquet files, field checks, NFC.

Row schema (every DataModule yields it)::

    {"id": str, "question": str, "answer": str, "solution": str, "thought": str | None, "metadata": dict}

Malformed rows never crash deep inside a run and are never dropped silently: a bad row raises (or, for an undecodable
JSONL line, is returned as) ``RowError``, which ``RowDataModule.setup`` records in ``invalid_rows`` as ``(id, reason)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlt_pl.spans import loads_finite, nfc_text


class RowError(ValueError):
    """A raw row cannot be normalised; the message is the reason that gets reported."""


def require_str(raw: dict, key: str, allow_empty: bool = False) -> str:
    """Fetch ``raw[key]`` as a string or raise ``RowError`` naming the field.

    Args:
        raw: Raw row.
        key: Field name.
        allow_empty: Accept empty / whitespace-only strings.
    """
    if key not in raw or raw[key] is None:
        raise RowError(f"missing field {key!r}")
    value = raw[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} is {type(value).__name__}, expected str")
    if not allow_empty and not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def make_row(
    id: str, question: str, answer: str, solution: str, thought: str | None = None, metadata: dict | None = None
) -> dict:
    """Build a row in the common schema.

    Args:
        id: Unique row id.
        question: Question text as stored in the dataset.
        answer: Gradeable ground truth.
        solution: Reference solution text (or the answer).
        thought: Reference reasoning, if any.
        metadata: Extra per-row facts (subject, level, options, ...).
    """
    return {
        "id": id,
        "question": question,
        "answer": answer,
        "solution": solution,
        "thought": thought,
        "metadata": metadata or {},
    }


def parse_jsonl_line(line: bytes, lineno: int) -> object:
    """One JSONL line -> the decoded value, or a ``RowError`` saying why it cannot be read (invalid UTF-8, bad JSON,
    nesting too deep, an integer beyond Python's digit limit) so one bad line is reported, never fatal.

    Args:
        line: the raw bytes of the line.
        lineno: its 1-based number (for the message).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RowError(f"line {lineno} is not valid UTF-8 (byte {err.start})")
    try:
        return loads_finite(text)
    except json.JSONDecodeError as err:
        return RowError(f"line {lineno} is not valid JSON: {err.msg}")
    except RecursionError:
        return RowError(f"line {lineno} is not valid JSON: nested too deeply")
    except ValueError as err:
        return RowError(f"line {lineno} is not valid JSON: {err}")


def nfc_row(row: dict) -> tuple[dict, bool]:
    """NFC-normalise a common-schema row's text (top-level strings and string metadata values).

    Returns the row and whether anything changed. Raises ``RowError`` for a string that is not valid Unicode text
    (a lone surrogate from a ``\\udXXX`` escape), which would crash a tokenizer later.

    Args:
        row: a normalised row.
    """
    changed = False

    def fix(key: str, value: object) -> object:
        nonlocal changed
        if not isinstance(value, str):
            return value
        try:
            nfc = nfc_text(key, value)
        except ValueError as err:
            raise RowError(str(err)) from err
        changed |= nfc != value
        return nfc

    out = {k: fix(k, v) for k, v in row.items()}
    if isinstance(out.get("metadata"), dict):
        out["metadata"] = {k: fix(f"metadata.{k}", v) for k, v in out["metadata"].items()}
    return out, changed


def read_local_rows(path: Path) -> list:
    """Read raw rows from a .json (list of objects, or ``{"data": [...]}``), .jsonl or .parquet file.

    Undecodable JSONL lines are returned as ``RowError`` instances so they are reported, not dropped.

    Args:
        path: Existing file.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out: list = []
        for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            out.append(parse_jsonl_line(line, lineno))
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError) as err:
            raise ValueError(f"data.init_args.data_path {str(path)!r} is not a readable JSON file: {err}") from err
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data_path suffix {suffix!r} (use .json, .jsonl or .parquet)")
