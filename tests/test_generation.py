"""Generation engines: masks up to and including the stop token, stop strings, decoding, vLLM fallback."""

import pytest
import torch

from rlt_pl.formats import CompactFormat
from rlt_pl.generation import HFGenerationEngine, SamplingConfig, completion_mask_from_ids, stop_token_ids
from rlt_pl.generation_vllm import VLLMGenerationEngine, vllm_available


def test_completion_mask_runs_through_first_stop():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask = completion_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_stop_strings_must_be_single_tokens(tokenizer):
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer, [])
    with pytest.raises(ValueError, match="single tokens"):
        stop_token_ids(tokenizer, ["<|end_of_explanation|>"])


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlt_pl.tiny import build_compact_assets

    dirs = build_compact_assets(tmp_path_factory.mktemp("compact"), CompactFormat().tag_tokens())
    return AutoModelForCausalLM.from_pretrained(dirs["teacher"]), AutoTokenizer.from_pretrained(dirs["teacher"])


def test_hf_engine_groups_masks_and_texts(compact):
    model, tok = compact
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, stop_strings=("</E>",))
    out = HFGenerationEngine(batch_size=3).generate(model, tok, ["<Q>1+2<S>3<E>", "<Q>10+20<S>30<E>"], 3, sampling)
    assert len(out) == 6 and out.prompt_ids.shape[0] == 6
    # left-padded prompts: the shorter prompt has leading zeros in its mask
    assert out.prompt_mask[0, 0] == 0 and out.prompt_mask[3].all()
    stop = tok.convert_tokens_to_ids("</E>")
    for row, mask, done in zip(out.completion_ids, out.completion_mask, out.finished):
        kept = row[mask.bool()].tolist()
        assert (stop in kept or tok.eos_token_id in kept) == bool(done)
        if done:  # nothing after the first stop token is trained on
            assert kept[-1] in (stop, tok.eos_token_id)
    for text, row, mask in zip(out.texts, out.completion_ids, out.completion_mask):
        assert text == tok.decode(row[mask.bool()].tolist(), skip_special_tokens=True)


def test_greedy_is_deterministic(compact):
    model, tok = compact
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    a = HFGenerationEngine().generate(model, tok, ["<Q>1+2"], 2, sampling)
    b = HFGenerationEngine().generate(model, tok, ["<Q>1+2"], 2, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.texts[0] == a.texts[1]


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


@pytest.mark.skipif(vllm_available(), reason="checks the behaviour without vLLM")
def test_vllm_engine_without_vllm_fails_clearly_or_falls_back():
    with pytest.raises(ImportError, match="rlt_pl\\[vllm\\]"):
        VLLMGenerationEngine()
    engine = VLLMGenerationEngine(fallback_to_hf=True)
    assert isinstance(engine.fallback, HFGenerationEngine)
