"""Tests for rlt_pl.models: loading, dtype, validation errors, LoRA training/reference mode, export, tokenizers."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import peft
import pytest
import torch
from conftest import requires_cuda
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlt_pl.models import (
    LoraConfig,
    ModelConfig,
    check_tokenizers_compatible,
    export_model,
    is_lora,
    load_causal_lm,
    load_tokenizer,
    reference_mode,
)
from rlt_pl.tiny import default_corpus, train_tokenizer

TAGS = ["<|begin_of_explanation|>", "<|end_of_explanation|>", "<|begin_of_solution|>", "<|im_start|>", "<|im_end|>"]
NO_CUDA = mock.patch("torch.cuda.is_available", return_value=False)


def _ids(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora_cfg(path: Path) -> ModelConfig:
    return ModelConfig(str(path), dtype="float32", lora=LoraConfig(r=4, alpha=8, dropout=0.0))


def _train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        ids = _ids(seed=i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_load_frozen_and_trainable(tiny_dirs):
    with NO_CUDA:
        cfg = ModelConfig(str(tiny_dirs["teacher"]))
        frozen = load_causal_lm(cfg, trainable=False)
        trainable = load_causal_lm(cfg, trainable=True)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert all(m.training for m in trainable.modules())
    assert next(frozen.parameters()).dtype == torch.float32  # auto -> fp32 without CUDA
    assert not is_lora(trainable)
    torch.testing.assert_close(_logits(frozen, _ids()), _logits(trainable.eval(), _ids()))


def test_dtype_handling(tiny_dirs):
    model = load_causal_lm(ModelConfig(str(tiny_dirs["student"]), dtype="bfloat16"), trainable=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with NO_CUDA:
        assert ModelConfig("Qwen/Qwen2.5-7B-Instruct").torch_dtype() == torch.float32
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert ModelConfig("Qwen/Qwen2.5-7B-Instruct").torch_dtype() == torch.bfloat16
    assert ModelConfig("x", dtype="float16").torch_dtype() == torch.float16


def test_quantization_needs_cuda_or_cpu_bitsandbytes(tiny_dirs):
    cfg = ModelConfig(str(tiny_dirs["teacher"]), quantization="4bit", lora=LoraConfig())
    old_bnb = mock.patch("rlt_pl.models.bitsandbytes_runs_on_cpu", return_value=False)
    with old_bnb, pytest.raises(ValueError, match=r"model.quantization='4bit' needs a CUDA device, or bitsandbytes"):
        cfg.validate(needs_cuda_ok=False)
    with old_bnb, NO_CUDA, pytest.raises(ValueError, match=r"model.quantization='4bit' needs a CUDA device"):
        load_causal_lm(cfg)
    cfg.validate(needs_cuda_ok=True)  # fine where CUDA exists
    with mock.patch("rlt_pl.models.bitsandbytes_runs_on_cpu", return_value=True):
        cfg.validate(needs_cuda_ok=False)  # and on CPU with bitsandbytes >= 0.48
    assert ModelConfig("x", quantization="4bit").torch_dtype() == torch.bfloat16  # "auto" = the compute dtype
    with mock.patch("torch.cuda.is_available", return_value=True):
        no_lora = ModelConfig(str(tiny_dirs["teacher"]), quantization="8bit")
        with pytest.raises(ValueError, match="cannot be trained directly; set model.lora"):
            load_causal_lm(no_lora, trainable=True)
    bnb = cfg.quantization_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert ModelConfig("x").quantization_config() is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name_or_path": "./does/not/exist"}, "looks like a local path"),
        ({"name_or_path": "/abs/missing_dir"}, "looks like a local path"),
        ({"name_or_path": "not a hub id!"}, "neither an existing directory nor a Hub id"),
        ({"name_or_path": "Qwen/Q", "quantization": "4bit", "compile": True}, "model.compile"),
        ({"name_or_path": "Qwen/Q", "quantization": "4bit", "dtype": "float32"}, "model.dtype"),
        ({"name_or_path": "Qwen/Q", "lora": LoraConfig(r=0)}, "model.lora.r"),
        ({"name_or_path": "Qwen/Q", "lora": LoraConfig(dropout=1.0)}, "model.lora.dropout"),
        ({"name_or_path": "Qwen/Q", "dtype": "int8"}, "model.dtype"),
    ],
)
def test_validate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs).validate(needs_cuda_ok=True)


def test_validate_accepts_hub_ids_and_relative_dirs(tiny_dirs, monkeypatch):
    ModelConfig("Qwen/Qwen2.5-7B-Instruct").validate(needs_cuda_ok=False)
    ModelConfig("gpt2").validate(needs_cuda_ok=False)
    monkeypatch.chdir(tiny_dirs["teacher"].parent)
    ModelConfig("./teacher").validate(needs_cuda_ok=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        ModelConfig("./teacher", attn_implementation="flash_attention_2").validate(needs_cuda_ok=False)


def test_gradient_checkpointing_and_compile_flags(tiny_dirs):
    model = load_causal_lm(ModelConfig(str(tiny_dirs["teacher"]), dtype="float32", gradient_checkpointing=True))
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.layers[0].parameters())
    lora_gc = load_causal_lm(
        ModelConfig(str(tiny_dirs["teacher"]), dtype="float32", gradient_checkpointing=True, lora=LoraConfig(r=2))
    )
    lora_gc(input_ids=ids, labels=ids).loss.backward()
    trained = {n: p for n, p in lora_gc.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for p in trained.values())
    # LoRA B starts at zero, so A's gradient is zero on the first step; B's is not (checkpointing kept the graph)
    assert all(p.grad.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)
    compiled = load_causal_lm(ModelConfig(str(tiny_dirs["student"]), compile=True), trainable=False)
    assert compiled._compiled_call_impl is not None


def test_lora_trains_only_adapters_and_reference_is_base(tiny_dirs):
    torch.manual_seed(0)
    model = load_causal_lm(_lora_cfg(tiny_dirs["teacher"]))
    assert is_lora(model) and model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: the adapter now does something

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32).eval()
    model.eval()
    ids = _ids(seed=9)
    with reference_mode(model):
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(model, ids), _logits(base, ids), atol=1e-4)  # adapter back on afterwards
    with pytest.raises(TypeError, match="needs a peft"):
        with reference_mode(base):
            pass


def test_export_adapter_and_merged(tiny_dirs, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = load_causal_lm(_lora_cfg(tiny_dirs["teacher"]))
    _train_steps(model, steps=2)
    model.eval()
    ids = _ids(seed=3)
    expected = _logits(model, ids)

    adapter_dir = export_model(model, tokenizer, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32)
    reloaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)

    merged_dir = export_model(model, tokenizer, tmp_path / "merged", merge_lora=True)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, ids), expected, atol=0, rtol=0)  # live model untouched
    assert AutoTokenizer.from_pretrained(merged_dir).get_vocab() == tokenizer.get_vocab()

    full = load_causal_lm(ModelConfig(str(tiny_dirs["student"])), trainable=False)
    full_dir = export_model(full, tokenizer, tmp_path / "full", merge_lora=True)  # merge ignored without adapters
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(full_dir), ids), _logits(full, ids))


def test_tokenizers_compatible(tiny_dirs, tokenizer):
    student_tok = load_tokenizer(str(tiny_dirs["student"]))
    check_tokenizers_compatible(tokenizer, student_tok, TAGS)
    small = train_tokenizer(default_corpus(0), vocab_size=300)
    with pytest.raises(ValueError, match=r"vocabulary size: \d+ vs 300"):
        check_tokenizers_compatible(tokenizer, small, TAGS)
    other = train_tokenizer(default_corpus(1)[:300], vocab_size=len(tokenizer))
    assert len(other) == len(tokenizer)
    with pytest.raises(ValueError, match="differ on probe '<\\|begin_of_explanation\\|>'"):
        check_tokenizers_compatible(tokenizer, other, TAGS)
    with pytest.raises(ValueError, match="differ in vocabulary, first at token"):
        check_tokenizers_compatible(tokenizer, other, [])


def test_load_tokenizer_padding(tiny_dirs, tmp_path):
    tok = load_tokenizer(str(tiny_dirs["teacher"]), require_chat_template=True)
    assert tok.padding_side == "left" and tok.pad_token == "<|endoftext|>"
    assert load_tokenizer(str(tiny_dirs["teacher"]), padding_side="right").padding_side == "right"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(str(tiny_dirs["teacher"]), padding_side="middle")

    no_pad = train_tokenizer(default_corpus(0)[:200], vocab_size=300)
    no_pad.pad_token = None
    no_pad.chat_template = None
    no_pad.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(str(tmp_path / "nopad")).pad_token == no_pad.eos_token
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(str(tmp_path / "nopad"), require_chat_template=True)

    fim = train_tokenizer(default_corpus(0)[:200], vocab_size=300, special_tokens=["<|fim_pad|>"])
    fim.pad_token = None
    fim.save_pretrained(tmp_path / "fim")
    assert load_tokenizer(str(tmp_path / "fim")).pad_token == "<|fim_pad|>"


@requires_cuda
@pytest.mark.gpu
def test_qlora_load_and_train_gpu(tiny_dirs):
    cfg = ModelConfig(str(tiny_dirs["teacher"]), quantization="4bit", lora=LoraConfig(r=4), gradient_checkpointing=True)
    model = load_causal_lm(cfg)
    assert is_lora(model) and next(model.parameters()).is_cuda
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids().cuda()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    with reference_mode(model):
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_adapter_export_seeds_the_next_stage_trainable(tiny_dirs, tokenizer, tmp_path):
    """An adapter-only export loads trainable (its LoRA weights, and only they) and trains on; a frozen load is
    frozen. Without this the export loaded with a frozen adapter and could not seed the next stage."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    trained = load_causal_lm(ModelConfig(str(tiny_dirs["teacher"]), dtype="float32", lora=lora))
    with torch.no_grad():  # stand-in for a trained adapter: lora_B away from its zero init
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    saved = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    out = export_model(trained, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()

    seeded = load_causal_lm(ModelConfig(str(out), dtype="float32"), trainable=True)
    trainable = {n: p for n, p in seeded.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(saved)  # exactly the adapter's LoRA weights
    for name, p in trainable.items():
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0)
    ids = torch.tensor([tokenizer("1+2=3").input_ids])
    seeded(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    assert any(not torch.equal(p, saved[n]) for n, p in trainable.items())

    frozen = load_causal_lm(ModelConfig(str(out), dtype="float32"), trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="model.lora"):
        load_causal_lm(ModelConfig(str(out), dtype="float32", lora=LoraConfig(r=8, alpha=8)), trainable=True)
