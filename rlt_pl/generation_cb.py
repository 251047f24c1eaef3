"""Continuous-batching generation engine on transformers' own paged-attention scheduler (`model.generate_batch`).

Each completion is its own request: finished requests leave the batch at once and new ones take their place, so no
compute is spent on finished or padded rows (what `HFGenerationEngine` pays for on a long-tailed length mix). Runs on
CPU (SDPA over the paged cache) and GPU (flash attention when installed). The output is the same padded
`GenerationOutput` as the HF engine's, so the rest of the pipeline does not know which engine ran.

Sampling is the same explicit `SamplingConfig`, turned into the same `GenerationConfig` (`build_generation_config`).
transformers' continuous batching applies temperature, top-k, top-p and min-p per token but silently drops a
repetition penalty; this engine refuses one instead (`check_sampling`, called by the modules at construction).

The paged cache is sized from each call's requests (prompt + `max_new_tokens` per request) instead of from free
accelerator memory, which on CPU sized it for a workload many times larger than the call.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence

import torch
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from rlt_pl.distributed import is_sharded
from rlt_pl.generation import (
    GenerationEngine,
    GenerationOutput,
    SamplingConfig,
    build_generation_config,
    encode_prompts,
    finish_output,
    generation_config_in_place,
    right_padded,
)


def paged_cache_size(
    prompt_lengths: Sequence[int],
    max_new_tokens: int,
    page_size: int,
    max_batch_tokens: int,
    max_cache_tokens: int | None = None,
) -> tuple[int, int]:
    """(num_blocks, max_batch_tokens) of a paged cache holding every request whole.

    Each request needs `ceil((prompt + max_new_tokens) / page_size)` pages; one page more covers the scheduler's
    look-ahead. A step processes at most `max_batch_tokens` tokens, and at least one per request (a decode step).

    Args:
        prompt_lengths: token count of each request's prompt.
        max_new_tokens: completion limit of every request.
        page_size: tokens per page.
        max_batch_tokens: upper bound on the tokens of one forward step.
        max_cache_tokens: upper bound on cached tokens (None: no bound); fewer requests then run at once.
    """
    pages = sum(math.ceil((n + max_new_tokens) / page_size) for n in prompt_lengths) + 1
    if max_cache_tokens is not None:
        pages = min(pages, max(1, max_cache_tokens // page_size))
    tokens = min(max_batch_tokens, sum(prompt_lengths))
    return pages, max(tokens, len(prompt_lengths), 1)


class ContinuousBatchingEngine(GenerationEngine):
    """transformers continuous batching (`generate_batch`): paged KV cache, finished requests leave the batch.

    Args:
        page_size: tokens per KV-cache page (small pages waste less on short completions).
        max_batch_tokens: most tokens in one forward step (prefill chunks); bounds the step's attention mask.
        max_cache_tokens: most tokens the paged cache holds (None: every request of a call at full length); fewer
            requests then run at once.
        seed: sampling seed of the engine's own generator (None: each call draws its seed from torch's global RNG,
            so runs under `seed_everything` repeat). The global RNG advances by one draw per call either way.
    """

    def __init__(
        self,
        page_size: int = 32,
        max_batch_tokens: int = 2048,
        max_cache_tokens: int | None = None,
        seed: int | None = None,
    ) -> None:
        if page_size < 4:
            raise ValueError(f"engine.init_args.page_size must be >= 4, got {page_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"engine.init_args.max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_cache_tokens is not None and max_cache_tokens < page_size:
            raise ValueError(
                f"engine.init_args.max_cache_tokens must be >= page_size={page_size}, got {max_cache_tokens}"
            )
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_cache_tokens = max_cache_tokens
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def check_sampling(self, sampling: SamplingConfig) -> None:
        if sampling.repetition_penalty != 1.0:
            raise ValueError(
                f"sampling.repetition_penalty={sampling.repetition_penalty} is not supported by "
                "ContinuousBatchingEngine (transformers' continuous batching drops it); use 1.0 or HFGenerationEngine"
            )

    def _call_seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator))

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer, prompts: Sequence[str], n: int, sampling: SamplingConfig
    ) -> GenerationOutput:
        self.check_sampling(sampling)
        if is_sharded(model):
            raise ValueError("ContinuousBatchingEngine does not run on a sharded (FSDP) model; use HFGenerationEngine")
        repeated, prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, n, sampling)
        inputs = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        if min(len(ids) for ids in inputs) == 0:
            raise ValueError("an empty prompt (0 tokens) cannot be continued")
        config = build_generation_config(sampling, tokenizer, model)
        stops, pad_id = list(config.eos_token_id), config.pad_token_id
        num_blocks, batch_tokens = paged_cache_size(
            [len(ids) for ids in inputs],
            sampling.max_new_tokens,
            self.page_size,
            self.max_batch_tokens,
            self.max_cache_tokens,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=num_blocks,
            max_batch_tokens=batch_tokens,
            max_requests_per_batch=len(inputs),
            seed=self._call_seed(),
            return_logprobs=sampling.samples_tempered_logits,
        )
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        # generate_batch runs two full `gc.collect()` passes on exit (seconds with a trainer's heap): freezing the
        # objects that exist now leaves them only what the call itself allocated
        gc.freeze()
        try:
            # generate_batch seeds torch's global RNG with the call's seed: keep the caller's stream as it was
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                with generation_config_in_place(model, config):
                    results = model.generate_batch(
                        inputs, generation_config=config, continuous_batching_config=cb_config, warmup=False
                    )
        finally:
            gc.unfreeze()
            model.train(was_training)
        outputs = list(results.values())
        failed = [r.error for r in outputs if r.error is not None]
        if len(outputs) != len(inputs) or failed:
            raise RuntimeError(
                f"continuous batching returned {len(outputs) - len(failed)} of {len(inputs)} completions"
                + (f": {failed[0]}" if failed else "")
            )
        generated = [r.generated_tokens[: sampling.max_new_tokens] for r in outputs]
        completion, valid = right_padded(generated, pad_id)
        logprobs = None
        if sampling.samples_tempered_logits:  # log of the sampled token's probability under softmax(logits / T)
            logprobs = torch.zeros(completion.shape, dtype=torch.float32)
            for i, r in enumerate(outputs):
                row = r.logprobs[: len(generated[i])]
                if len(row) != len(generated[i]):
                    raise RuntimeError(
                        f"continuous batching returned {len(row)} log-probs for {len(generated[i])} tokens"
                    )
                logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        out = (tokenizer, repeated, prompt_ids, prompt_mask, completion, stops, pad_id, valid)
        return finish_output(*out, logprobs=logprobs, temperature=sampling.temperature)
