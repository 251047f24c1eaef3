"""vLLM generation engine (optional extra `rlt_pl[vllm]`), colocated with the trainer in the same process.

Same interface as `HFGenerationEngine`. The engine is built lazily on first use, in-process on every rank
(`distributed_executor_backend="external_launcher"`: one engine per training process, torchrun or Lightning
launched, tensor parallel size 1), on the policy's checkpoint path. Before a generation round that follows an
optimizer step, the policy's weights are pushed into the engine's model through the driver worker's
`model.load_weights` (the path TRL's colocated mode uses, `trl/generation/vllm_generation.py`): the tensors are
`rlt_pl.merge.merged_weights(model, dtype)`, i.e. LoRA merged and a 4-bit base dequantised *out of place*, so the
4-bit base and the adapter-off reference never change; FSDP2 shards are gathered one tensor at a time. With sleep
mode the engine wakes its weights before loading, resets its prefix cache after each sync, and sleeps after each
round so the optimizer step has the memory. Output is converted to the padded tensors GRPO trains on.

Sampling: `vllm_sampling_kwargs` maps every `SamplingConfig` field to `vllm.SamplingParams` explicitly and refuses a
field it has no mapping for. When vLLM is not installed, `fallback_to_hf: true` uses `HFGenerationEngine` and logs
that it did; otherwise construction fails naming the extra.

Supported vLLM: `VLLM_REQUIREMENT` (the `vllm` extra in pyproject.toml). This engine has been tested on CPU against a
stub of that API only (`tests/test_generation_vllm.py`); it has not run on a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from rlt_pl.generation import (
    GenerationEngine,
    GenerationOutput,
    HFGenerationEngine,
    SamplingConfig,
    finish_output,
    right_padded,
    stop_token_ids,
)
from rlt_pl.merge import merged_weights

log = logging.getLogger(__name__)

VLLM_REQUIREMENT = "vllm>=0.27.0,<0.31"  # keep equal to pyproject's `vllm` extra (tests/test_generation_vllm.py)
_MISSING = "VLLMGenerationEngine needs vLLM: pip install 'rlt_pl[vllm]' ({req}), or set engine.init_args.fallback_to_hf"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# wrapper prefixes that never exist in the HF checkpoint: activation checkpointing, FSDP1, torch.compile, peft
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.", "modules_to_save.default.")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(_MISSING.format(req=VLLM_REQUIREMENT)) from e
    return vllm


def vllm_weight_name(name: str) -> str | None:
    """The checkpoint (Hugging Face) name vLLM's `load_weights` expects for a trainer-side tensor name, or None for
    a tensor vLLM must not receive (a peft adapter tensor or the frozen copy kept by `modules_to_save`)."""
    if "lora_" in name or ".original_module." in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def sync_tensors(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """`(checkpoint name, dense tensor)` pairs to push into vLLM: `merged_weights(model, dtype)` (LoRA merged, 4-bit
    dequantised, FSDP2 shards gathered, out of place) under vLLM's names, floating tensors in `dtype`."""
    for name, tensor in merged_weights(model, dtype):
        target = vllm_weight_name(name)
        if target is not None:
            yield target, tensor.contiguous()


_MAPPED_FIELDS = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_strings",  # as stop token ids (single tokens, `stop_token_ids`)
    "max_prompt_tokens",  # checked on the prompts before generating
}


def vllm_sampling_kwargs(sampling: SamplingConfig, stop_ids: Sequence[int]) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for one completion per request, every option that shapes the
    distribution set explicitly (nothing from the checkpoint's generation config). Temperature 0 is greedy.

    Raises:
        ValueError: `sampling` has a field this mapping does not know (it would be silently ignored), or no stop id.
    """
    unknown = sorted({f.name for f in dataclasses.fields(sampling)} - _MAPPED_FIELDS)
    if unknown:
        raise ValueError(f"VLLMGenerationEngine cannot map sampling fields {unknown} to vllm.SamplingParams")
    if not stop_ids:
        raise ValueError("no stop token: the tokenizer has no EOS and sampling.stop_strings is empty")
    greedy = sampling.temperature == 0
    return {
        "n": 1,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": -1 if greedy or not sampling.top_k else sampling.top_k,
        "min_p": 0.0 if greedy else sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": sampling.max_new_tokens,
        "min_tokens": 0,
        "stop_token_ids": list(stop_ids),
        "ignore_eos": False,
        "logprobs": None,
        "seed": None,  # the engine's generator (seeded per rank at construction)
        "detokenize": False,  # texts are decoded by the tokenizer, as in the HF engine
    }


def driver_model(llm) -> torch.nn.Module:
    """The model inside an in-process vLLM engine (`external_launcher`: the driver worker lives in this process)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError as e:
        raise RuntimeError(
            "this vLLM has no in-process driver worker (llm.llm_engine.model_executor.driver_worker.model_runner"
            f".model): {e}. VLLMGenerationEngine supports {VLLM_REQUIREMENT} with "
            'distributed_executor_backend="external_launcher"'
        ) from e


def _launcher_env() -> int:
    """Set the torchrun variables `external_launcher` reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) from
    the running process group, or for a single process; returns this process's rank."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("VLLMGenerationEngine under torch.distributed needs MASTER_ADDR and MASTER_PORT set")
    else:
        rank, world = 0, 1
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    os.environ.setdefault("LOCAL_RANK", str(rank % max(1, torch.cuda.device_count())))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process (external_launcher)
    return rank


class VLLMGenerationEngine(GenerationEngine):
    """Colocated in-process vLLM engine, synced from the trained policy once per optimizer step.

    Args:
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache; the trainer keeps the rest).
        max_model_len: context length of the engine (prompt + completion); longer requests are refused.
        dtype: engine dtype, also the dtype of the pushed weights (bfloat16 or float16).
        enable_sleep_mode: release vLLM's memory between generation rounds (`sleep` after, `wake_up` before).
        sleep_level: 1 offloads the weights to host memory (restored on wake, no re-sync while the policy is
            unchanged); 2 discards them (less host memory; every round re-pushes the weights).
        max_num_seqs: most sequences vLLM decodes at once (None: vLLM's default).
        enforce_eager: no CUDA graphs (less memory, slower decode).
        fallback_to_hf: use `HFGenerationEngine` when vLLM is not installed (logged) instead of raising.
        seed: engine seed; rank r uses seed + r.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int = 32768,
        dtype: str = "bfloat16",
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        max_num_seqs: int | None = None,
        enforce_eager: bool = False,
        fallback_to_hf: bool = False,
        seed: int = 42,
    ) -> None:
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError("engine.init_args.gpu_memory_utilization must be in (0, 1)")
        if max_model_len < 2:
            raise ValueError("engine.init_args.max_model_len must be >= 2")
        if dtype not in _DTYPES:
            raise ValueError(f"engine.init_args.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if sleep_level not in (1, 2):
            raise ValueError("engine.init_args.sleep_level must be 1 or 2")
        if max_num_seqs is not None and max_num_seqs < 1:
            raise ValueError("engine.init_args.max_num_seqs must be >= 1")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.fallback: HFGenerationEngine | None = None
        self._llm = None
        self._asleep: set[str] = set()  # memory tags released by the last sleep
        self._policy_version = 0  # optimizer steps seen (`weights_changed`)
        self._synced_version: int | None = None  # the version the engine holds; None: not (or no longer) synced
        self.syncs = 0  # weight pushes so far
        if not vllm_available():
            if not fallback_to_hf:
                raise ImportError(_MISSING.format(req=VLLM_REQUIREMENT))
            log.warning("vLLM is not installed: generation falls back to HFGenerationEngine")
            self.fallback = HFGenerationEngine()
        elif not torch.cuda.is_available():
            raise ValueError("VLLMGenerationEngine needs a CUDA device (or use rlt_pl.generation.HFGenerationEngine)")

    def _engine(self, model: torch.nn.Module):
        if self._llm is None:
            vllm = _import_vllm()
            path = model.config._name_or_path
            if not path:
                raise ValueError("VLLMGenerationEngine needs a model loaded from a checkpoint path (config has none)")
            rank = _launcher_env()
            kwargs = {"max_num_seqs": self.max_num_seqs} if self.max_num_seqs is not None else {}
            self._llm = vllm.LLM(
                model=path,
                dtype=self.dtype,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                enable_sleep_mode=self.enable_sleep_mode,
                enable_prefix_caching=True,
                enforce_eager=self.enforce_eager,
                tensor_parallel_size=1,
                distributed_executor_backend="external_launcher",
                generation_config="vllm",  # no sampling defaults from the checkpoint's generation_config.json
                seed=self.seed + rank,
                **kwargs,
            )
        return self._llm

    def _wake(self, llm, tag: str) -> None:
        if tag in self._asleep:
            llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def sync_weights(self, model: torch.nn.Module) -> int:
        """Push the policy's merged, dense weights into the engine and reset its prefix cache; returns the number of
        tensors pushed. Weights are woken first: loading into slept (unmapped) weight memory is undefined."""
        llm = self._engine(model)
        self._wake(llm, "weights")
        target = driver_model(llm)
        pushed = 0
        for name, tensor in sync_tensors(model, _DTYPES[self.dtype]):
            target.load_weights([(name, tensor)])
            pushed += 1
        llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._synced_version = self._policy_version
        self.syncs += 1
        return pushed

    def weights_changed(self) -> None:
        self._policy_version += 1

    def _check_lengths(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> None:
        longest = max(len(ids) for ids in prompt_ids)
        if sampling.max_prompt_tokens is not None and longest > sampling.max_prompt_tokens:
            raise ValueError(f"a prompt has {longest} tokens > sampling.max_prompt_tokens={sampling.max_prompt_tokens}")
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens + sampling.max_new_tokens={sampling.max_new_tokens} exceeds "
                f"engine.init_args.max_model_len={self.max_model_len}"
            )

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer, prompts: Sequence[str], n: int, sampling: SamplingConfig
    ) -> GenerationOutput:
        if self.fallback is not None:
            return self.fallback.generate(model, tokenizer, prompts, n, sampling)
        if n < 1:
            raise ValueError("n (samples per prompt) must be >= 1")
        repeated = [p for p in prompts for _ in range(n)]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in repeated]
        self._check_lengths(prompt_ids, sampling)
        stops = stop_token_ids(tokenizer, sampling.stop_strings, model)  # every EOS id, as the HF engine
        params = _import_vllm().SamplingParams(**vllm_sampling_kwargs(sampling, stops))
        llm = self._engine(model)
        if self._synced_version != self._policy_version:
            self.sync_weights(model)
        self._wake(llm, "weights")
        if "kv_cache" in self._asleep:
            self._wake(llm, "kv_cache")
            llm.reset_prefix_cache()  # the KV memory was released while asleep
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        if self.enable_sleep_mode:
            llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}
            if self.sleep_level == 2:
                self._synced_version = None  # level 2 discards the weights: push them again before the next round
        return _to_output(tokenizer, repeated, prompt_ids, outputs, stops)


def _to_output(tokenizer, repeated: list[str], prompt_ids: list[list[int]], outputs, stops: list[int]):
    """vLLM request outputs as the padded `GenerationOutput` GRPO trains on (left-padded prompts, right-padded
    completions masked up to and including the first stop token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width_p = max(len(ids) for ids in prompt_ids)
    p_ids = torch.full((len(repeated), width_p), pad)
    p_mask = torch.zeros_like(p_ids)
    for i, p in enumerate(prompt_ids):
        p_ids[i, width_p - len(p) :] = torch.tensor(p)
        p_mask[i, width_p - len(p) :] = 1
    c_ids, valid = right_padded([list(o.outputs[0].token_ids) for o in outputs], pad)
    return finish_output(tokenizer, repeated, p_ids, p_mask, c_ids, stops, pad, valid)
