"""Merged, dequantised weights computed out of place (`rlt_pl.merge`), and the merged QLoRA export."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlt_pl.merge import hf_weight_name, merged_weights
from rlt_pl.models import (
    LoraConfig,
    ModelConfig,
    bitsandbytes_runs_on_cpu,
    export_model,
    load_causal_lm,
    reference_mode,
)

needs_bnb = pytest.mark.skipif(not bitsandbytes_runs_on_cpu(), reason="needs bitsandbytes >= 0.48 (NF4 on CPU)")
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 4]])


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    """Tiny models whose widths suit bitsandbytes' CPU NF4 kernels."""
    from rlt_pl.formats import CompactFormat
    from rlt_pl.tiny import build_compact_assets

    return build_compact_assets(tmp_path_factory.mktemp("merge"), CompactFormat().tag_tokens(), seed=0)


@pytest.fixture(scope="module")
def compact_teacher(compact_dirs) -> str:
    return str(compact_dirs["teacher"])


@pytest.fixture(scope="module")
def tokenizer_of_compact(compact_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(compact_teacher)


def _randomize_adapter(model: torch.nn.Module) -> None:
    """lora_B starts at 0 (a zero delta): give it values so the merge matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _lora(path, quantization=None) -> torch.nn.Module:
    dtype = "bfloat16" if quantization else "float32"
    model = load_causal_lm(ModelConfig(str(path), dtype=dtype, quantization=quantization, lora=LoraConfig(r=4)))
    _randomize_adapter(model)
    return model.eval()


def test_hf_weight_name():
    assert hf_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert hf_weight_name("lm_head.weight") == "lm_head.weight"


def test_plain_model_weights_are_its_state_dict(tiny_dirs):
    model = load_causal_lm(ModelConfig(str(tiny_dirs["teacher"]), dtype="float32"), trainable=False)
    merged = dict(merged_weights(model))
    state = model.state_dict()
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)


def test_lora_merged_weights_equal_peft_merge_and_unload(tiny_dirs):
    """W + scale·B·A per wrapped linear equals peft's merge of a deep copy; the model is untouched."""
    model = _lora(tiny_dirs["teacher"])
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    merged = dict(merged_weights(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    assert max((merged[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    base = {hf_weight_name(k): v for k, v in state0.items() if "lora_" not in k}
    assert base.keys() == merged.keys()
    assert sum(not torch.equal(merged[k], base[k]) for k in base) >= 7  # the delta was applied per wrapped linear
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items())
    bf16 = dict(merged_weights(model, torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, merged[k].to(torch.bfloat16)) for k, v in bf16.items())


def test_merged_layer_in_place_is_refused(tiny_dirs):
    model = _lora(tiny_dirs["teacher"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights in place"):
        dict(merged_weights(model))


@needs_bnb
def test_qlora_merged_weights_dequantised_out_of_place(compact_teacher):
    """4-bit base: dequantised W + scale·B·A (peft's own delta on a deep copy, to 1e-6 before the bf16 cast), names =
    the plain model's state_dict keys, and parameters and adapter-off reference outputs bit-identical afterwards."""
    import bitsandbytes.functional as bnbf

    model = _lora(compact_teacher, "4bit")
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), reference_mode(model):
        ref0 = model(input_ids=IDS).logits
    merged = dict(merged_weights(model, torch.float32))

    plain = AutoModelForCausalLM.from_pretrained(compact_teacher, dtype=torch.float32)
    assert merged.keys() == plain.state_dict().keys()
    twin = copy.deepcopy(model)
    checked = 0
    for name, module in twin.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            w = module.base_layer.weight
            want = bnbf.dequantize_4bit(w.data, w.quant_state).float() + module.get_delta_weight("default").float()
            got = merged[hf_weight_name(name + ".weight")]
            assert (got - want).abs().max().item() < 1e-6, name
            checked += 1
    assert checked > 0
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items()), "the model changed"
    with torch.no_grad(), reference_mode(model):
        assert torch.equal(model(input_ids=IDS).logits, ref0), "the adapter-off reference drifted"


@needs_bnb
def test_qlora_merged_export_is_a_plain_checkpoint(compact_teacher, tokenizer_of_compact, tmp_path):
    """merge_lora=True on a 4-bit base writes a plain bf16 checkpoint whose outputs equal the QLoRA model's."""
    model = _lora(compact_teacher, "4bit")
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=IDS).logits.float()
    out = export_model(model, tokenizer_of_compact, tmp_path / "merged", merge_lora=True)
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.to_dict().get("quantization_config") is None
    assert loaded.dtype == torch.bfloat16
    assert all(type(p) is torch.nn.Parameter for p in loaded.parameters())
    with torch.no_grad():
        got = loaded(input_ids=IDS).logits.float()
    err = (got - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items())
