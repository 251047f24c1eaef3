"""GRPO as pure tensor math: group advantages, KL estimators and the clipped policy-gradient loss.

Follows the authors' fork of TRL 0.14 (SakanaAI/RLT): advantages ``(r - mean_g) / (std_g + 1e-4)`` with the unbiased
std, per-token loss ``-ratio * A + beta * k3``, per-sequence token mean then mean over sequences. Additions beyond the
paper's run (mu = 1, no clipping): an optional PPO clip for mu > 1 (with separate low/high epsilons), the k1 estimator,
and token-mean / constant-normalizer aggregations (Dr. GRPO). No Lightning import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["sequence_mean", "token_mean", "constant"]
_AGGREGATIONS: tuple[str, ...] = ("sequence_mean", "token_mean", "constant")


def group_advantages(
    rewards: Tensor, group_size: int, scale: Literal["std", "none"] = "std", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages over consecutive groups of ``group_size`` completions (SakanaAI/RLT).

    ``scale="std"``: ``(r - mean_g) / (std_g + eps)`` with the unbiased (N - 1) std; ``scale="none"``: ``r - mean_g``
    (Dr. GRPO). A group whose rewards are all equal (including ``group_size == 1``) gets exact zeros.

    Args:
        rewards: ``[N]`` finite rewards, groups stored consecutively.
        group_size: completions per prompt (G); must divide N.
        scale: ``"std"`` or ``"none"``.
        eps: added to the std (not inside a square root); must be > 0.

    Returns:
        ``[N]`` advantages in at least fp32.
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_advantages: group_size={group_size} must be >= 1 and divide N={rewards.shape[0]}")
    if scale not in ("std", "none"):
        raise ValueError(f"group_advantages: scale must be 'std' or 'none', got {scale!r}")
    if not eps > 0:
        raise ValueError(f"group_advantages: eps must be > 0, got {eps}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"group_advantages: non-finite rewards at indices {bad.tolist()[:20]} "
            f"(values {rewards[bad[:20]].tolist()}); filter them before computing advantages"
        )
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # [N/G, G]
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)  # [N/G, 1]
    centered = r - r.mean(dim=1, keepdim=True)  # [N/G, G]
    if scale == "std" and group_size > 1:
        centered = centered / (r.std(dim=1, correction=1, keepdim=True) + eps)
    return torch.where(constant, torch.zeros_like(centered), centered).view(-1)  # [N]


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0).

    Args:
        logp: policy log-probs, any shape.
        ref_logp: reference log-probs, same shape.

    Returns:
        Elementwise estimate, same shape.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k1 (plain log-ratio) estimator of KL(pi || ref) per token: ``logp - ref``.

    Args:
        logp: policy log-probs, any shape.
        ref_logp: reference log-probs, same shape.

    Returns:
        Elementwise estimate, same shape.
    """
    return logp - ref_logp


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of the GRPO policy loss; defaults are the paper's run (beta 0.04, k3, mu = 1, no clip, seq mean).

    Args:
        beta: KL coefficient; 0 disables the reference term.
        kl_estimator: ``"k3"`` (paper) or ``"k1"``.
        clip_eps_low: PPO clip epsilon below 1 (for mu > 1); None = no clipping.
        clip_eps_high: PPO clip epsilon above 1; defaults to ``clip_eps_low``; needs ``clip_eps_low``.
        aggregation: ``"sequence_mean"`` (paper), ``"token_mean"`` or ``"constant"`` (Dr. GRPO).
        constant_normalizer: divisor per sequence for ``aggregation="constant"`` (e.g. the max completion length).
    """

    beta: float = 0.04
    kl_estimator: Literal["k3", "k1"] = "k3"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    aggregation: Aggregation = "sequence_mean"
    constant_normalizer: int | None = None

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"PolicyLossConfig.beta must be >= 0, got {self.beta}")
        if self.kl_estimator not in ("k3", "k1"):
            raise ValueError(f"PolicyLossConfig.kl_estimator must be 'k3' or 'k1', got {self.kl_estimator!r}")
        if self.clip_eps_high is not None and self.clip_eps_low is None:
            raise ValueError("PolicyLossConfig.clip_eps_high needs clip_eps_low (set both, or only clip_eps_low)")
        if self.clip_eps_low is not None:
            if not 0 <= self.clip_eps_low < 1:
                raise ValueError(f"PolicyLossConfig.clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
            if self.clip_eps_high is None:
                object.__setattr__(self, "clip_eps_high", self.clip_eps_low)
            elif not self.clip_eps_high >= 0:
                raise ValueError(f"PolicyLossConfig.clip_eps_high must be >= 0, got {self.clip_eps_high}")
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(f"PolicyLossConfig.aggregation must be one of {_AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation == "constant":
            if self.constant_normalizer is None or self.constant_normalizer < 1:
                raise ValueError(
                    "PolicyLossConfig.constant_normalizer must be a positive int when aggregation='constant', "
                    f"got {self.constant_normalizer}"
                )
        elif self.constant_normalizer is not None:
            raise ValueError(
                "PolicyLossConfig.constant_normalizer is only used with aggregation='constant' "
                f"(got {self.aggregation!r})"
            )


@dataclass
class PolicyLossOutput:
    """Result of :func:`policy_loss`.

    Args:
        loss: scalar loss (differentiable w.r.t. ``logp``).
        metrics: detached scalars ``kl`` (mean over sequences of the masked token-mean KL estimate), ``clip_fraction``,
            ``ratio_mean``, ``policy_loss`` and ``kl_loss`` (the two parts of ``loss``, aggregated the same way).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _aggregate(per_token: Tensor, mask: Tensor, config: PolicyLossConfig) -> Tensor:
    """Reduce ``[B, T]`` per-token values (already zero off-mask) to a scalar; empty rows never give NaN."""
    if config.aggregation == "sequence_mean":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if config.aggregation == "token_mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    return per_token.sum() / (per_token.shape[0] * config.constant_normalizer)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
) -> PolicyLossOutput:
    """GRPO loss (SakanaAI/RLT): per token ``-min(ratio * A, clip(ratio) * A) + beta * kl``, then aggregated.

    Off-mask entries of the inputs may hold anything (padding, inf); they get neither loss nor gradient. With
    ``sequence_mean`` an empty-mask row contributes 0 and still counts in the mean over sequences (as TRL's
    ``clamp(min=1)``).

    Args:
        logp: ``[B, T]`` current policy log-probs of the completion tokens (with grad).
        old_logp: ``[B, T]`` sampling-time log-probs; None means ``logp.detach()`` (ratio 1, mu = 1).
        ref_logp: ``[B, T]`` reference log-probs; required when ``config.beta > 0``.
        advantages: ``[B]`` per-sequence advantages.
        mask: ``[B, T]`` completion mask (bool or 0/1), 1 up to and including EOS.
        config: loss options.

    Returns:
        A :class:`PolicyLossOutput`.
    """
    if logp.dim() != 2 or logp.shape[0] == 0:
        raise ValueError(f"policy_loss: logp must be [B, T] with B >= 1, got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss: advantages must be [B={logp.shape[0]}], got {tuple(advantages.shape)}")
    if config.beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: ref_logp is required when beta > 0")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("policy_loss: mask must be bool or hold only 0/1")
        mask = mask != 0
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("policy_loss: advantages contain inf/NaN")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Sanitise first so off-mask inf/NaN cannot reach exp() and poison gradients through torch.where.
    lp = torch.where(mask, logp.to(dtype), zero)  # [B, T]
    old = lp.detach() if old_logp is None else torch.where(mask, old_logp.to(dtype), zero)  # [B, T]
    adv = advantages.to(dtype).unsqueeze(1)  # [B, 1]
    fmask = mask.to(dtype)  # [B, T]
    count = fmask.sum(dim=1).clamp(min=1)  # [B]

    ratio = torch.exp(lp - old)  # [B, T]
    unclipped = ratio * adv
    if config.clip_eps_low is not None:
        low, high = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
        pg = -torch.min(unclipped, ratio.clamp(low, high) * adv)  # [B, T]
        clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))  # [B, T]
    else:
        pg = -unclipped
        clipped = torch.zeros_like(mask)
    pg = pg * fmask

    if ref_logp is not None:
        ref = torch.where(mask, ref_logp.to(dtype), zero)  # [B, T]
        kl = (kl_k3(lp, ref) if config.kl_estimator == "k3" else kl_k1(lp, ref)) * fmask  # [B, T]
    else:
        kl = torch.zeros_like(pg)

    policy_part = _aggregate(pg, fmask, config)
    kl_part = config.beta * _aggregate(kl, fmask, config) if config.beta > 0 else zero
    loss = policy_part + kl_part

    n_tokens = fmask.sum().clamp(min=1)
    metrics = {
        "kl": (kl.detach().sum(dim=1) / count).mean(),
        "clip_fraction": (clipped & mask).sum().to(dtype) / n_tokens,
        "ratio_mean": (ratio.detach() * fmask).sum() / n_tokens,
        "policy_loss": policy_part.detach(),
        "kl_loss": kl_part.detach(),
    }
    return PolicyLossOutput(loss=loss, metrics=metrics)


ENTROPY_CHUNK_ELEMENTS = 2**24  # fp32 values per entropy chunk: 64 MiB, ~0.1 row of a 152k vocabulary per MiB


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_elements: int = ENTROPY_CHUNK_ELEMENTS) -> Tensor:
    """Entropy of softmax(logits / T) at every position, for logging: `[B, L, V]` → `[B, L]` fp32, no grad.

    Computed row by row on chunks of `chunk_elements` fp32 values, so no fp32 copy of the full logits exists (a full
    `log_softmax(logits.float())` holds ~3 of them: log-probs, probs, product).

    Args:
        logits: `[B, L, V]` logits, any float dtype; a slice (e.g. `logits[:, :-1]`) is not copied.
        temperature: divide the logits by this first; must be > 0.
        chunk_elements: fp32 values per chunk (at least one row of V).
    """
    if logits.dim() != 3:
        raise ValueError(f"token_entropy: expected logits [B, L, V], got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_entropy: temperature must be > 0, got {temperature}")
    bsz, length, vocab = logits.shape
    out = torch.empty(bsz, length, dtype=torch.float32, device=logits.device)  # [B, L]
    step = max(1, chunk_elements // max(vocab, 1))  # positions per chunk
    rows = max(1, step // max(length, 1))  # whole batch rows per chunk when a row fits (few kernel launches)
    for b in range(0, bsz, rows):
        for start in range(0, length, step):
            z = logits[b : b + rows, start : start + step].float() / temperature  # [r, n, V] fp32
            logp = torch.log_softmax(z, dim=-1)
            out[b : b + rows, start : start + step] = -(logp.exp() * logp).sum(-1)
    return out
