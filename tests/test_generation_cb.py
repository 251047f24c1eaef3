"""ContinuousBatchingEngine: the HF engine's greedy output token for token, the same sampling settings honoured,
seeded reproducibility, stops and length limits, refusal of what it cannot honour, selection from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlt_pl.cli import cli_main
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import HFGenerationEngine, SamplingConfig
from rlt_pl.generation_cb import ContinuousBatchingEngine, paged_cache_size
from rlt_pl.tiny import build_compact_assets, build_tiny_assets

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 1 + 2?", "the sum of 12 and 7 is a number that we all know well", "hi"]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny random model with large weights: greedy completions differ per prompt and never repeat one token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_assets(tmp_path_factory.mktemp("cb"))["teacher"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 8.0 / p.shape[1] ** 0.5)
    return model, AutoTokenizer.from_pretrained(path)


def _single_token_stop(tok, row: list[int]) -> str:
    """A token of `row` (after its 3rd position) whose text encodes back to that one token."""
    for t in row[3:]:
        text = tok.decode([t])
        if tok(text, add_special_tokens=False)["input_ids"] == [t] and t not in row[:3]:
            return text
    raise AssertionError("no single-token stop string in the greedy completion")


def test_greedy_equals_hf_engine_token_for_token(sharp):
    model, tok = sharp
    free = HFGenerationEngine().generate(model, tok, PROMPTS, 1, SamplingConfig(max_new_tokens=20, temperature=0))
    stop = _single_token_stop(tok, free.completion_ids[0].tolist())  # row 0 stops early, others may run to 20
    sampling = SamplingConfig(max_new_tokens=20, temperature=0.0, stop_strings=(stop,))
    hf = HFGenerationEngine().generate(model, tok, PROMPTS, 2, sampling)
    cb = ContinuousBatchingEngine(page_size=8).generate(model, tok, PROMPTS, 2, sampling)
    lengths = hf.completion_mask.sum(-1)
    assert bool(hf.finished[0]) and int(lengths.min()) < int(lengths.max()), "want completions of different lengths"
    assert torch.equal(cb.completion_ids, hf.completion_ids)
    assert torch.equal(cb.completion_mask, hf.completion_mask) and torch.equal(cb.finished, hf.finished)
    assert torch.equal(cb.prompt_ids, hf.prompt_ids) and torch.equal(cb.prompt_mask, hf.prompt_mask)
    assert cb.texts == hf.texts and cb.prompts == hf.prompts


def test_sampling_is_seeded_and_respects_max_new_tokens(sharp):
    model, tok = sharp
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out = ContinuousBatchingEngine().generate(model, tok, PROMPTS, 2, sampling)
        runs.append((out, torch.rand(3)))  # the caller's stream continues as after any one-draw call
    (a, ra), (b, rb), (c, _) = runs
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(ra, rb)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1]), "the n samples of one prompt must differ"
    torch.manual_seed(0)
    ContinuousBatchingEngine()._call_seed()
    assert torch.equal(ra, torch.rand(3)), "generation moved the global RNG by more than the seed draw"
    lengths = a.completion_mask.sum(-1)
    assert int(lengths.max()) <= 12 and a.completion_ids.shape[1] <= 12
    assert (lengths[~a.finished] == 12).all(), "an unfinished completion must run to max_new_tokens"
    # the engine's own seed: the same completions whatever the global RNG holds
    torch.manual_seed(5)
    x = ContinuousBatchingEngine(seed=3).generate(model, tok, PROMPTS, 1, sampling)
    torch.manual_seed(6)
    y = ContinuousBatchingEngine(seed=3).generate(model, tok, PROMPTS, 1, sampling)
    assert torch.equal(x.completion_ids, y.completion_ids)


def test_stops_at_checkpoint_eos(sharp):
    model, tok = sharp
    eos = tok.eos_token_id
    bonus = torch.zeros(len(tok))
    bonus[eos] = 1e4
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + bonus)
    try:
        out = ContinuousBatchingEngine().generate(model, tok, PROMPTS[:1], 2, SamplingConfig(max_new_tokens=8))
    finally:
        hook.remove()
    assert bool(out.finished.all()) and out.completion_mask.sum(-1).tolist() == [1, 1]
    assert out.completion_ids[:, 0].tolist() == [eos, eos] and out.texts == ["", ""]


# Fixed logits: token A has probability 0.6, token B 0.4, everything else (EOS included) ~0.
# Temperature 0.25 sharpens A to 0.6^4 / (0.6^4 + 0.4^4) = 0.835; top-k 1, top-p 0.5 and min-p 0.7 keep A alone.
@pytest.mark.parametrize(
    "settings, share_a",
    [
        ({"temperature": 1.0}, 0.6),
        ({"temperature": 0.25}, 0.835),
        ({"temperature": 1.0, "top_k": 1}, 1.0),
        ({"temperature": 1.0, "top_p": 0.5}, 1.0),
        ({"temperature": 1.0, "min_p": 0.7}, 1.0),
    ],
)
@pytest.mark.parametrize("engine", [HFGenerationEngine, ContinuousBatchingEngine])
def test_sampling_settings_shape_the_distribution(sharp, engine, settings, share_a):
    model, tok = sharp
    a, b = 40, 41
    fixed = torch.full((len(tok),), -1e4)
    fixed[a], fixed[b] = torch.tensor(0.6).log(), torch.tensor(0.4).log()
    hook = model.lm_head.register_forward_hook(lambda module, args, out: fixed.expand_as(out).clone())
    torch.manual_seed(0)
    try:
        out = engine().generate(model, tok, ["x"] * 32, 1, SamplingConfig(max_new_tokens=8, **settings))
    finally:
        hook.remove()
    ids = out.completion_ids
    assert ids.shape == (32, 8) and bool(torch.isin(ids, torch.tensor([a, b])).all())
    share = float((ids == a).float().mean())
    assert abs(share - share_a) < (1e-9 if share_a == 1.0 else 0.09), share


def test_refuses_repetition_penalty_at_construction(tmp_path, monkeypatch):
    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.sft import SFTModule
    from rlt_pl.modules.teacher_rl import TeacherRLModule

    engine = ContinuousBatchingEngine()
    engine.check_sampling(SamplingConfig())
    with pytest.raises(ValueError, match="sampling.repetition_penalty"):
        engine.check_sampling(SamplingConfig(repetition_penalty=1.05))
    model = ModelConfig(name_or_path="nowhere/model")
    with pytest.raises(ValueError, match="sampling.repetition_penalty"):
        TeacherRLModule(model=model, engine=engine, sampling=SamplingConfig(repetition_penalty=1.1))
    with pytest.raises(ValueError, match="sampling.repetition_penalty"):
        SFTModule(model=model, engine=engine, eval_sampling=SamplingConfig(repetition_penalty=1.1))
    with pytest.raises(ValueError, match="sampling.repetition_penalty"):
        ContinuousBatchingEngine().generate(None, None, ["x"], 1, SamplingConfig(repetition_penalty=1.1))
    with pytest.raises(ValueError, match="page_size"):
        ContinuousBatchingEngine(page_size=2)
    build_compact_assets(tmp_path / "runs" / "tiny", CompactFormat().tag_tokens(), seed=0)
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    cb = "rlt_pl.generation_cb.ContinuousBatchingEngine"
    base = ["-c", "configs/teacher/rlt_tiny.yaml", f"--model.init_args.engine={cb}"]
    cli = cli_main([*base, "--model.init_args.engine.init_args.page_size=16"], run=False)
    assert isinstance(cli.model.engine, ContinuousBatchingEngine) and cli.model.engine.page_size == 16
    with pytest.raises(ValueError, match="sampling.repetition_penalty"):
        cli_main([*base, "--model.init_args.sampling.repetition_penalty=1.1"], run=False)


def test_paged_cache_holds_every_request_whole():
    blocks, tokens = paged_cache_size([5, 40, 3], max_new_tokens=30, page_size=16, max_batch_tokens=2048)
    assert blocks == 3 + 5 + 3 + 1 and tokens == 48
    blocks, tokens = paged_cache_size([5, 40, 3], 30, 16, max_batch_tokens=2, max_cache_tokens=64)
    assert blocks == 4 and tokens == 3  # at least one token per request (a decode step)


def test_lora_policy_generates_with_its_adapter(sharp):
    """A peft-wrapped policy (the LoRA configs): greedy equals the HF engine's, and the adapter is in the forward."""
    from peft import LoraConfig, get_peft_model

    model, tok = sharp
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
        hf = HFGenerationEngine().generate(policy, tok, PROMPTS, 1, sampling)
        cb = ContinuousBatchingEngine().generate(policy, tok, PROMPTS, 1, sampling)
        with policy.disable_adapter():
            base = ContinuousBatchingEngine().generate(policy, tok, PROMPTS, 1, sampling)
    finally:
        policy.unload()  # the module-scoped model goes back without LoRA layers
    assert torch.equal(cb.completion_ids, hf.completion_ids)
    assert not torch.equal(cb.completion_ids, base.completion_ids)


def test_refuses_a_sharded_model(sharp, monkeypatch):
    model, tok = sharp
    monkeypatch.setattr("rlt_pl.generation_cb.is_sharded", lambda m: True)
    with pytest.raises(ValueError, match="sharded"):
        ContinuousBatchingEngine().generate(model, tok, PROMPTS, 1, SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize("engine", ["hf", "hf_chunked", "cb"])
def test_sampler_logprobs_equal_the_policy_forward(sharp, engine):
    """With plain tempered sampling, the log-probs each engine records while sampling equal a full forward's
    log-probs of the sampled ids at that temperature (1e-5), 0 after the completion mask; with a truncating filter
    (top-p) nothing is recorded, since the sampled distribution is no longer softmax(logits / T)."""
    from rlt_pl.scoring import causal_logprobs

    model, tok = sharp
    make = {
        "hf": HFGenerationEngine,
        "hf_chunked": lambda: HFGenerationEngine(batch_size=4),
        "cb": lambda: ContinuousBatchingEngine(page_size=8),
    }[engine]
    torch.manual_seed(0)
    free = make().generate(model, tok, PROMPTS, 2, SamplingConfig(max_new_tokens=16, temperature=0.7))
    stop = _single_token_stop(tok, free.completion_ids[0].tolist())  # the same draws then stop row 0 early
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.7, stop_strings=(stop,))
    out = make().generate(model, tok, PROMPTS, 2, sampling)
    lengths = out.completion_mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max()), "want completions of different lengths"
    assert out.logprobs is not None and out.logprobs_temperature == 0.7
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attn = torch.cat([out.prompt_mask, out.completion_mask], 1)
    want = causal_logprobs(model, ids, attn, 0.7)[:, out.prompt_ids.shape[1] :]
    torch.testing.assert_close(out.logprobs, want, atol=1e-5, rtol=0)
    assert bool((out.logprobs[out.completion_mask == 0] == 0).all())
    assert float(out.logprobs[out.completion_mask.bool()].max()) < 0
    filtered = make().generate(model, tok, PROMPTS, 1, SamplingConfig(max_new_tokens=4, temperature=0.7, top_p=0.9))
    assert filtered.logprobs is None and filtered.logprobs_temperature is None
