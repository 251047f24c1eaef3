"""Side-by-side performance benchmarks of rlt_pl (CPU, offline): shared setup, model building and timing helpers.

Run them all with `python -m benchmarks.run --out benchmarks [--quick]`; each `bNN_*.py` module exposes a
`run(...) -> dict` used by `benchmarks.run` and by `tests/test_benchmarks.py`. Models are random-init Qwen2 built
from a config with the tiny offline tokenizer of `rlt_pl.tiny`; nothing is downloaded.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS = 2
# Short system prompts keep the measured lengths about the explanation, not the paper's ~1k-token prompts.
SHORT_TEACHER_PROMPT = "You are a teacher. Explain the given solution to the question."
SHORT_STUDENT_PROMPT = "You are a student. Think, then answer."
# name -> (hidden_size, num_layers, num_heads)
MODEL_SIZES: dict[str, tuple[int, int, int]] = {"tiny": (64, 2, 4), "small": (384, 8, 6)}


def set_threads(n: int = THREADS) -> None:
    """Pin torch's intra-op threads (the benchmarks are specified at 2 threads).

    Args:
        n: number of threads.
    """
    torch.set_num_threads(n)


def short_format():
    """`StratosFormat` (the authors' tags, chat template) with short system prompts."""
    from rlt_pl.formats import StratosFormat

    return StratosFormat(teacher_system_prompt=SHORT_TEACHER_PROMPT, student_system_prompt=SHORT_STUDENT_PROMPT)


def build_assets(root: str | Path, sizes: tuple[str, ...] = ("tiny",), seed: int = 0) -> dict[str, dict[str, Path]]:
    """Build (or reuse) teacher/student dirs per size under `root`, all sharing one tiny BPE tokenizer.

    Args:
        root: cache directory.
        sizes: keys of `MODEL_SIZES`.
        seed: init seed of the teacher (the student uses seed + 1).

    Returns:
        `{size: {"teacher": dir, "student": dir}}`.
    """
    from rlt_pl.tiny import build_model_dir, default_corpus, train_tokenizer

    root = Path(root)
    unknown = [s for s in sizes if s not in MODEL_SIZES]
    if unknown:
        raise ValueError(f"unknown model sizes {unknown}; choose from {sorted(MODEL_SIZES)}")
    tokenizer = None
    out: dict[str, dict[str, Path]] = {}
    for size in sizes:
        hidden, layers, heads = MODEL_SIZES[size]
        dirs = {}
        for role, role_seed in (("teacher", seed), ("student", seed + 1)):
            path = root / size / role
            if not (path / "config.json").exists():
                tokenizer = tokenizer or train_tokenizer(default_corpus(seed), vocab_size=512)
                build_model_dir(path, tokenizer, seed=role_seed, hidden_size=hidden, num_layers=layers, num_heads=heads)
            dirs[role] = path
        out[size] = dirs
    return out


def load_model(path: str | Path) -> torch.nn.Module:
    """Load a benchmark model in fp32, eval mode, frozen.

    Args:
        path: model directory.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved beside a benchmark model.

    Args:
        path: model directory.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once).

    Args:
        model: any module.
    """
    return sum(p.numel() for p in model.parameters())


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` calls after `warmup` calls.

    Args:
        fn: the work to time.
        repeats: timed calls (>= 1).
        warmup: untimed calls first.
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: Sequence[str] = ()) -> dict:
    """Median wall time (s) per named function, timed round-robin (`repeats` rounds, each runs every function once)
    so that load drifting on a shared machine hits every path alike; the names in `warmup` run once untimed first.

    Args:
        fns: name -> the work to time.
        repeats: rounds (>= 1).
        warmup: names to call once before timing.
    """
    if repeats < 1:
        raise ValueError(f"interleaved_medians: repeats must be >= 1, got {repeats}")
    for name in warmup:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_info() -> dict[str, str]:
    """Machine and library versions for the results header."""
    import lightning
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = "not installed"
    return info


def md_table(rows: list[dict], floatfmt: str = ".4g") -> str:
    """A markdown table from a list of dicts sharing keys.

    Args:
        rows: table rows.
        floatfmt: format of float cells.
    """
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])

    def cell(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
