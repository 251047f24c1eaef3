"""B4: stage times of `make demo`, read from `runs/demo/timings.json` (written by `python -m rlt_pl.demo`)."""

from __future__ import annotations

import json
from pathlib import Path


def run(timings_path: str | Path = "runs/demo/timings.json") -> dict:
    """Tabulate the demo's stage timings, or say that the demo has not been run.

    Args:
        timings_path: the demo's timings file (a JSON object `{stage: seconds}` or a list of `{stage, seconds}`).
    """
    path = Path(timings_path)
    if not path.exists():
        return {"available": False, "note": f"{path} not found: run `make demo` first"}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"available": False, "note": f"{path} is not valid JSON ({err}); re-run `make demo`"}
    if isinstance(data, dict):
        rows = [{"stage": k, "seconds": v} for k, v in data.items() if isinstance(v, (int, float))]
        skipped = [k for k, v in data.items() if not isinstance(v, (int, float))]
    elif isinstance(data, list):
        rows = [r for r in data if isinstance(r, dict)]
        skipped = [str(r) for r in data if not isinstance(r, dict)]
    else:
        return {"available": False, "note": f"{path} holds a {type(data).__name__}, expected an object or a list"}
    return {"available": True, "rows": rows, "skipped_entries": skipped}
