"""Right-padded batches run without an attention mask: same log-probs (1e-5) as the masked forward, and left or
inner padding still gets the mask."""

from __future__ import annotations

import torch

from rlt_pl.scoring import causal_logprobs, only_right_padding


class Spy(torch.nn.Module):
    """Records whether each forward got an attention mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.masks: list[bool] = []

    def forward(self, **kwargs):
        self.masks.append(kwargs.get("attention_mask") is not None)
        return self.model(**kwargs)


def test_only_right_padding():
    assert only_right_padding(torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert not only_right_padding(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not only_right_padding(torch.tensor([[1, 0, 1]]))  # a hole


def test_right_padded_forward_drops_the_mask_and_matches(teacher_model):
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    attn[2, 5:] = 0
    ids[attn == 0] = 0
    spy = Spy(teacher_model)
    got = causal_logprobs(spy, ids, attn, temperature=0.7)
    assert spy.masks == [False]
    per_row = [
        causal_logprobs(teacher_model, ids[i : i + 1, : int(attn[i].sum())], attn[i : i + 1, : int(attn[i].sum())], 0.7)
        for i in range(3)
    ]
    for i, ref in enumerate(per_row):
        torch.testing.assert_close(got[i, : ref.shape[1]], ref[0], atol=1e-5, rtol=0)
        assert bool((got[i, ref.shape[1] :] == 0).all())
    left = torch.flip(attn, [1])
    spy.masks.clear()
    causal_logprobs(spy, torch.flip(ids, [1]), left, temperature=0.7)
    assert spy.masks == [True]
