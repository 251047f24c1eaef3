"""Generation engines behind one small interface.

`HFGenerationEngine` wraps `model.generate`: batched, KV-cached, left-padded prompts, stop at every EOS id or at
single-token stop strings (e.g. a compact format's end tag). Its output is what GRPO trains on: left-padded prompt
ids, right-padded sampled ids, and a completion mask that runs up to and including the first stop token (spec §3.5).
`ContinuousBatchingEngine` (`rlt_pl.generation_cb`) and `VLLMGenerationEngine` implement the same interface.

Sampling is set by `SamplingConfig` alone: `build_generation_config` turns it into a complete
`transformers.GenerationConfig` (defaults = the paper's: T 0.7, top-p 1, top-k off, min-p 0, repetition penalty 1,
as the authors pass them to vLLM), and the engine generates with that config standing in for the checkpoint's, so a
`generation_config.json` (Qwen2.5-Instruct ships repetition_penalty 1.05, top-k 20, top-p 0.8) cannot change
sampling. Only its EOS ids are used: a completion stops at every EOS id of the checkpoint and of the tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from rlt_pl.distributed import is_sharded
from rlt_pl.merge import is_kbit_linear


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings.

    Args:
        max_new_tokens: completion length limit (paper: 16384).
        temperature: sampling temperature (paper: 0.7); 0 means greedy.
        top_p: nucleus sampling mass (paper: 1.0).
        top_k: top-k filter (None: off).
        min_p: min-p filter (paper: 0, off).
        repetition_penalty: repetition penalty (paper: 1.0, off).
        stop_strings: strings that end a completion besides EOS; each must be a single token.
        max_prompt_tokens: prompt length limit (None: no limit). Training, trace generation and evaluation skip
            longer prompts and count them (`*/count/skipped_long_prompts`); an engine asked for one raises.
    """

    max_new_tokens: int = 16384
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("sampling.max_new_tokens must be >= 1")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"sampling.temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError("sampling.top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("sampling.min_p must be in [0, 1)")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"sampling.repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling.top_k must be >= 1 or null (off), got {self.top_k}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"sampling.max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")

    @property
    def samples_tempered_logits(self) -> bool:
        """Whether tokens are drawn from softmax(logits / temperature) itself: temperature > 0 and no top-p, top-k,
        min-p or repetition penalty. Then the sampler's log-probs are the policy's log-probs at that temperature
        (engines record them as `GenerationOutput.logprobs`)."""
        plain = self.top_p == 1 and not self.top_k and self.min_p == 0 and self.repetition_penalty == 1
        return self.temperature > 0 and plain


@dataclass
class GenerationOutput:
    """Prompts and sampled completions, ready for scoring and the GRPO loss.

    Attributes:
        prompt_ids: [N, P] left-padded prompt ids; prompt_mask [N, P].
        completion_ids: [N, C] right-padded sampled ids; completion_mask [N, C] (up to and including the stop token).
        texts: decoded completions without special tokens (what rewards parse).
        finished: [N] bool, the completion stopped (EOS/stop string) before `max_new_tokens`.
        prompts: the prompt string of each completion (repeated n times per prompt, like the ids).
        logprobs: [N, C] fp32 log-prob of each sampled token under the distribution it was drawn from, recorded by
            the sampler (0 after the completion mask), when sampling was `samples_tempered_logits`; else None.
        logprobs_temperature: the temperature `logprobs` are at (the sampling temperature), or None.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]
    finished: Tensor
    prompts: list[str]
    logprobs: Tensor | None = None
    logprobs_temperature: float | None = None

    def __len__(self) -> int:
        return len(self.texts)


def checkpoint_eos_ids(model: torch.nn.Module | None) -> list[int]:
    """The EOS ids of a model's own `generation_config` (Qwen2.5-Instruct: `<|im_end|>` and `<|endoftext|>`)."""
    config = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def stop_token_ids(tokenizer, stop_strings: Sequence[str], model: torch.nn.Module | None = None) -> list[int]:
    """The tokenizer's EOS, every EOS id of `model`'s generation config, and the ids of single-token stop strings
    (clear error when a stop string is several tokens)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += checkpoint_eos_ids(model)
    for s in stop_strings:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"stop string {s!r} is {len(enc)} tokens; stop strings must be single tokens")
        ids.append(enc[0])
    return list(dict.fromkeys(ids))


def completion_mask_from_ids(completion_ids: Tensor, stop_ids: Sequence[int], pad_mask: Tensor | None = None) -> Tensor:
    """[N, C] mask: 1 up to and including the first stop token; all ones (within `pad_mask`) when none."""
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device))
    if pad_mask is not None:
        is_stop = is_stop & pad_mask.bool()
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop
    mask = ~after
    if pad_mask is not None:
        mask = mask & pad_mask.bool()
    return mask.long()


def encode_prompts(
    tokenizer, prompts: Sequence[str], n: int, sampling: SamplingConfig
) -> tuple[list[str], Tensor, Tensor]:
    """(prompts repeated n times, left-padded ids, attention mask): each prompt is tokenized once and its row repeated
    (the same ids and padding as tokenizing all N); a prompt over `sampling.max_prompt_tokens` is refused."""
    if n < 1:
        raise ValueError("n (samples per prompt) must be >= 1")
    enc = tokenizer(list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    ids, attn = (enc[k].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask"))
    longest = int(attn.sum(-1).max())
    if sampling.max_prompt_tokens is not None and longest > sampling.max_prompt_tokens:
        raise ValueError(f"a prompt has {longest} tokens > sampling.max_prompt_tokens={sampling.max_prompt_tokens}")
    return [p for p in prompts for _ in range(n)], ids, attn


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[N, C] ids of token lists right-padded with `pad_id` (C >= 1), and the [N, C] mask of real tokens."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    valid = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            valid[i, : len(s)] = 1
    return ids, valid


def finish_output(
    tokenizer,
    repeated: list[str],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion: Tensor,
    stops: Sequence[int],
    pad_id: int,
    valid: Tensor | None = None,
    logprobs: Tensor | None = None,
    temperature: float | None = None,
) -> GenerationOutput:
    """The `GenerationOutput` every engine returns: completions masked up to and including the first stop token
    (within `valid`), padded with `pad_id` after it, `finished` where a stop was sampled, the decoded texts, and the
    sampler's `logprobs` [N, C] at `temperature` (masked like the completion) when the engine recorded them."""
    mask = completion_mask_from_ids(completion, stops, valid)
    # an engine may pad finished rows with pad_id, which may equal a stop id: cut after the first stop either way
    completion = completion.masked_fill(mask == 0, pad_id)
    finished = (torch.isin(completion, torch.tensor(list(stops))) & mask.bool()).any(-1)
    cut = [row[m.bool()].tolist() for row, m in zip(completion, mask)]
    texts = tokenizer.batch_decode(cut, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if logprobs is not None:
        logprobs = logprobs.float() * mask
    temperature = temperature if logprobs is not None else None
    return GenerationOutput(prompt_ids, prompt_mask, completion, mask, texts, finished, repeated, logprobs, temperature)


def build_generation_config(
    sampling: SamplingConfig, tokenizer, model: torch.nn.Module | None = None
) -> GenerationConfig:
    """A complete `GenerationConfig` from `sampling` alone: every option that shapes the distribution is set.

    Temperature 0 is greedy. Stops at every EOS id (`stop_token_ids`); pads with the tokenizer's pad token.
    Nothing is read from the checkpoint's `generation_config.json` except its EOS ids.

    Args:
        sampling: the module's sampling settings.
        tokenizer: gives EOS, pad and stop-string ids.
        model: its generation config contributes EOS ids (None: the tokenizer's EOS only).
    """
    stops = stop_token_ids(tokenizer, sampling.stop_strings, model)
    if not stops:
        raise ValueError("no stop token: the tokenizer has no EOS and sampling.stop_strings is empty")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    greedy = sampling.temperature == 0
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        # no minimum: unset rather than 0, which `generate` turns into a no-op MinLength processor run every step
        min_new_tokens=None,
        min_length=0,
        do_sample=not greedy,
        num_beams=1,
        temperature=1.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=None if greedy else (sampling.top_k or 0),  # 0: off (greedy ignores it)
        min_p=None if greedy or sampling.min_p == 0 else sampling.min_p,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=sampling.repetition_penalty,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        renormalize_logits=False,
        eos_token_id=stops,
        pad_token_id=pad_id,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        use_cache=True,
    )


@contextmanager
def generation_config_in_place(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Let `config` stand in for the generation config of every HF model inside `model` (peft wraps one).

    `generate` fills every option left unset in the config it is given from `model.generation_config`; with the
    same config in both places nothing of the checkpoint's file can leak in.
    """
    inner = [m for m in model.modules() if isinstance(m, PreTrainedModel) and hasattr(m, "generation_config")]
    saved = [m.generation_config for m in inner]
    try:
        for m in inner:
            m.generation_config = config
        yield
    finally:
        for m, c in zip(inner, saved):
            m.generation_config = c


def no_grad_for_generation(model: torch.nn.Module):
    """`torch.inference_mode()` for sampling (no autograd bookkeeping: ~10% faster decode steps on a small model),
    plain `no_grad` for sharded (FSDP2) or quantized models, whose parameter machinery (all-gather buffers, bitsandbytes
    weight state) must not produce inference tensors that training later reuses. Outputs are the same either way."""
    if is_sharded(model) or any(is_kbit_linear(m) for m in model.modules()):
        return torch.no_grad()
    return torch.inference_mode()


class GenerationEngine(ABC):
    """Samples `n` completions for each prompt (consecutive in the output, as GRPO groups expect)."""

    @abstractmethod
    def generate(
        self, model: torch.nn.Module, tokenizer, prompts: Sequence[str], n: int, sampling: SamplingConfig
    ) -> GenerationOutput: ...

    def check_sampling(self, sampling: SamplingConfig) -> None:  # noqa: B027 - an optional hook, not abstract
        """Raise (naming the flag) when this engine cannot honour `sampling`; the modules call it at construction."""

    def weights_changed(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Called after each optimizer step; engines holding their own copy of the weights re-sync."""


class HFGenerationEngine(GenerationEngine):
    """`transformers` generate: batched, KV-cached, left-padded.

    Args:
        batch_size: prompts × samples per generate call (None: all at once).
    """

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer, prompts: Sequence[str], n: int, sampling: SamplingConfig
    ) -> GenerationOutput:
        repeated, prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, n, sampling)
        config = build_generation_config(sampling, tokenizer, model)
        stops, pad_id = list(config.eos_token_id), config.pad_token_id
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        chunks, lps = [], []
        step = self.batch_size or len(repeated)
        record = sampling.samples_tempered_logits
        with generation_config_in_place(model, config), no_grad_for_generation(model):
            for i in range(0, len(repeated), step):
                ids = prompt_ids[i : i + step].to(device)
                attn = prompt_mask[i : i + step].to(device)
                recorder = SampledLogprobs(sampling.temperature) if record else None
                # synced_gpus (FSDP2): every rank runs decode steps until all ranks are done
                out = model.generate(
                    input_ids=ids,
                    attention_mask=attn,
                    generation_config=config,
                    synced_gpus=is_sharded(model),
                    logits_processor=LogitsProcessorList([recorder] if record else []),
                )
                chunks.append(out[:, ids.shape[1] :].cpu())
                if recorder is not None:
                    lps.append(recorder.finish(out[:, -1]).cpu())
        model.train(was_training)
        width = max(c.shape[1] for c in chunks)
        completion = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])
        logprobs = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in lps]) if record else None
        out = (tokenizer, repeated, prompt_ids, prompt_mask, completion, stops, pad_id)
        return finish_output(*out, logprobs=logprobs, temperature=sampling.temperature)


class SampledLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token under softmax(logits / T), the distribution `generate` draws from
    under `SamplingConfig.samples_tempered_logits`.

    `generate` runs custom processors after its logits processors and before its warpers (temperature, top-k/p), so
    this one sees the logits themselves and applies T. The token drawn from step t's scores is known at step t + 1
    (the last column of `input_ids`), so each step keeps its scores and log-normaliser until then; `finish` takes the
    last step's token. No `[steps, B, V]` history is kept."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.prev: tuple[Tensor, Tensor] | None = None
        self.columns: list[Tensor] = []

    def _take(self, tokens: Tensor) -> None:
        scores, lse = self.prev
        self.columns.append(scores.gather(1, tokens[:, None]).squeeze(1) - lse)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        tempered = scores.float() / self.temperature
        self.prev = (tempered, torch.logsumexp(tempered, -1))
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """[B, steps] log-probs, given the tokens of the last step."""
        if self.prev is not None:
            self._take(last_tokens)
            self.prev = None
        return (
            torch.stack(self.columns, 1) if self.columns else last_tokens.new_zeros((last_tokens.shape[0], 0)).float()
        )
