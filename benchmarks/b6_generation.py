"""B6: generation tokens/s, HF generate vs continuous batching, on a long-tailed completion-length mix (CPU).

Both engines sample from the same random-init model with the same `SamplingConfig`. A forward hook on the LM head
sets P(EOS) to `stop_p` at every step (the rest of the distribution unchanged up to renormalisation), so completion
lengths are geometric, capped at `max_new_tokens`: most completions are short, a few run long, as RL rollouts do.
`HFGenerationEngine` keeps every row of the batch in the forward until the longest is done (its `padded_row_steps`
counts the rows × steps computed); `ContinuousBatchingEngine` drops each completion as it finishes. Lengths are
random, so both engines' generated-token counts are reported beside the rates. Each thread count is its own row:
on a loaded 2-core machine 2 intra-op threads can be far slower than 1 for small ops.

Greedy completions (no hook) are compared token for token (`greedy_identical`).

python -m benchmarks.b6_generation --out benchmarks   # runs B6 alone and updates its section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import build_assets, load_model, load_tokenizer, md_table, set_threads
from rlt_pl.generation import HFGenerationEngine, SamplingConfig
from rlt_pl.generation_cb import ContinuousBatchingEngine

SECTION = "## B6 generation: HF generate vs continuous batching (long-tailed completion lengths)"


def _stop_with_probability(model: torch.nn.Module, eos: int, p: float):
    """Hook the LM head so that EOS has probability `p` at every position; returns the hook handle."""
    odds = math.log(p / (1 - p))

    def hook(module, args, out):
        others = torch.cat([out[..., :eos], out[..., eos + 1 :]], -1).logsumexp(-1)
        out = out.clone()
        out[..., eos] = others + odds
        return out

    return model.lm_head.register_forward_hook(hook)


def _prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} + {2 * i + 1}? Explain the solution step by step." for i in range(n)]


def _timed(engine, model, tok, prompts, n, sampling, seed) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = engine.generate(model, tok, prompts, n, sampling)
    wall = time.perf_counter() - t0
    lengths = out.completion_mask.sum(-1)
    return {
        "s": wall,
        "tokens": int(lengths.sum()),
        "longest": int(lengths.max()),
        "median_len": float(lengths.float().median()),
        "padded_row_steps": int(lengths.numel() * lengths.max()),
    }


def run(
    assets: dict,
    sizes: tuple[str, ...] = ("tiny", "small"),
    threads: tuple[int, ...] = (1, 2),
    prompts: int = 8,
    n: int = 4,
    max_new_tokens: int = 256,
    stop_p: float = 1 / 32,
    repeats: int = 2,
) -> dict:
    """Tokens/s of both engines per (model size, threads), interleaved, median over `repeats` seeds.

    Args:
        assets: `build_assets` output holding `sizes`.
        sizes: model sizes to run.
        threads: torch intra-op thread counts to run.
        prompts: distinct prompts; `n` samples each.
        n: samples per prompt.
        max_new_tokens: completion cap.
        stop_p: per-step EOS probability (mean completion ≈ 1 / stop_p tokens).
        repeats: timed calls per engine (seeds 0..repeats-1, same seeds for both).
    """
    rows = []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    engines = {"hf": HFGenerationEngine(), "cb": ContinuousBatchingEngine()}
    for size in sizes:
        model, tok = load_model(assets[size]["teacher"]), load_tokenizer(assets[size]["teacher"])
        greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
        outs = [e.generate(model, tok, _prompts(prompts), 1, greedy) for e in engines.values()]
        identical = torch.equal(outs[0].completion_ids, outs[1].completion_ids)
        handle = _stop_with_probability(model, tok.eos_token_id, stop_p)
        try:
            for nt in threads:
                set_threads(nt)
                for e in engines.values():  # warm-up
                    e.generate(model, tok, _prompts(2), 1, SamplingConfig(max_new_tokens=8, temperature=1.0))
                runs: dict[str, list[dict]] = {k: [] for k in engines}
                for seed in range(repeats):
                    for k, e in engines.items():
                        runs[k].append(_timed(e, model, tok, _prompts(prompts), n, sampling, seed))
                rate = {k: sum(r["tokens"] for r in v) / sum(r["s"] for r in v) for k, v in runs.items()}
                rows.append(
                    {
                        "model": size,
                        "threads": nt,
                        "completions": prompts * n,
                        "max_new": max_new_tokens,
                        "hf_tok_s": rate["hf"],
                        "cb_tok_s": rate["cb"],
                        "cb_vs_hf": rate["cb"] / rate["hf"],
                        "hf_tokens": sum(r["tokens"] for r in runs["hf"]),
                        "cb_tokens": sum(r["tokens"] for r in runs["cb"]),
                        "hf_padded_row_steps": sum(r["padded_row_steps"] for r in runs["hf"]),
                        "median_len": runs["hf"][0]["median_len"],
                        "longest": max(r["longest"] for r in runs["hf"] + runs["cb"]),
                        "greedy_identical": identical,
                    }
                )
        finally:
            handle.remove()
    set_threads()
    return {"rows": rows, "stop_p": stop_p, "repeats": repeats, "load_avg": os.getloadavg()}


def headline(b6: dict) -> float:
    """The smallest continuous-batching / HF tokens/s ratio over every row (the target's number)."""
    return min(r["cb_vs_hf"] for r in b6["rows"])


def render(b6: dict) -> list[str]:
    """RESULTS.md lines of the B6 section."""
    return [
        SECTION,
        "",
        f"P(EOS) = {b6['stop_p']:.4g} per step (geometric lengths, capped); {b6['repeats']} interleaved calls per "
        "engine and row, same seeds; `cb_vs_hf` = tokens/s ratio; `hf_padded_row_steps` = rows × steps HF computed "
        f"for `hf_tokens` real tokens. Load average during B6: {tuple(round(x, 2) for x in b6['load_avg'])}.",
        "",
        md_table(b6["rows"]),
    ]


def update_results(out: Path, b6: dict) -> None:
    """Put the B6 section into `out/RESULTS.md` (replacing an older one) and `details.b6` into `results.json`."""
    md = out / "RESULTS.md"
    text = md.read_text() if md.exists() else ""
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        text = head.rstrip("\n") + "\n\n"
        rest_text = tail.lstrip("\n")
    else:
        text, rest_text = (text.rstrip("\n") + "\n\n" if text else ""), ""
    md.write_text(text + "\n".join(render(b6)) + ("\n" + rest_text if rest_text else ""))
    js = out / "results.json"
    data = json.loads(js.read_text()) if js.exists() else {"targets": {}, "details": {}}
    data["details"]["b6"] = b6
    data["targets"]["b6_cb_vs_hf_tokens_per_s_min"] = headline(b6)
    js.write_text(json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="directory holding RESULTS.md and results.json")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "rlt_pl_bench"), help="model cache")
    parser.add_argument("--quick", action="store_true", help="tiny model, short completions (smoke run)")
    args = parser.parse_args(argv)
    sizes = ("tiny",) if args.quick else ("tiny", "small")
    assets = build_assets(Path(args.work) / "models", sizes)
    kw = {"prompts": 2, "n": 2, "max_new_tokens": 16, "repeats": 1, "threads": (1,)} if args.quick else {}
    b6 = run(assets, sizes=sizes, **kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    update_results(out, b6)
    print(md_table(b6["rows"]))


if __name__ == "__main__":
    main()
