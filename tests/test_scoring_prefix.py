"""Shared-prefix KV reuse in `causal_logprobs`: the same log-probs (1e-5) as the plain forward on uneven, right-padded
rows; used only for the reward's scoring forwards (no grad), never for the GRPO policy/reference forwards."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import rlt_pl.scoring as scoring
from benchmarks import b1_reward, short_format
from rlt_pl.generation import GenerationOutput
from rlt_pl.modules.grpo import PROMPT_TAIL_TOKENS, GRPOModule
from rlt_pl.rewards import RewardConfig
from rlt_pl.scoring import RLTScorer, causal_logprobs


class Spy(torch.nn.Module):
    """Records (use_cache, grad enabled, batch size) of every forward; `drop_cache` returns no KV cache."""

    def __init__(self, model: torch.nn.Module, drop_cache: bool = False) -> None:
        super().__init__()
        self.model = model
        self.drop_cache = drop_cache
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, **kwargs):
        self.calls.append((bool(kwargs.get("use_cache")), torch.is_grad_enabled(), kwargs["input_ids"].shape[0]))
        out = self.model(**kwargs)
        return CausalLMOutputWithPast(logits=out.logits) if self.drop_cache else out

    @property
    def cached(self) -> int:
        return sum(c for c, _, _ in self.calls)


def _rows(prefix_len: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows sharing their first `prefix_len` ids, with real lengths `lengths`."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 500, (prefix_len,), generator=g)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.cat([prefix, torch.randint(3, 500, (n - prefix_len,), generator=g)])
        attn[i, :n] = 1
    return ids, attn


@pytest.mark.parametrize("last_n", [None, 30, 24, 23, 10])
@pytest.mark.parametrize("budget", [None, 90])
def test_shared_prefix_matches_the_plain_forward(teacher_model, last_n, budget):
    ids, attn = _rows(20, [44, 31, 40, 21, 44])  # width 44: last_n 24 puts the first scored token right after 20
    plain = causal_logprobs(teacher_model, ids, attn, 0.7, budget, last_n)
    spy = Spy(teacher_model)
    shared = causal_logprobs(spy, ids, attn, 0.7, budget, last_n, share_prefix=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    # the prefix ran once (batch 1, with a cache) unless the scored columns start inside it (None, 30)
    expect_shared = last_n is not None and last_n <= 24
    assert (spy.cached > 0) == expect_shared
    assert all(b == 1 for c, _, b in spy.calls if c)


def test_no_sharing_for_left_padding_short_prefixes_or_no_cache(teacher_model):
    ids, attn = _rows(20, [40, 33, 38])
    spy = Spy(teacher_model)
    flipped, left = torch.flip(ids, [1]), torch.flip(attn, [1])
    causal_logprobs(spy, flipped, left, 0.7, last_n=10, share_prefix=True)
    short_ids, short_attn = _rows(scoring.SHARED_PREFIX_MIN - 1, [40, 33, 38])
    causal_logprobs(spy, short_ids, short_attn, 0.7, last_n=10, share_prefix=True)
    assert spy.cached == 0
    # a model that returns no cache: the plain forward runs, same numbers
    dropper = Spy(teacher_model, drop_cache=True)
    got = causal_logprobs(dropper, ids, attn, 0.7, last_n=10, share_prefix=True)
    assert dropper.cached == 1 and len(dropper.calls) == 2
    torch.testing.assert_close(got, causal_logprobs(teacher_model, ids, attn, 0.7, last_n=10), atol=1e-5, rtol=0)


def _uneven_batch(tokenizer, fmt):
    """Two groups (questions) of three completions with 5-60-token explanations."""
    rng = random.Random(3)
    q, s, p, c, groups = [], [], [], [], []
    for gi, lengths in enumerate(([5, 60, 23], [40, 12, 31])):
        b = b1_reward.make_batch(tokenizer, fmt, group=1, n_tokens=4, seed=gi)
        for n in lengths:
            q += b["questions"]
            s += b["solutions"]
            p += b["prompts"]
            c.append(b1_reward.make_completion(tokenizer, n, rng, fmt.explanation_end))
            groups.append(gi)
    return q, s, p, c, torch.tensor(groups)


def test_scorer_rewards_equal_with_and_without_prefix_reuse(tokenizer, teacher_model, student_model, monkeypatch):
    fmt, config = short_format(), RewardConfig()
    q, s, p, c, groups = _uneven_batch(tokenizer, fmt)
    student, teacher = Spy(student_model), Spy(teacher_model)
    fast = RLTScorer(student, tokenizer, fmt, config).score(q, s, c, None, teacher, p, groups)
    assert student.cached > 0 and teacher.cached > 0  # both the student and the text-path teacher reused a prefix
    assert all(not grad for c_, grad, _ in student.calls + teacher.calls if c_)
    monkeypatch.setattr(scoring, "SHARED_PREFIX_MIN", 10**9)  # the plain path
    plain = RLTScorer(student_model, tokenizer, fmt, config).score(q, s, c, None, teacher_model, p, groups)
    torch.testing.assert_close(fast.output.reward, plain.output.reward, atol=1e-5, rtol=0)
    for got, want in zip(
        (fast.tokens.solution.logprobs, fast.tokens.teacher_logprobs, fast.tokens.student_logprobs),
        (plain.tokens.solution.logprobs, plain.tokens.teacher_logprobs, plain.tokens.student_logprobs),
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    rows = zip(p, q, s, c)
    per = [b1_reward.per_sample_reward(teacher_model, student_model, tokenizer, fmt, *r, config) for r in rows]
    torch.testing.assert_close(fast.output.reward.float(), torch.tensor(per), atol=1e-5, rtol=0)


def test_scorer_reuses_the_prefix_of_a_checkpointed_training_teacher(tokenizer, teacher_model, student_model):
    """The text-path teacher may be the policy, in train mode under gradient checkpointing: scoring runs without
    grad, so the cache is kept and the rewards equal those of the eval-mode teacher."""
    fmt, config = short_format(), RewardConfig()
    q, s, p, c, groups = _uneven_batch(tokenizer, fmt)
    scorer = RLTScorer(student_model, tokenizer, fmt, config)
    ref = scorer.score(q, s, c, None, teacher_model, p, groups).output.reward
    teacher_model.gradient_checkpointing_enable()
    teacher_model.train()
    spy = Spy(teacher_model)
    got = scorer.score(q, s, c, None, spy, p, groups).output.reward
    assert spy.cached > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_grpo_policy_and_reference_forwards_run_the_group_prompt_once(teacher_model):
    """The no-grad policy and reference forwards share a group's prompt (one cached prefix forward per chunk, then
    the suffixes) and equal the plain forward."""
    # one group: an 80-token prompt (longer than the scored prompt tail), completions of uneven length
    prompt_len = 80
    ids, attn = _rows(prompt_len, [110, 95, 104, 110])
    gen = GenerationOutput(
        prompt_ids=ids[:, :prompt_len],
        prompt_mask=attn[:, :prompt_len],
        completion_ids=ids[:, prompt_len:],
        completion_mask=attn[:, prompt_len:],
        texts=[""] * 4,
        finished=torch.ones(4, dtype=torch.bool),
        prompts=[""] * 4,
    )
    spy = Spy(teacher_model)
    module = SimpleNamespace(
        model=spy,
        ref_model=spy,
        device=torch.device("cpu"),
        token_budget=None,
        loss_temperature=1.0,
        loss_config=SimpleNamespace(beta=0.04),
        reference="model",
    )
    policy = GRPOModule.policy_logprobs(module, gen, 1.0)
    ref = GRPOModule.reference_logprobs(module, ids, attn, last_n=ids.shape[1] - prompt_len)
    assert len(spy.calls) == 4 and spy.cached == 2  # per forward: the prefix (cached) + the suffixes
    want = causal_logprobs(teacher_model, ids, attn, 1.0, last_n=30 + PROMPT_TAIL_TOKENS)
    torch.testing.assert_close(policy, want, atol=1e-5, rtol=0)
    want_ref = causal_logprobs(teacher_model, ids, attn, 1.0, last_n=ids.shape[1] - prompt_len)
    torch.testing.assert_close(ref, want_ref, atol=1e-5, rtol=0)
