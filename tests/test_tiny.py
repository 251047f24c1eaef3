"""Offline tiny assets: deterministic, loadable with Auto* offline, tokenizer load paths agree, Qwen2.5 template."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rlt_pl.formats import CompactFormat
from rlt_pl.tiny import build_compact_assets, build_tiny_assets, main


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_same_seed_gives_identical_weights_and_vocab(tmp_path):
    a = build_tiny_assets(tmp_path / "a", seed=3)
    b = build_tiny_assets(tmp_path / "b", seed=3)
    c = build_tiny_assets(tmp_path / "c", seed=4)
    for role in ("teacher", "student"):
        wa, wb, wc = _weights(a[role]), _weights(b[role]), _weights(c[role])
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert any(not torch.equal(wa[k], wc[k]) for k in wa)
        assert (a[role] / "tokenizer.json").read_bytes() == (b[role] / "tokenizer.json").read_bytes()
    # teacher and student differ in size but share one tokenizer
    assert (a["teacher"] / "tokenizer.json").read_bytes() == (a["student"] / "tokenizer.json").read_bytes()
    ta = AutoModelForCausalLM.from_pretrained(a["teacher"])
    sa = AutoModelForCausalLM.from_pretrained(a["student"])
    assert ta.config.hidden_size != sa.config.hidden_size
    assert 100_000 < sum(p.numel() for p in ta.parameters()) < 1_000_000


def test_auto_and_fast_tokenizer_agree(tiny_dirs):
    auto = AutoTokenizer.from_pretrained(tiny_dirs["teacher"])
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_dirs["teacher"])
    text = "Return your final response within \\boxed{}. What is 1234 + 5678?\n\n<|begin_of_explanation|>\n\nCafé ü 😀"
    assert auto(text, add_special_tokens=False)["input_ids"] == fast(text, add_special_tokens=False)["input_ids"]
    # Qwen2 pre-tokenizer: digits one by one
    digits = auto.convert_ids_to_tokens(auto("12345", add_special_tokens=False)["input_ids"])
    assert digits == list("12345")
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"
    assert auto.model_max_length >= 2048


def test_chat_template_is_qwen25(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert (
        text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    no_system = tokenizer.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert no_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert no_system.endswith("<|im_start|>assistant\n")


def test_compact_assets_are_character_level_with_one_token_tags(tmp_path):
    dirs = build_compact_assets(tmp_path, CompactFormat().tag_tokens())
    tok = AutoTokenizer.from_pretrained(dirs["teacher"])
    ids = tok("<Q>358+467<S>825<E>8+7+0=15;</E>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:9] == ["<Q>", "3", "5", "8", "+", "4", "6", "7", "<S>"]
    assert len(ids) == 23
    # tags survive skip_special_tokens decoding (they are not special)
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "<Q>358+467<S>825<E>8+7+0=15;</E>"


def test_cli_writes_both_models(tmp_path, capsys):
    main([str(tmp_path / "out"), "--compact"])
    assert "teacher" in capsys.readouterr().out
    for role in ("teacher", "student"):
        assert (tmp_path / "out" / role / "config.json").exists()
