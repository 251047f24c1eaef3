"""The vLLM engine against a stub `vllm` module (no GPU, no vLLM): the weights it pushes, when it pushes them, the
wake / load / reset / generate / sleep order, and the SamplingParams mapping."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from rlt_pl.generation import SamplingConfig, stop_token_ids
from rlt_pl.generation_vllm import (
    VLLM_REQUIREMENT,
    VLLMGenerationEngine,
    driver_model,
    vllm_sampling_kwargs,
    vllm_weight_name,
)
from rlt_pl.merge import merged_weights
from rlt_pl.models import LoraConfig, ModelConfig, bitsandbytes_runs_on_cpu, load_causal_lm, reference_mode

needs_bnb = pytest.mark.skipif(not bitsandbytes_runs_on_cpu(), reason="needs bitsandbytes >= 0.48 (NF4 on CPU)")
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 4]])
ROOT = Path(__file__).resolve().parents[1]


def _stub_vllm(events: list) -> types.ModuleType:
    """A fake `vllm`: `LLM` and `SamplingParams` record every call in `events`; the driver model keeps what
    `load_weights` received; `generate` answers row i with tokens 7, 8 and, on even rows, the tokenizer's EOS."""
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.30.0"

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            events.append(("SamplingParams", kwargs))

    class DriverModel:
        def __init__(self):
            self.loaded: list[tuple[str, torch.Tensor]] = []

        def load_weights(self, weights):
            for name, tensor in weights:
                self.loaded.append((name, tensor.clone()))
                events.append(("load_weights", name))

    class LLM:
        eos = 0

        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.model = DriverModel()
            runner = types.SimpleNamespace(model=self.model)
            executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
            self.llm_engine = types.SimpleNamespace(model_executor=executor)
            mod.instances.append(self)
            events.append(("LLM", kwargs))

        def wake_up(self, tags=None):
            events.append(("wake_up", tuple(tags) if tags else None))

        def sleep(self, level=1):
            events.append(("sleep", level))

        def reset_prefix_cache(self):
            events.append(("reset_prefix_cache",))
            return True

        def generate(self, prompts, params, use_tqdm=True):
            events.append(("generate", len(prompts)))
            out = []
            for i, _ in enumerate(prompts):
                ids = [7, 8, LLM.eos] if i % 2 == 0 else [7, 8, 8, 8]
                done = types.SimpleNamespace(token_ids=ids, finish_reason="stop" if i % 2 == 0 else "length")
                out.append(types.SimpleNamespace(outputs=[done]))
            return out

    mod.LLM, mod.SamplingParams, mod.instances = LLM, SamplingParams, []
    return mod


@pytest.fixture()
def stub(monkeypatch):
    events: list = []
    mod = _stub_vllm(events)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return types.SimpleNamespace(mod=mod, events=events)


def _engine(**kwargs) -> VLLMGenerationEngine:
    """Built as on a CUDA machine (construction checks for a device; nothing else here touches CUDA)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        return VLLMGenerationEngine(**kwargs)


def _names(events, kind):
    return [e for e in events if e[0] == kind]


def _index(events, kind, last=False):
    hits = [i for i, e in enumerate(events) if e[0] == kind]
    return hits[-1] if last else hits[0]


SAMPLING = SamplingConfig(max_new_tokens=4, temperature=0.7, max_prompt_tokens=64)


def test_weight_names_map_to_checkpoint_names():
    assert vllm_weight_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert vllm_weight_name("model._fsdp_wrapped_module.layers.1._checkpoint_wrapped_module.mlp.down_proj.weight") == (
        "model.layers.1.mlp.down_proj.weight"
    )
    assert vllm_weight_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    assert vllm_weight_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert vllm_weight_name("base_model.model.lm_head.original_module.weight") is None
    assert vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None


def test_sampling_params_mapping_is_explicit_and_refuses_unknown_fields(tokenizer):
    stops = stop_token_ids(tokenizer, [])
    kw = vllm_sampling_kwargs(SamplingConfig(max_new_tokens=9, temperature=0.7, top_k=20, min_p=0.05), stops)
    assert kw == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": 9,
        "min_tokens": 0,
        "stop_token_ids": stops,
        "ignore_eos": False,
        "logprobs": None,
        "seed": None,
        "detokenize": False,
    }
    greedy = vllm_sampling_kwargs(SamplingConfig(temperature=0.0, top_p=0.5, top_k=3, min_p=0.1), stops)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["min_p"]) == (0.0, 1.0, -1, 0.0)
    assert vllm_sampling_kwargs(SamplingConfig(), stops)["top_k"] == -1  # top-k off

    @dataclasses.dataclass(frozen=True)
    class WithTypicalP(SamplingConfig):
        typical_p: float = 0.9

    with pytest.raises(ValueError, match="cannot map sampling fields \\['typical_p'\\]"):
        vllm_sampling_kwargs(WithTypicalP(), stops)
    with pytest.raises(ValueError, match="no stop token"):
        vllm_sampling_kwargs(SamplingConfig(), [])


def test_engine_is_in_process_and_outputs_grpo_tensors(stub, teacher_model, tokenizer):
    stub.mod.LLM.eos = tokenizer.eos_token_id
    engine = _engine(enable_sleep_mode=False, seed=3)
    out = engine.generate(teacher_model, tokenizer, ["a b", "c"], 2, SAMPLING)
    (llm,) = stub.mod.instances
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.kwargs["tensor_parallel_size"] == 1 and llm.kwargs["seed"] == 3
    assert llm.kwargs["model"] == teacher_model.config._name_or_path
    assert llm.kwargs["generation_config"] == "vllm"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    (params,) = _names(stub.events, "SamplingParams")
    assert params[1] == vllm_sampling_kwargs(SAMPLING, stop_token_ids(tokenizer, [], teacher_model))
    assert out.prompts == ["a b", "a b", "c", "c"]
    assert out.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert out.finished.tolist() == [True, False, True, False]
    assert out.prompt_mask[2, 0] == 0 and out.prompt_mask[0].all()  # left-padded prompts
    pushed = dict(llm.model.loaded)  # an fp32 policy reaches the engine in the engine's dtype
    assert pushed.keys() == teacher_model.state_dict().keys()
    assert all(
        t.dtype == torch.bfloat16 and torch.equal(t, teacher_model.state_dict()[n].bfloat16())
        for n, t in pushed.items()
    )


def test_requests_longer_than_the_engine_are_refused(stub, teacher_model, tokenizer):
    engine = _engine(max_model_len=8, enable_sleep_mode=False)
    with pytest.raises(ValueError, match="engine.init_args.max_model_len=8"):
        engine.generate(teacher_model, tokenizer, ["a b c"], 1, SamplingConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="sampling.max_prompt_tokens=1"):
        engine.generate(teacher_model, tokenizer, ["a b c"], 1, SamplingConfig(max_new_tokens=1, max_prompt_tokens=1))
    assert not _names(stub.events, "generate")


def test_sync_once_per_optimizer_step(stub, teacher_model, tokenizer):
    """Weights are pushed before the first round and after each optimizer step, never when unchanged."""
    engine = _engine()
    for _ in range(2):
        engine.generate(teacher_model, tokenizer, ["a"], 2, SAMPLING)
    assert engine.syncs == 1
    engine.weights_changed()
    engine.generate(teacher_model, tokenizer, ["a"], 2, SAMPLING)
    engine.generate(teacher_model, tokenizer, ["a"], 2, SAMPLING)
    assert engine.syncs == 2
    engine.weights_changed()
    engine.weights_changed()  # two steps between rounds: one push of the latest weights
    engine.generate(teacher_model, tokenizer, ["a"], 2, SAMPLING)
    assert engine.syncs == 3
    n_tensors = len(list(merged_weights(teacher_model)))
    assert len(_names(stub.events, "load_weights")) == 3 * n_tensors


def test_sleep_level_2_pushes_every_round(stub, teacher_model, tokenizer):
    """Level 2 discards the engine's weights, so an unchanged policy is still pushed again after each sleep."""
    engine = _engine(sleep_level=2)
    for _ in range(3):
        engine.generate(teacher_model, tokenizer, ["a"], 1, SAMPLING)
    assert engine.syncs == 3
    assert [e for e in stub.events if e[0] == "sleep"] == [("sleep", 2)] * 3


def test_wake_before_load_reset_after_load_sleep_after_generate(stub, teacher_model, tokenizer):
    engine = _engine(sleep_level=1)
    engine.generate(teacher_model, tokenizer, ["a"], 1, SAMPLING)  # first round: engine awake, weights pushed
    ev = stub.events
    assert _index(ev, "LLM") < _index(ev, "load_weights")
    assert _index(ev, "load_weights", last=True) < _index(ev, "reset_prefix_cache") < _index(ev, "generate")
    assert _index(ev, "generate") < _index(ev, "sleep")
    engine.weights_changed()
    del ev[:]
    engine.generate(teacher_model, tokenizer, ["a"], 1, SAMPLING)  # asleep: wake weights, load, reset, wake KV
    kinds = [e[0] for e in ev if e[0] != "load_weights"]
    assert kinds == [
        "SamplingParams",
        "wake_up",  # weights
        "reset_prefix_cache",  # after the push
        "wake_up",  # KV cache
        "reset_prefix_cache",
        "generate",
        "sleep",
    ]
    assert ev[1] == ("wake_up", ("weights",)) and ev[-1] == ("sleep", 1)
    loads = [i for i, e in enumerate(ev) if e[0] == "load_weights"]
    assert 1 < loads[0] and loads[-1] < ev.index(("reset_prefix_cache",))
    assert ev.index(("wake_up", ("kv_cache",))) < ev.index(("generate", 1))
    del ev[:]
    engine.generate(teacher_model, tokenizer, ["a"], 1, SAMPLING)  # unchanged: no load, KV woken and reset
    assert [e[0] for e in ev] == [
        "SamplingParams",
        "wake_up",
        "wake_up",
        "reset_prefix_cache",
        "generate",
        "sleep",
    ]


def test_missing_driver_worker_names_the_supported_range():
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace())
    with pytest.raises(RuntimeError, match=re.escape(VLLM_REQUIREMENT)):
        driver_model(llm)


def test_pinned_range_matches_pyproject():
    line = re.search(r"^vllm = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line is not None and line.group(1) == f'"{VLLM_REQUIREMENT}"'


def test_bad_engine_settings_fail_at_construction(stub):
    with pytest.raises(ValueError, match="engine.init_args.sleep_level"):
        _engine(sleep_level=3)
    with pytest.raises(ValueError, match="engine.init_args.dtype"):
        _engine(dtype="float32")


def _randomize_adapter(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def compact_teacher(tmp_path_factory) -> str:
    from rlt_pl.formats import CompactFormat
    from rlt_pl.tiny import build_compact_assets

    return str(build_compact_assets(tmp_path_factory.mktemp("vllm"), CompactFormat().tag_tokens(), seed=0)["teacher"])


@needs_bnb
def test_qlora_sync_pushes_dense_merged_bf16_and_leaves_the_reference_bit_identical(stub, compact_teacher):
    """A 4-bit + LoRA policy reaches vLLM as the plain checkpoint's tensors (names and shapes), each equal to
    merged_weights(model, bf16), dense bf16 (no packed uint8, no quantisation state); the 4-bit base, the policy and
    the adapter-off reference outputs are bit-identical before and after the push."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_causal_lm(ModelConfig(compact_teacher, dtype="bfloat16", quantization="4bit", lora=LoraConfig(r=4)))
    _randomize_adapter(model)
    model.eval()
    tok = AutoTokenizer.from_pretrained(compact_teacher)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        policy0 = model(input_ids=IDS).logits
        with reference_mode(model):
            ref0 = model(input_ids=IDS).logits

    engine = _engine(dtype="bfloat16")
    engine.generate(model, tok, ["1+2"], 1, SamplingConfig(max_new_tokens=4))
    pushed = stub.mod.instances[0].model.loaded

    plain = AutoModelForCausalLM.from_pretrained(compact_teacher, dtype=torch.bfloat16).state_dict()
    assert [n for n, _ in pushed] == list(plain.keys())
    assert all(t.shape == plain[n].shape for n, t in pushed)
    assert all(t.dtype == torch.bfloat16 and t.layout == torch.strided for _, t in pushed)
    want = dict(merged_weights(model, torch.bfloat16))
    assert all(torch.equal(t, want[n]) for n, t in pushed)
    assert sum(not torch.equal(t, plain[n]) for n, t in pushed) >= 7  # the adapter delta is in the pushed weights
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items()), "the model changed"
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, policy0), "the policy changed"
        with reference_mode(model):
            assert torch.equal(model(input_ids=IDS).logits, ref0), "the adapter-off reference drifted"


def test_missing_vllm_names_the_extra_and_the_range(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=re.escape(f"pip install 'rlt_pl[vllm]' ({VLLM_REQUIREMENT})")):
        VLLMGenerationEngine()
    assert VLLMGenerationEngine(fallback_to_hf=True).fallback is not None


_FSDP_RANK = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from rlt_pl.distributed import shard_model
from rlt_pl.generation_vllm import sync_tensors, vllm_weight_name
from rlt_pl.merge import merged_weights
from rlt_pl.models import LoraConfig, ModelConfig, load_causal_lm
dist.init_process_group("gloo")
torch.manual_seed(0)  # the same LoRA init on every rank, as seed_everything gives a run
model = load_causal_lm(ModelConfig(sys.argv[1], dtype="float32", lora=LoraConfig(r=4)))
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
want = {vllm_weight_name(n): t.clone() for n, t in merged_weights(model, torch.float32)}
shard_model(model, init_device_mesh("cpu", (dist.get_world_size(),)))
assert any(isinstance(p, DTensor) for p in model.parameters())
got = list(sync_tensors(model, torch.float32))
assert [n for n, _ in got] == list(want), "names"
assert not any(isinstance(t, DTensor) for _, t in got), "a shard was pushed"
assert all(t.shape == want[n].shape for n, t in got), "shapes"
err = max((t - want[n]).abs().max().item() for n, t in got)
assert err < 1e-6, err
print("OK", len(got), err)
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes: ~90 s on 2 loaded cores
def test_fsdp2_sync_pushes_gathered_full_tensors(tiny_dirs, tmp_path):
    """Under FSDP2 (2 CPU processes, gloo) every pushed tensor is the full, merged tensor under its checkpoint name
    (equal to the unsharded model's merged weights), never a DTensor shard."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
        env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-c", _FSDP_RANK, str(tiny_dirs["teacher"])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "OK" in out


def test_grpo_module_pushes_once_per_generation_round(stub, compact_teacher):
    """In a real GRPO run (μ = 2: two optimizer steps per generation round) the module tells the engine after every
    optimizer step and the engine pushes only before a round that follows a step, the push carrying the moved
    policy."""
    import lightning as L

    from rlt_pl.datamodules.addition import AdditionDataModule
    from rlt_pl.formats import CompactFormat
    from rlt_pl.grpo import PolicyLossConfig
    from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult

    class Length(Reward):  # the stub's completions alternate 2 and 4 tokens: non-zero advantages
        def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
            return RewardResult(gen.completion_mask.sum(-1).float())

    L.seed_everything(0)
    engine = _engine(sleep_level=1)
    module = GRPOModule(
        ModelConfig(compact_teacher, dtype="float32"),
        reward=Length(),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=8,
        num_iterations=2,
        lr=3e-2,
        loss=PolicyLossConfig(beta=0.0, clip_eps_low=0.2),
        reference="none",
        sampling=SamplingConfig(max_new_tokens=8, temperature=1.0),
        sample_table_every_n_steps=0,
        engine=engine,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    # the sanity-check validation (2 batches) and the first training round see the same weights: one push for three
    assert [e[1] for e in _names(stub.events, "generate")] == [2, 2, 8, 8] and trainer.global_step == 4
    assert engine._policy_version == 4 and engine.syncs == 2
    loaded = stub.mod.instances[0].model.loaded
    first, second = dict(loaded[: len(loaded) // 2]), dict(loaded[len(loaded) // 2 :])
    assert first.keys() == second.keys() == module.model.state_dict().keys()
    assert sum(not torch.equal(first[k], second[k]) for k in first) >= 7  # the policy moved between the rounds
