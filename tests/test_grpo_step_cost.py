"""What a GRPO step computes beyond its loss: the logged-only entropy is measured on logging steps alone and then
equals a full-logit computation; skipping it changes neither loss nor gradient; no forward without a next step builds
a KV cache; generation runs without no-op logits processors, under inference mode."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from transformers.models.qwen2 import modeling_qwen2

import rlt_pl.scoring as scoring_module
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import HFGenerationEngine, SamplingConfig
from rlt_pl.grpo import PolicyLossConfig, group_advantages
from rlt_pl.models import ModelConfig
from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult
from rlt_pl.scoring import causal_logprobs
from rlt_pl.tiny import build_compact_assets

G, T = 4, 0.7


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("compact_cost"), CompactFormat().tag_tokens(), seed=0)


class DigitsReward(Reward):
    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        return RewardResult(torch.tensor([float(sum(c.isdigit() for c in t)) for t in gen.texts]))


def _module(dirs: dict) -> GRPOModule:
    return GRPOModule(
        ModelConfig(str(dirs["teacher"]), dtype="float32"),
        reward=DigitsReward(),
        format=CompactFormat(),
        num_generations=G,
        micro_batch_size=2 * G,
        lr=1e-3,
        loss=PolicyLossConfig(beta=0.1),
        sampling=SamplingConfig(max_new_tokens=10, temperature=T),
        sample_table_every_n_steps=0,
    )


class EntropyCalls:
    """Counts `token_entropy` calls of GRPO's loss forward (`rlt_pl.scoring.completion_logprobs`, monkeypatched in)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = scoring_module.token_entropy

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(scoring_module, "token_entropy", counted)


def test_entropy_only_on_logging_steps(compact_dirs, monkeypatch):
    """log_every_n_steps=2 over 4 steps: the entropy is computed and the step metrics logged on steps 1 and 3 (the
    ones the loggers write), never on 0 and 2; the progress-bar reward is fresh every step."""
    L.seed_everything(0)
    calls = EntropyCalls(monkeypatch)
    seen: list[tuple[int, bool, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.before = calls.calls

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            m = trainer.callback_metrics
            logged = "train/entropy" in m and "train/grad_norm" in m and "train/reward" in m
            seen.append((calls.calls - self.before, logged, float(m["reward"])))

    L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Record()],
    ).fit(_module(compact_dirs), AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    assert [c for c, _, _ in seen] == [0, 1, 0, 1], seen
    assert [has for _, has, _ in seen] == [False, True, True, True]  # first logged on step 1 (then kept)
    assert len({r for _, _, r in seen}) > 1  # the progress-bar reward is logged from step 0 on, fresh each step


def _buffer(dirs: dict):
    L.seed_everything(0)
    module = _module(dirs)
    module.setup("fit")
    module.configure_model()
    rows = [{"question": "12+7", "answer": "19"}, {"question": "3+40", "answer": "43"}]
    buf = module.rollout(rows, G)
    adv = group_advantages(buf["result"].rewards.float(), G) + torch.linspace(-0.5, 0.5, 2 * G)  # non-zero
    return module, buf, adv


def test_logged_entropy_equals_full_logits_and_skipping_it_changes_no_gradient(compact_dirs, monkeypatch):
    module, buf, adv = _buffer(compact_dirs)
    gen, prompt_len = buf["gen"], buf["gen"].prompt_ids.shape[1]
    idx = list(range(len(adv)))
    calls = EntropyCalls(monkeypatch)

    def step(entropy: bool):
        module.model.zero_grad()
        out = module._micro_step(buf, idx, adv, prompt_len, entropy)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}

    with_h, grads_h = step(True)
    assert calls.calls == 1
    without, grads = step(False)
    assert calls.calls == 1 and "entropy" not in without.metrics
    assert torch.equal(with_h.loss, without.loss)
    assert grads.keys() == grads_h.keys() and all(torch.equal(grads[k], grads_h[k]) for k in grads)
    # the full-logit entropy over every completion token: an untrimmed, unchunked forward of [prompt ‖ completion]
    ids, attn = buf["ids"], buf["attn"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = module.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, prompt_len - 1 : -1]
    logp = torch.log_softmax(logits.double() / T, -1)
    h = -(logp.exp() * logp).sum(-1)  # [N, C]
    mask = gen.completion_mask.double()
    expected = float((h * mask).sum() / mask.sum())
    assert abs(float(with_h.metrics["entropy"]) - expected) < 1e-6, (float(with_h.metrics["entropy"]), expected)


class CacheCount:
    """Counts `DynamicCache`s created by the tiny Qwen2 model's forward."""

    def __init__(self, monkeypatch) -> None:
        self.created = 0
        count = self

        class Counted(modeling_qwen2.DynamicCache):
            def __init__(self, *args, **kwargs) -> None:
                count.created += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(modeling_qwen2, "DynamicCache", Counted)


def test_scoring_and_loss_forwards_build_no_kv_cache(compact_dirs, monkeypatch):
    module, buf, adv = _buffer(compact_dirs)
    caches = CacheCount(monkeypatch)
    causal_logprobs(module.model, buf["ids"], buf["attn"], T, last_n=8)
    module._micro_step(buf, list(range(len(adv))), adv, buf["gen"].prompt_ids.shape[1], True)
    assert caches.created == 0
    module.model(input_ids=buf["ids"][:1])  # the counter works: a default forward builds one
    assert caches.created == 1


def test_generation_is_lean_and_unchanged(compact_dirs, monkeypatch):
    """Only the sampler's log-prob recorder and the temperature warper run per decode step, in that order (the recorder
    sees the logits before temperature; no no-op min-length processor), decode steps run under
    inference mode, prompts are tokenized once per prompt with the same ids as tokenizing every repeat, and the
    outputs still train (they are normal tensors)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(compact_dirs["teacher"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(compact_dirs["teacher"])
    model.generation_config.min_new_tokens = 6  # a checkpoint's minimum must not leak in either
    seen: dict = {"inference": []}
    real = transformers.GenerationMixin._sample

    def spy(self, input_ids, logits_processor, *args, **kwargs):
        seen["processors"] = [type(p).__name__ for p in logits_processor]
        return real(self, input_ids, logits_processor, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "_sample", spy)
    hook = model.register_forward_hook(lambda m, a, o: seen["inference"].append(torch.is_inference_mode_enabled()))
    bonus = torch.zeros(len(tok))
    bonus[tok.eos_token_id] = 1e4  # EOS always sampled: one-token completions unless a minimum leaked in
    eos = model.lm_head.register_forward_hook(lambda m, a, o: o + bonus)
    prompts = ["<Q>1+2<S>3<E>", "<Q>10+20<S>30<E>"]
    try:
        out = HFGenerationEngine().generate(model, tok, prompts, 3, SamplingConfig(max_new_tokens=8, temperature=T))
    finally:
        hook.remove()
        eos.remove()
    assert seen["processors"] == ["SampledLogprobs", "TemperatureLogitsWarper"]
    assert seen["inference"] and all(seen["inference"])
    assert out.completion_mask.sum(-1).tolist() == [1] * 6
    enc = tok([p for p in prompts for _ in range(3)], add_special_tokens=False, padding=True, padding_side="left")
    assert out.prompt_ids.tolist() == enc["input_ids"] and out.prompt_mask.tolist() == enc["attention_mask"]
    assert not out.completion_ids.is_inference() and not out.prompt_ids.is_inference()
    assert out.logprobs is not None and not out.logprobs.is_inference()


def _peak_bytes(fn) -> int:
    """Peak of the bytes allocated on CPU while `fn` runs (torch profiler allocation events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage  # + allocated, - freed by the op itself
        peak = max(peak, current)
    return peak


def test_entropy_holds_no_full_logit_fp32_copy():
    """The chunked entropy allocates a few chunks (~0.25 of the logits here), while the plain full-logit
    computation holds 3 fp32 copies at its peak (the measurement is checked on it)."""
    from rlt_pl.grpo import token_entropy

    torch.manual_seed(0)
    logits = torch.randn(4, 64, 1000)
    size = logits.numel() * 4

    def full():
        logp = torch.log_softmax(logits / T, -1)
        return -(logp.exp() * logp).sum(-1)

    assert _peak_bytes(full) >= 2.5 * size
    assert _peak_bytes(lambda: token_entropy(logits, T, chunk_elements=2**14)) < 0.3 * size


class _RowCounter(torch.nn.Module):
    """Counts the token rows × columns each forward runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.tokens = model, 0

    def forward(self, **kwargs):
        self.tokens += kwargs["input_ids"].numel()
        return self.model(**kwargs)


@pytest.mark.parametrize("engine", ["hf", "cb"])
def test_rollout_logprobs_from_the_sampler_equal_the_forward_and_skip_it(teacher_model, tokenizer, engine):
    """μ = 1 and log-probs recorded by the sampler at the loss temperature: the rollout's policy log-probs (the RLT
    reward's teacher side) equal the no-grad forward's (1e-5) and cost only the prompt tails of the distinct prompts;
    μ > 1, another temperature, a filtered sampler or `sampler_logprobs=False` take the forward."""
    from types import SimpleNamespace

    from rlt_pl.generation_cb import ContinuousBatchingEngine

    make = HFGenerationEngine if engine == "hf" else ContinuousBatchingEngine
    prompts = ["What is 1 + 2? Think about it step by step", "the sum of 12 and 7"]
    torch.manual_seed(0)
    gen = make().generate(teacher_model, tokenizer, prompts, 3, SamplingConfig(max_new_tokens=24, temperature=0.7))
    counter = _RowCounter(teacher_model)
    host = SimpleNamespace(
        model=counter,
        device=torch.device("cpu"),
        token_budget=None,
        loss_temperature=0.7,
        sampler_logprobs=True,
        num_iterations=1,
    )
    host.policy_logprobs = lambda g, t: GRPOModule.policy_logprobs(host, g, t)
    fast = GRPOModule.rollout_logprobs(host, gen)
    fast_tokens, counter.tokens = counter.tokens, 0
    slow = GRPOModule.rollout_logprobs(SimpleNamespace(**{**vars(host), "sampler_logprobs": False}), gen)
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert fast_tokens <= 2 * gen.prompt_ids.shape[1] < counter.tokens  # two distinct prompts, no completion columns
    for change in ({"num_iterations": 2}, {"loss_temperature": 1.0}):
        counter.tokens = 0
        GRPOModule.rollout_logprobs(SimpleNamespace(**{**vars(host), **change}), gen)
        assert counter.tokens > 2 * gen.prompt_ids.shape[1], change
    filtered = make().generate(teacher_model, tokenizer, prompts, 3, SamplingConfig(max_new_tokens=8, top_p=0.9))
    counter.tokens = 0
    GRPOModule.rollout_logprobs(host, filtered)
    assert counter.tokens > 2 * filtered.prompt_ids.shape[1]
