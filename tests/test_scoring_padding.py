"""Batches whose rows are one run of real tokens (right, left or both-side padding) run without attention mask or
position ids, shifted to column 0: same log-probs (1e-5) as each row alone; a mask with holes still gets the mask.

Either argument makes transformers build and apply a [B, 1, L, L] mask (position ids that stop increasing in the
padding read as packed sequences), ~2.5x the attention cost on CPU (benchmarks B1).
"""

from __future__ import annotations

import pytest
import torch

from rlt_pl.scoring import causal_logprobs, completion_logprobs, contiguous_lead


class Spy(torch.nn.Module):
    """Records whether each forward got an attention mask or position ids."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.masks: list[bool] = []

    def forward(self, **kwargs):
        self.masks.append(kwargs.get("attention_mask") is not None or kwargs.get("position_ids") is not None)
        return self.model(**kwargs)


def test_contiguous_lead():
    assert contiguous_lead(torch.tensor([[1, 1, 1], [1, 1, 0]])).tolist() == [0, 0]  # right padding
    assert contiguous_lead(torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 0]])).tolist() == [0, 1, 1]  # left / both
    assert contiguous_lead(torch.tensor([[1, 0, 1]])) is None  # a hole


def _rows_alone(model, ids, attn, temperature):
    out = []
    for i in range(ids.shape[0]):
        real = attn[i].bool()
        out.append(causal_logprobs(model, ids[i : i + 1, real], attn[i : i + 1, real], temperature)[0])
    return out


@pytest.mark.parametrize("last_n", [None, 7])
@pytest.mark.parametrize("layout", ["right", "left", "both"])
def test_one_run_per_row_drops_mask_and_positions_and_matches(teacher_model, layout: str, last_n) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (4, 14))
    attn = torch.zeros_like(ids)
    spans = {"right": [(0, 14), (0, 9), (0, 5), (0, 12)], "left": [(0, 14), (5, 14), (9, 14), (2, 14)]}
    spans["both"] = [(0, 11), (3, 14), (4, 9), (1, 13)]
    for i, (a, b) in enumerate(spans[layout]):
        attn[i, a:b] = 1
    ids[attn == 0] = 0
    spy = Spy(teacher_model)
    got = causal_logprobs(spy, ids, attn, temperature=0.7, last_n=last_n)
    assert spy.masks == [False]
    for i, ref in enumerate(_rows_alone(teacher_model, ids, attn, 0.7)):
        real = attn[i].bool()
        scored = torch.zeros_like(real)
        scored[-(last_n or ids.shape[1]) :] = True
        want = torch.zeros(ids.shape[1])
        want[real] = ref
        torch.testing.assert_close(got[i], want * scored, atol=1e-5, rtol=0)


def test_a_mask_with_holes_keeps_the_mask(teacher_model) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 10))
    attn = torch.ones_like(ids)
    attn[0, 4] = 0
    spy = Spy(teacher_model)
    causal_logprobs(spy, ids, attn, temperature=0.7)
    assert spy.masks == [True]


def _policy_batch(prompt_lens, comp_lens, width_p, width_c):
    """[left-padded prompt ‖ right-padded completion] rows, as GRPO's generation buffer holds them."""
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (len(prompt_lens), width_p + width_c))
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_lens, comp_lens)):
        attn[i, width_p - p : width_p + c] = 1
    ids[attn == 0] = 0
    return ids, attn


@pytest.mark.parametrize(("prompt_lens", "shifted"), [((6, 6, 5), True), ((6, 2, 4), False)])
def test_policy_forward_shifts_rows_when_cheap_and_matches_the_masked_forward(teacher_model, prompt_lens, shifted):
    """GRPO's loss forward: log-probs, entropies and gradients of the shifted (mask-free) layout equal the masked
    forward's; a prompt-length spread over comp_len / 8 keeps the mask (the LM head would cover the spread)."""
    ids, attn = _policy_batch(prompt_lens, (12, 16, 9), 6, 16)
    comp_mask = attn[:, 6:].bool()
    results, masks = [], []
    for force_masked in (False, True):
        teacher_model.zero_grad()
        spy = Spy(teacher_model)
        if force_masked:
            lp, h = _masked_reference(teacher_model, ids, attn, 6)
        else:
            lp, h = completion_logprobs(spy, ids, attn, 6, 0.7, entropy=True)
            masks.append(spy.masks)
        (lp * comp_mask).sum().backward()
        grads = [p.grad.clone() for p in teacher_model.parameters() if p.grad is not None]
        results.append((lp, h, grads))
    assert masks[0] == [not shifted]
    (lp1, h1, g1), (lp2, h2, g2) = results
    torch.testing.assert_close(lp1 * comp_mask, lp2 * comp_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1 * comp_mask, h2 * comp_mask, atol=1e-5, rtol=0)
    assert g1 and len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _masked_reference(model, ids, attn, prompt_cols):
    from rlt_pl.grpo import token_entropy
    from rlt_pl.rewards import token_logprobs

    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    lp = token_logprobs(logits, ids, 0.7)[:, prompt_cols:]
    return lp, token_entropy(logits[:, prompt_cols - 1 : -1], 0.7)
