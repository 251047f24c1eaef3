"""`rlt_pl.memory`: the weight, adapter and optimizer terms equal the bytes really allocated for a tiny model on
CPU; the shipped 24 GB QLoRA configs are predicted to fit; the CLI warns over a budget. Also the chunked entropy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from rlt_pl.grpo import token_entropy
from rlt_pl.memory import (
    GIB,
    ModelShape,
    load_config,
    lora_tensors,
    main,
    optimizer_bytes,
    peak_bytes,
    predict,
    weight_bytes,
)
from rlt_pl.models import LoraConfig, ModelConfig, bitsandbytes_runs_on_cpu, load_causal_lm
from rlt_pl.optim import AdamW8bit

REPO = Path(__file__).resolve().parents[1]
QLORA_CONFIGS = ["configs/teacher/rlt_qwen7b_qlora_24gb.yaml", "configs/student/distill_qlora_24gb.yaml"]


def _allocated_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter storage plus bitsandbytes quantisation state."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.nbytes
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            extra = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
            seen.update({t.data_ptr(): t.nbytes for t in extra})
        scb = getattr(p, "SCB", None)
        if scb is not None:
            seen[scb.data_ptr()] = scb.nbytes
    return sum(seen.values())


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen = {t.data_ptr(): t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    return sum(seen.values())


@pytest.fixture(scope="module")
def shape(tiny_dirs) -> ModelShape:
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_dirs["teacher"]))


@pytest.mark.parametrize(
    ("dtype", "quantization"), [("float32", None), ("bfloat16", None), ("bfloat16", "4bit"), ("bfloat16", "8bit")]
)
def test_weight_bytes_equal_allocated(tiny_dirs, shape, dtype, quantization):
    if quantization is not None and not bitsandbytes_runs_on_cpu():
        pytest.skip("needs bitsandbytes >= 0.48 on CPU")
    model = load_causal_lm(ModelConfig(str(tiny_dirs["teacher"]), dtype=dtype, quantization=quantization), False)
    assert weight_bytes(shape, dtype, quantization) == _allocated_weight_bytes(model)


def test_adapter_and_optimizer_bytes_equal_allocated(tiny_dirs, shape):
    """LoRA tensors as peft builds them; torch AdamW states in the parameter dtype (fp32 adapter, bf16 full model);
    bitsandbytes 8-bit AdamW (8-bit and 32-bit tensors, shared quantisation maps)."""
    model = load_causal_lm(ModelConfig(str(tiny_dirs["teacher"]), lora=LoraConfig(r=32)))
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert sorted(p.numel() for p in adapter) == sorted(lora_tensors(shape, 32, "all-linear"))
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    model(input_ids=ids, labels=ids).loss.backward()
    for make, kind in ((lambda ps: torch.optim.AdamW(ps, lr=1e-3), "adamw"), (_adam8, "adamw8bit")):
        opt = make(adapter)
        opt.step()
        assert _state_bytes(opt) == optimizer_bytes([p.numel() for p in adapter], 4, kind), kind
    assert any(p.numel() >= 4096 for p in adapter) and any(p.numel() < 4096 for p in adapter)  # both 8-bit paths

    full = load_causal_lm(ModelConfig(str(tiny_dirs["teacher"]), dtype="bfloat16"))
    params = [p for p in full.parameters() if p.requires_grad]
    full(input_ids=ids, labels=ids).loss.backward()
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())  # not fp32
    assert _state_bytes(opt) == optimizer_bytes([p.numel() for p in params], 2, "adamw")
    assert sum(p.numel() for p in params) == weight_bytes(shape, "float32") // 4


def _adam8(params):
    return AdamW8bit(params, lr=1e-3, allow_cpu=True)


@pytest.mark.parametrize("path", QLORA_CONFIGS)
def test_qlora_24gb_configs_are_predicted_to_fit(path):
    terms = predict(load_config([REPO / path]))
    peak = peak_bytes(terms) / GIB
    assert 15 < peak <= 22.0, peak
    names = " ".join(t.name for t in terms)
    assert "logits" in names and "checkpointed" in names and "optimizer states (adamw8bit)" in names


def test_prediction_terms_follow_the_config(tmp_path):
    """Golden: the Qwen2.5-7B KV cache is 57,344 B/token; checkpointing and a longer completion move the peak."""
    base = load_config([REPO / QLORA_CONFIGS[0]])
    terms = {t.name: t.bytes for t in predict(base)}
    assert terms["KV cache (8 x 8192 tokens)"] == 8 * 8192 * 57344
    no_ckpt = load_config([REPO / QLORA_CONFIGS[0]])
    no_ckpt["model"]["init_args"]["model"]["gradient_checkpointing"] = False
    assert peak_bytes(predict(no_ckpt)) > peak_bytes(predict(base)) + 10 * GIB
    longer = load_config([REPO / QLORA_CONFIGS[0]])
    longer["model"]["init_args"]["sampling"]["max_new_tokens"] = 8192
    assert peak_bytes(predict(longer)) > peak_bytes(predict(base))


def test_cli_warns_over_budget(capsys):
    assert main(["-c", str(REPO / QLORA_CONFIGS[0]), "--budget-gib", "22"]) == 0
    assert "predicted peak per GPU" in capsys.readouterr().out
    assert main(["-c", str(REPO / QLORA_CONFIGS[0]), "--budget-gib", "10"]) == 1
    assert "exceeds the budget" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--devices"):
        main(["-c", str(REPO / "configs/teacher/rlt_qwen7b.yaml"), "-c", str(REPO / "configs/trainer/fsdp.yaml")])


def test_token_entropy_matches_the_full_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.bfloat16)
    ref = torch.log_softmax(logits.float() / 0.7, -1)
    ref = -(ref.exp() * ref).sum(-1)
    got = token_entropy(logits, 0.7, chunk_elements=100)  # 2 rows per chunk: many chunks, a ragged last one
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(token_entropy(torch.zeros(1, 2, 8)), torch.full((1, 2), math.log(8)))  # uniform: log V
    sliced = token_entropy(logits[:, :-1], 0.7)
    torch.testing.assert_close(sliced, ref[:, :-1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, 0.0)


def test_the_global_batch_is_split_over_ranks():
    """`data.batch_size` is the global batch (the loader gives each rank batch_size / world_size rows): the 8-GPU SFT
    config trains one 16k-token row per GPU, and GRPO generates its share of the step's completions per rank."""
    sft = {t.name: t.bytes for t in predict(load_config([REPO / "configs/teacher/sft_qwen7b.yaml"]))}
    assert "activations: checkpointed layer inputs (1 x 16384 tokens)" in sft
    assert peak_bytes(predict(load_config([REPO / "configs/teacher/sft_qwen7b.yaml"]))) < 48 * GIB
    rl = load_config([REPO / QLORA_CONFIGS[0]])
    rl["model"]["init_args"]["engine"]["init_args"]["batch_size"] = None  # one generate call per step
    group, prompts = rl["model"]["init_args"]["num_generations"], rl["data"]["init_args"]["batch_size"]
    one = {t.name for t in predict(rl)}
    rl["data"]["init_args"]["batch_size"] *= 2
    two_ranks = {t.name for t in predict(rl, devices=2)}
    assert any(n.startswith(f"KV cache ({group * prompts} x") for n in one) and one == two_ranks
