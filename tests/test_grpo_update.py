"""The GRPO module's update pinned to a hand computation: the applied gradient and the logged k3 KL against the
reference equal a per-row autograd of the paper's loss; micro-batching changes nothing; `max_grad_norm` clips."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.grpo import PolicyLossConfig
from rlt_pl.models import ModelConfig
from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult
from rlt_pl.tiny import build_compact_assets

G, T, BETA = 4, 0.7, 0.5


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("compact_update"), CompactFormat().tag_tokens(), seed=0)


class DigitsReward(Reward):
    """Number of digits in the completion (varies within a group of a random tiny LM)."""

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        return RewardResult(torch.tensor([float(sum(c.isdigit() for c in t)) for t in gen.texts]))


class Recorded(GRPOModule):
    """Keeps the last generation buffer for the hand computation."""

    def rollout(self, rows, n, sampling=None):
        self.buf = super().rollout(rows, n, sampling)
        return self.buf


def _one_step(dirs: dict, micro_batch_size: int, max_grad_norm: float | None = None, perturb_reference: bool = True):
    """One GRPO step (2 prompts x G) from a fixed seed. Returns (module, policy and reference before the step, the
    gradient the optimizer applied by parameter name, the step's logged metrics)."""
    L.seed_everything(0)
    module = Recorded(
        ModelConfig(str(dirs["teacher"]), dtype="float32"),
        reward=DigitsReward(),
        format=CompactFormat(),
        num_generations=G,
        micro_batch_size=micro_batch_size,
        lr=1e-3,
        loss=PolicyLossConfig(beta=BETA),
        max_grad_norm=max_grad_norm,
        sampling=SamplingConfig(max_new_tokens=12, temperature=T),
        sample_table_every_n_steps=0,
    )
    module.configure_model()
    if perturb_reference:  # a reference away from the policy: the KL term is non-zero from the first step
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in module.ref_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy0, ref0 = copy.deepcopy(module.model), copy.deepcopy(module.ref_model)
    applied: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        applied.update({k: p.grad.detach().clone() for k, p in module.model.named_parameters() if p.grad is not None})

    handle = register_optimizer_step_pre_hook(hook)
    metrics: dict[str, float] = {}

    class Last(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    try:
        L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            log_every_n_steps=1,  # GRPO step metrics are logged on logging steps
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[Last()],
        ).fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    finally:
        handle.remove()
    return module, policy0, ref0, applied, metrics


def _row_logprobs(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """log p(completion_j | prompt, completion_<j) / T of one unpadded row, by a plain forward."""
    seq = torch.cat([prompt, completion])[None]
    logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float() / T
    return torch.log_softmax(logits, -1).gather(-1, completion[:, None]).squeeze(-1)


def _hand(module, policy, ref) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """The paper's loss row by row: advantages per group (unbiased std + 1e-4), per-token -A + beta * k3, token mean
    per sequence, mean over sequences. Returns (advantages, KL metric, gradient by name)."""
    gen, rewards = module.buf["gen"], module.buf["result"].rewards.float().view(-1, G)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    policy.zero_grad()
    losses, kls = [], []
    for i in range(len(adv)):
        prompt = gen.prompt_ids[i][gen.prompt_mask[i].bool()]
        completion = gen.completion_ids[i][gen.completion_mask[i].bool()]
        lp = _row_logprobs(policy, prompt, completion)
        with torch.no_grad():
            ref_lp = _row_logprobs(ref, prompt, completion)
        d = ref_lp - lp
        k3 = torch.exp(d) - d - 1
        losses.append((-adv[i] * torch.exp(lp - lp.detach()) + BETA * k3).mean())
        kls.append(float(k3.mean()))
    torch.stack(losses).mean().backward()
    grads = {k: p.grad.detach().clone() for k, p in policy.named_parameters() if p.grad is not None}
    return adv, sum(kls) / len(kls), grads


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    da = torch.cat([a[k].flatten() for k in sorted(a)])
    db = torch.cat([b[k].flatten() for k in sorted(b)])
    return float((da - db).norm() / db.norm())


def test_update_and_kl_equal_a_hand_computation(compact_dirs):
    """Micro-batches of 3 over 8 completions (uneven: 3 + 3 + 2), some completions padded: the logged KL is the
    hand k3 KL (reference log-probs aligned to the same tokens), the applied gradient the hand gradient."""
    module, policy0, ref0, applied, metrics = _one_step(compact_dirs, micro_batch_size=3)
    mask = module.buf["gen"].completion_mask
    assert bool((mask.sum(1) < mask.shape[1]).any()), "precondition: some completion is shorter than the longest"
    adv, kl, grads = _hand(module, policy0, ref0)
    assert float(adv.abs().sum()) > 0, "precondition: non-zero advantages"
    assert kl > 1e-3, "precondition: the reference differs from the policy"
    assert metrics["train/kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["train/kl_loss"] == pytest.approx(BETA * kl, rel=1e-4)
    assert _rel(applied, grads) < 1e-4


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_update_does_not_depend_on_the_micro_batch_size(compact_dirs, micro_batch_size):
    """The same generation batch, split into micro-batches of 1 or 2 vs one pass over all 8: equal gradients."""
    full, _, _, g_full, _ = _one_step(compact_dirs, micro_batch_size=8)
    part, _, _, g_part, _ = _one_step(compact_dirs, micro_batch_size=micro_batch_size)
    assert torch.equal(full.buf["ids"], part.buf["ids"])  # same rollout
    assert _rel(g_part, g_full) < 1e-5
    # per parameter too (weights after one Adam step are not compared: its first step is ~lr * sign(g), which
    # float-level noise flips where g is ~0)
    scale = max(float(g.abs().max()) for g in g_full.values())
    for name, g in g_full.items():
        torch.testing.assert_close(g_part[name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_max_grad_norm_clips_the_applied_gradient(compact_dirs):
    """With max_grad_norm far below the gradient's norm the optimizer sees a gradient of exactly that norm, in the
    direction of the unclipped one; the logged norm is the pre-clip norm."""
    clip = 1e-3
    _, _, _, raw, m_raw = _one_step(compact_dirs, micro_batch_size=8)
    _, _, _, clipped, m_clip = _one_step(compact_dirs, micro_batch_size=8, max_grad_norm=clip)
    norm = float(torch.cat([g.flatten() for g in clipped.values()]).norm())
    raw_norm = float(torch.cat([g.flatten() for g in raw.values()]).norm())
    assert norm == pytest.approx(clip, rel=1e-4)
    assert raw_norm > 10 * clip
    assert m_clip["train/grad_norm"] == pytest.approx(raw_norm, rel=1e-4)
    assert m_raw["train/grad_norm"] == pytest.approx(raw_norm, rel=1e-4)
    assert _rel({k: v * raw_norm / clip for k, v in clipped.items()}, raw) < 1e-4
