"""B5: the hot spot fixed after profiling — LM-head work on positions nobody reads.

At paper scale the no-grad policy/reference forwards and the student forward ran the LM head over the whole sequence:
a ~1.3k-token system prompt + question whose `[L, V]` logits (V = 151,936 for Qwen2.5) are never read. rlt_pl now
asks the model for the scored suffix only (`causal_logprobs(last_n=...)`, i.e. `logits_to_keep`). This measures
before/after side by side on a randomly initialised Qwen2 with Qwen2.5's vocabulary size, a long prompt and a short
completion, and checks the scored values are identical.
"""

from __future__ import annotations

import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlt_pl.scoring import causal_logprobs


def run(batch: int = 8, prompt_tokens: int = 1024, completion_tokens: int = 96, repeats: int = 2) -> dict:
    """Time `causal_logprobs` over the full sequence vs only the completion (+ 32 prompt-tail tokens)."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    length = prompt_tokens + completion_tokens
    ids = torch.randint(0, config.vocab_size, (batch, length))
    attn = torch.ones_like(ids)
    keep = completion_tokens + 32

    def timed(last_n):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = causal_logprobs(model, ids, attn, 0.7, token_budget=batch * length, last_n=last_n)
            best = min(best, time.perf_counter() - t0)
        return best, out

    full_s, full = timed(None)
    tail_s, tail = timed(keep)
    diff = float((full[:, -keep:] - tail[:, -keep:]).abs().max())
    return {
        "rows": [
            {
                "batch": batch,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "vocab": config.vocab_size,
                "before_full_sequence_s": full_s,
                "after_scored_suffix_s": tail_s,
                "speedup": full_s / tail_s,
                "logits_bytes_before_mb": batch * length * config.vocab_size * 4 / 2**20,
                "logits_bytes_after_mb": batch * (keep + 1) * config.vocab_size * 4 / 2**20,
                "max_abs_diff": diff,
            }
        ]
    }
