"""vLLM generation engine (optional extra `rlt_pl[vllm]`), colocated with the trainer on the same GPU.

Same interface as `HFGenerationEngine`. The engine is created lazily on first use with a GPU memory fraction; before
each generation round the policy's current weights are pushed into it (LoRA adapters merged into a state-dict
copy first), and between rounds it can sleep (free its KV cache) so the optimizer step has the memory. Output is
converted to the padded tensors GRPO trains on, so the rest of the pipeline does not know which engine ran.

When vLLM is not installed, `fallback_to_hf: true` uses `HFGenerationEngine` and logs that it did; otherwise a
clear error names the extra to install.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from rlt_pl.generation import (
    GenerationEngine,
    GenerationOutput,
    HFGenerationEngine,
    SamplingConfig,
    completion_mask_from_ids,
    stop_token_ids,
)

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMGenerationEngine(GenerationEngine):
    """Colocated vLLM engine with weight sync from the trained policy.

    Args:
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer keeps the rest).
        max_model_len: context length of the engine (prompt + completion).
        dtype: engine dtype.
        enable_sleep_mode: release vLLM's memory between generation rounds (`sleep`/`wake_up`).
        fallback_to_hf: use `HFGenerationEngine` when vLLM is not installed (logged) instead of raising.
        seed: engine seed.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int = 32768,
        dtype: str = "bfloat16",
        enable_sleep_mode: bool = True,
        fallback_to_hf: bool = False,
        seed: int = 42,
    ) -> None:
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError("engine.init_args.gpu_memory_utilization must be in (0, 1)")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enable_sleep_mode = enable_sleep_mode
        self.seed = seed
        self.fallback: HFGenerationEngine | None = None
        self._llm = None
        self._stale = True  # the engine's weights differ from the policy's
        if not vllm_available():
            if not fallback_to_hf:
                raise ImportError(
                    "VLLMGenerationEngine needs vLLM: pip install 'rlt_pl[vllm]' (or fallback_to_hf: true)"
                )
            log.warning("vLLM is not installed: generation falls back to HFGenerationEngine")
            self.fallback = HFGenerationEngine()
        elif not torch.cuda.is_available():
            raise ValueError("VLLMGenerationEngine needs a CUDA device")

    def _engine(self, model: torch.nn.Module):
        if self._llm is None:
            from vllm import LLM

            path = model.config._name_or_path
            self._llm = LLM(
                model=path,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                dtype=self.dtype,
                enable_sleep_mode=self.enable_sleep_mode,
                seed=self.seed,
            )
        return self._llm

    @staticmethod
    def _policy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full (LoRA-merged) weights under Hugging Face names."""
        from rlt_pl.models import is_lora

        if is_lora(model):
            model.merge_adapter()
            try:
                state = {
                    k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
                    for k, v in model.state_dict().items()
                    if "lora_" not in k
                }
            finally:
                model.unmerge_adapter()
            return state
        return {k: v.detach() for k, v in model.state_dict().items()}

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's weights into the engine (once per optimizer step)."""
        llm = self._engine(model)
        weights = list(self._policy_weights(model).items())
        llm.apply_model(lambda m: m.load_weights(weights))

    def weights_changed(self) -> None:
        self._stale = True

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer, prompts: Sequence[str], n: int, sampling: SamplingConfig
    ) -> GenerationOutput:
        if self.fallback is not None:
            return self.fallback.generate(model, tokenizer, prompts, n, sampling)
        from vllm import SamplingParams

        llm = self._engine(model)
        if self.enable_sleep_mode:
            llm.wake_up()
        if self._stale:
            self.sync_weights(model)
            self._stale = False
        stops = stop_token_ids(tokenizer, sampling.stop_strings, model)  # every EOS id, as the HF engine
        params = SamplingParams(  # every option explicit (the authors pass these to vLLM), none from the checkpoint
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=stops,
            seed=None,
        )
        repeated = [p for p in prompts for _ in range(n)]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in repeated]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        if self.enable_sleep_mode:
            llm.sleep(level=1)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        width_p = max(len(ids) for ids in prompt_ids)
        comp = [list(o.outputs[0].token_ids) for o in outputs]
        width_c = max(1, max(len(c) for c in comp))
        p_ids = torch.full((len(repeated), width_p), pad)
        p_mask = torch.zeros_like(p_ids)
        c_ids = torch.full((len(repeated), width_c), pad)
        valid = torch.zeros_like(c_ids)
        for i, (p, c) in enumerate(zip(prompt_ids, comp)):
            p_ids[i, width_p - len(p) :] = torch.tensor(p)
            p_mask[i, width_p - len(p) :] = 1
            if c:
                c_ids[i, : len(c)] = torch.tensor(c)
                valid[i, : len(c)] = 1
        mask = completion_mask_from_ids(c_ids, stops, valid)
        finished = torch.tensor([o.outputs[0].finish_reason == "stop" for o in outputs])
        texts = tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(c_ids, mask)],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        return GenerationOutput(p_ids, p_mask, c_ids, mask, texts, finished, repeated)
