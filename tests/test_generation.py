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


@pytest.fixture(scope="module")
def qwen_and_plain(tmp_path_factory):
    """The same tiny weights with Qwen2.5-Instruct's generation_config.json and without that file."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlt_pl.tiny import build_tiny_assets

    root = tmp_path_factory.mktemp("qwen_gen")
    qwen = build_tiny_assets(root / "qwen", qwen_generation_config=True)["teacher"]
    plain = root / "plain"
    shutil.copytree(qwen, plain)
    (plain / "generation_config.json").unlink()

    def load(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():  # sharper logits, so a repetition penalty or top-k/top-p changes what is sampled
            model.get_input_embeddings().weight.mul_(3.0)
        return model

    return load(qwen), load(plain), AutoTokenizer.from_pretrained(qwen)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_checkpoint_generation_config_never_changes_sampling(qwen_and_plain, temperature):
    qwen, plain, tok = qwen_and_plain
    assert qwen.generation_config.repetition_penalty == 1.05 and qwen.generation_config.top_k == 20
    prompts = ["What is 1 + 2?", "the sum of 12 and 7"]
    # the file's only say is its EOS ids: give the plain model the same stops, then the outputs must be identical
    sampling = SamplingConfig(max_new_tokens=32, temperature=temperature, stop_strings=("<|endoftext|>",))
    torch.manual_seed(0)
    a = HFGenerationEngine().generate(qwen, tok, prompts, 2, sampling)
    torch.manual_seed(0)
    b = HFGenerationEngine().generate(plain, tok, prompts, 2, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert qwen.generation_config.repetition_penalty == 1.05  # restored after generate


def test_generation_config_is_complete_and_stops_at_every_eos(qwen_and_plain):
    from rlt_pl.generation import build_generation_config

    qwen, plain, tok = qwen_and_plain
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    paper = build_generation_config(SamplingConfig(), tok, qwen)
    assert paper.do_sample and paper.temperature == 0.7 and paper.top_p == 1.0 and paper.top_k == 0
    assert paper.repetition_penalty == 1.0 and paper.min_p is None and paper.num_beams == 1
    assert set(paper.eos_token_id) == {tok.eos_token_id, endoftext}  # <|im_end|> and <|endoftext|>
    assert endoftext not in build_generation_config(SamplingConfig(), tok, plain).eos_token_id
    wired = build_generation_config(SamplingConfig(top_k=5, min_p=0.1, repetition_penalty=1.2), tok, plain)
    assert (wired.top_k, wired.min_p, wired.repetition_penalty) == (5, 0.1, 1.2)
    greedy = build_generation_config(SamplingConfig(temperature=0.0), tok, qwen)
    assert not greedy.do_sample and greedy.repetition_penalty == 1.0


def test_engine_stops_at_checkpoint_eos(qwen_and_plain):
    qwen, _, tok = qwen_and_plain
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    bonus = torch.zeros(len(tok))
    bonus[endoftext] = 1e4  # <|endoftext|> (an EOS of the checkpoint only, not the tokenizer's) always sampled
    hook = qwen.lm_head.register_forward_hook(lambda module, args, out: out + bonus)
    try:
        out = HFGenerationEngine().generate(qwen, tok, ["What is 1 + 2?"], 2, SamplingConfig(max_new_tokens=8))
    finally:
        hook.remove()
    assert bool(out.finished.all()) and out.completion_mask.sum(-1).tolist() == [1, 1]
    assert out.completion_ids[:, 0].tolist() == [endoftext, endoftext]
