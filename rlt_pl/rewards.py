"""The RLT teacher reward as pure tensor math: per-token log-probs, masked reductions, rSS, rKL and the final reward.

Implements SakanaAI/RLT (Sakana AI's ``TeacherKLBasedReward``, arXiv 2506.08388) on already-computed, packed
(left-aligned) log-prob vectors; no model calls and no Lightning import. Departures from the authors' code:

* everything is batched; reductions and log-softmax run in at least fp32 (spec P11);
* an empty mask yields NaN for every reduction, explicitly, instead of a dtype sentinel (spec P8), so it always
  takes the NaN-fill penalty path;
* non-finite per-token log-probs are counted per row (component ``nonfinite_tokens``) instead of passing unseen.

The no-entropy variant keeps the authors' NaN fill sign (``not_matched_penalty``, i.e. -1, opposite to rKL's +1,
spec P9) for parity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

Reduction = Literal["mean", "min", "max", "sum"]
NormalizeFn = Literal["exp", "exp_norm"]

_REDUCTIONS: tuple[str, ...] = get_args(Reduction)
_NORMALIZE_FNS: tuple[str, ...] = get_args(NormalizeFn)
# Largest fp32 chunk (elements) that token_logprobs materialises at once: 2**26 floats = 256 MiB.
_MAX_CHUNK_ELEMENTS = 2**26


def _at_least_fp32(x: Tensor) -> Tensor:
    """Promote a floating tensor to fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(
    logits: Tensor, input_ids: Tensor, temperature: float = 1.0, chunk_rows: int | None = None
) -> Tensor:
    """Per-token log-probs of a causal LM, aligned to the tokens they score (SakanaAI/RLT, P5, P10, P11).

    ``out[:, j] = log softmax(logits[:, j - 1] / T)[input_ids[:, j]]`` for ``j >= 1`` and ``out[:, 0] = 0``. Computed as
    ``z[tok] / T - logsumexp(z / T)`` on row chunks, so at most one fp32 chunk of ``chunk_rows x V`` exists at a time
    (no second full ``[B, L, V]`` fp32 copy). Differentiable.

    Args:
        logits: ``[B, L, V]`` logits over ``input_ids`` (any float dtype).
        input_ids: ``[B, L]`` token ids.
        temperature: divide logits by this before the log-softmax; must be > 0.
        chunk_rows: how many (batch, position) rows to process at once; ``None`` picks a size so a chunk holds at most
            2**26 fp32 values.

    Returns:
        ``[B, L]`` log-probs in fp32 (fp64 if ``logits`` is fp64).
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"token_logprobs: expected logits [B, L, V] and input_ids [B, L], got {tuple(logits.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_logprobs: input_ids must be int64/int32, got {input_ids.dtype}")
    bsz, length, vocab = logits.shape
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    out = torch.zeros(bsz, length, dtype=out_dtype, device=logits.device)  # [B, L]
    if length < 2 or bsz == 0:
        return out
    targets = input_ids[:, 1:].reshape(-1).long()  # [N], N = B * (L - 1)
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"token_logprobs: input_ids outside [0, {vocab}) (vocab size of the logits)")
    flat = logits[:, :-1].reshape(-1, vocab)  # [N, V], a view when logits are contiguous
    step = chunk_rows if chunk_rows is not None else max(1, _MAX_CHUNK_ELEMENTS // max(vocab, 1))
    if step < 1:
        raise ValueError(f"token_logprobs: chunk_rows must be >= 1, got {chunk_rows}")
    pieces = []
    for start in range(0, flat.shape[0], step):
        z = flat[start : start + step].to(out_dtype) / temperature  # [n, V] fp32
        tok = targets[start : start + step].unsqueeze(-1)  # [n, 1]
        pieces.append(z.gather(-1, tok).squeeze(-1) - torch.logsumexp(z, dim=-1))  # [n]
    scored = torch.cat(pieces).view(bsz, length - 1)  # [B, L-1]
    return torch.cat([out[:, :1], scored], dim=1)  # [B, L]


def masked_reduce(x: Tensor, mask: Tensor, how: Reduction) -> Tensor:
    """Reduce each row over its masked entries; an empty row gives NaN for every reduction (spec P8).

    Unmasked entries never leak into the result (they may hold padding, inf or NaN). A NaN among the masked entries
    propagates to the result.

    Args:
        x: ``[B, K]`` values.
        mask: ``[B, K]`` bool, True where an entry takes part.
        how: one of ``"mean"``, ``"min"``, ``"max"``, ``"sum"``.

    Returns:
        ``[B]`` reductions in at least fp32.
    """
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(
            f"masked_reduce: expected x and mask of one shape [B, K], got {tuple(x.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_reduce: mask must be bool, got {mask.dtype}")
    if how not in _REDUCTIONS:
        raise ValueError(f"masked_reduce: how must be one of {_REDUCTIONS}, got {how!r}")
    x = _at_least_fp32(x)
    count = mask.sum(dim=1)  # [B]
    nan = torch.full_like(count, float("nan"), dtype=x.dtype)
    if x.shape[1] == 0:
        return nan
    if how in ("mean", "sum"):
        total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=1)  # [B]
        out = total / count.clamp(min=1) if how == "mean" else total
    elif how == "min":
        out = torch.where(mask, x, torch.full_like(x, float("inf"))).amin(dim=1)
    else:
        out = torch.where(mask, x, torch.full_like(x, float("-inf"))).amax(dim=1)
    return torch.where(count > 0, out, nan)


def pack_masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-align the masked entries of each row, keeping their order (vectorised, no loop over rows).

    Args:
        x: ``[B, L]`` values.
        mask: ``[B, L]`` bool.

    Returns:
        ``(packed [B, K], packed_mask [B, K])`` with ``K = max(1, max row count)``; unused slots hold 0.
    """
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(
            f"pack_masked: expected x and mask of one shape [B, L], got {tuple(x.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_masked: mask must be bool, got {mask.dtype}")
    count = mask.sum(dim=1)  # [B]
    width = max(1, int(count.max().item())) if count.numel() else 1
    dest = mask.long().cumsum(dim=1) - 1  # [B, L] target column of each masked entry
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(mask)  # [B, L]
    packed = x.new_zeros(x.shape[0], width)  # [B, K]
    packed = packed.index_put((rows[mask], dest[mask]), x[mask])
    packed_mask = torch.arange(width, device=x.device).unsqueeze(0) < count.unsqueeze(1)  # [B, K]
    return packed, packed_mask


def _as_tuple(value: object, kind: type | tuple[type, ...]) -> tuple:
    """Turn a scalar or sequence config value into a tuple."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class RewardConfig:
    """Every option of the authors' ``TeacherKLBasedReward`` (SakanaAI/RLT); defaults are the paper's run file.

    Coefficients may be given as scalars with a single reduction name (as in the authors' YAML); they are stored as
    tuples. rSS is mandatory: its coefficients must be non-empty (a scalar <= 0 is rejected, as the authors raise).
    rKL is disabled when its coefficients are empty or all <= 0; then ``rkl`` and the no-entropy KL term are 0.

    Args:
        answer_log_prob_coeffs: weights of the rSS reductions.
        answer_log_prob_reductions: reductions of the (transformed) student solution log-probs.
        kl_penalty_coeffs: weights of the rKL reductions (the KL term is subtracted).
        kl_reductions: reductions of the (transformed) per-token KL estimate.
        student_temperature: temperature of the student log-probs (used by the caller); must be > 0.
        teacher_temperature: temperature of the teacher log-probs (used by the caller); must be > 0.
        not_matched_penalty: match term m for completions that never close the explanation tag, and the NaN fill.
        clip_log_prob: rSS per-token lower clamp ``max(l, -clip)``; None disables; must be > 0.
        clip_kl: rKL per-token upper clamp ``min(d, clip)``; None disables; must be > 0.
        normalize_log_prob_fn: optional rSS per-token transform before clamping: ``exp`` (e^x) or ``exp_norm``
            (1 - e^-x).
        normalize_kl_fn: optional rKL per-token transform before clamping (same choices).
        use_schulman_kl_estimation: replace d by ``d - 1 + e^-d``.
        include_teacher_think_entropy: True returns the full rKL reward; False the no-entropy variant (spec §2.8).
        penalty_margin: penalised rows (context overflow, empty solution or explanation span, unclosed explanation
            tag) get at most the worst regular reward of their group minus this margin (see
            :func:`penalise_below_group`); must be >= 0. None keeps the authors' fixed fills alone (parity only:
            a fixed fill can be the best reward of a group).
        penalty_floor: if set, penalised rows get at most this value too (and exactly it when their group has no
            regular row).
    """

    answer_log_prob_coeffs: tuple[float, ...] | float = (1.0, 0.01)
    answer_log_prob_reductions: tuple[Reduction, ...] | Reduction = ("mean", "min")
    kl_penalty_coeffs: tuple[float, ...] | float = (3.0, 0.03)
    kl_reductions: tuple[Reduction, ...] | Reduction = ("mean", "max")
    student_temperature: float = 0.7
    teacher_temperature: float = 0.7
    not_matched_penalty: float = -1.0
    clip_log_prob: float | None = 1e5
    clip_kl: float | None = 1e5
    normalize_log_prob_fn: NormalizeFn | None = None
    normalize_kl_fn: NormalizeFn | None = None
    use_schulman_kl_estimation: bool = False
    include_teacher_think_entropy: bool = True
    penalty_margin: float | None = 1.0
    penalty_floor: float | None = None

    def __post_init__(self) -> None:
        for coeffs_name, reds_name in (
            ("answer_log_prob_coeffs", "answer_log_prob_reductions"),
            ("kl_penalty_coeffs", "kl_reductions"),
        ):
            coeffs = tuple(float(c) for c in _as_tuple(getattr(self, coeffs_name), (int, float)))
            reds = _as_tuple(getattr(self, reds_name), str)
            object.__setattr__(self, coeffs_name, coeffs)
            object.__setattr__(self, reds_name, reds)
            if len(coeffs) != len(reds):
                raise ValueError(
                    f"RewardConfig.{coeffs_name} has {len(coeffs)} entries but {reds_name} has {len(reds)}"
                )
            bad = [r for r in reds if r not in _REDUCTIONS]
            if bad:
                raise ValueError(f"RewardConfig.{reds_name}: unknown reductions {bad}; choose from {_REDUCTIONS}")
            if len(set(reds)) != len(reds):
                raise ValueError(f"RewardConfig.{reds_name} repeats a reduction: {reds} (merge their coefficients)")
            if any(c != c or c in (float("inf"), float("-inf")) for c in coeffs):
                raise ValueError(f"RewardConfig.{coeffs_name} must be finite, got {coeffs}")
        if not self.answer_log_prob_coeffs or all(c <= 0 for c in self.answer_log_prob_coeffs):
            raise ValueError(
                "RewardConfig.answer_log_prob_coeffs must contain a positive coefficient (rSS is mandatory)"
            )
        for name in ("student_temperature", "teacher_temperature"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"RewardConfig.{name} must be finite and > 0, got {getattr(self, name)}")
        for name in ("clip_log_prob", "clip_kl"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"RewardConfig.{name} must be > 0 or None, got {value}")
        for name in ("normalize_log_prob_fn", "normalize_kl_fn"):
            value = getattr(self, name)
            if value is not None and value not in _NORMALIZE_FNS:
                raise ValueError(f"RewardConfig.{name} must be one of {_NORMALIZE_FNS} or None, got {value!r}")
        if not -float("inf") < self.not_matched_penalty <= 0:
            raise ValueError(
                f"RewardConfig.not_matched_penalty must be finite and <= 0, got {self.not_matched_penalty}; a "
                "positive value rewards never closing the explanation (and flips the rSS / rKL NaN fills)"
            )
        if self.penalty_margin is not None and not 0 <= self.penalty_margin < float("inf"):
            raise ValueError(f"RewardConfig.penalty_margin must be finite and >= 0 or None, got {self.penalty_margin}")
        if self.penalty_floor is not None and not abs(self.penalty_floor) < float("inf"):
            raise ValueError(f"RewardConfig.penalty_floor must be finite or None, got {self.penalty_floor}")

    @property
    def kl_enabled(self) -> bool:
        """Whether the rKL term takes part (some KL coefficient > 0)."""
        return any(c > 0 for c in self.kl_penalty_coeffs)


@dataclass
class RewardOutput:
    """Result of :func:`rlt_reward`; every tensor is ``[B]``.

    Args:
        reward: the returned reward ``rss - rkl + match``.
        rss: weighted rSS after the NaN fill.
        rkl: the weighted KL term that enters ``reward`` (positive = bad): rKL, or its no-entropy variant when
            ``include_teacher_think_entropy`` is False; 0 when rKL is disabled.
        match: m in ``{0, not_matched_penalty}``.
        components: per-row diagnostics: ``rss/<red>``, ``rkl/<red>``, ``rkl_no_entropy/<red>`` (reductions after
            the NaN fill), ``rss_nan_filled`` / ``rkl_nan_filled`` (reductions that took the fill), ``rkl_weighted``,
            ``rkl_no_entropy_weighted``, ``reward_with_entropy``, ``reward_no_entropy``, ``solution_tokens``,
            ``explanation_tokens``, ``nonfinite_tokens`` (masked non-finite input log-probs).
    """

    reward: Tensor
    rss: Tensor
    rkl: Tensor
    match: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)


def _transform(x: Tensor, fn: NormalizeFn | None, clip_min: float | None, clip_max: float | None) -> Tensor:
    """Per-token transform: optional normalisation, then clamping (order of the authors' ``_make_normalize_fn``)."""
    if fn == "exp":
        x = torch.exp(x)
    elif fn == "exp_norm":
        x = 1.0 - torch.exp(-x)
    if clip_min is not None:
        x = x.clamp(min=clip_min)
    if clip_max is not None:
        x = x.clamp(max=clip_max)
    return x


def _weighted(
    x: Tensor,
    mask: Tensor,
    reductions: Sequence[str],
    coeffs: Sequence[float],
    nan_fill: float,
    prefix: str,
    components: dict[str, Tensor],
) -> Tensor:
    """Reduce, replace NaN reductions by ``nan_fill`` (before weighting), weight and sum; log each reduction."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)  # [B]
    filled = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # [B]
    for how, coeff in zip(reductions, coeffs):
        value = masked_reduce(x, mask, how)
        is_nan = torch.isnan(value)
        value = torch.where(is_nan, torch.full_like(value, nan_fill), value)
        components[f"{prefix}/{how}"] = value
        filled += is_nan.long()
        total = total + coeff * value
    components[f"{prefix}_nan_filled"] = filled
    return total


def _check_pair(name: str, x: Tensor, mask: Tensor, batch: int) -> None:
    """Validate a ``[B, K]`` value/mask pair."""
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(f"rlt_reward: {name} must be [B, K] like its mask, got {tuple(x.shape)} / {tuple(mask.shape)}")
    if x.shape[0] != batch:
        raise ValueError(f"rlt_reward: {name} has {x.shape[0]} rows but matched has {batch}")
    if mask.dtype != torch.bool:
        raise TypeError(f"rlt_reward: the mask of {name} must be bool, got {mask.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"rlt_reward: {name} must be floating point, got {x.dtype}")


def rlt_reward(
    student_solution_logprobs: Tensor,
    solution_mask: Tensor,
    teacher_explanation_logprobs: Tensor | None,
    student_explanation_logprobs: Tensor,
    explanation_mask: Tensor,
    matched: Tensor,
    config: RewardConfig,
) -> RewardOutput:
    """RLT reward ``r = rSS - rKL + m`` (SakanaAI/RLT) for a batch of packed log-prob vectors.

    rSS: per-token ``max(norm(l^S), -clip_log_prob)``, reductions, NaN -> ``not_matched_penalty``, weighted sum.
    rKL: ``d = l^T - l^S`` (Schulman: ``d - 1 + e^-d``), ``min(norm(d), clip_kl)``, reductions,
    NaN -> ``-not_matched_penalty``, weighted sum. No-entropy variant: ``d`` replaced by ``-l^S`` (no Schulman),
    NaN -> ``not_matched_penalty`` (the authors' sign, spec P9).

    Args:
        student_solution_logprobs: ``[B, Ks]`` student log-probs of the solution tokens, left-aligned.
        solution_mask: ``[B, Ks]`` bool.
        teacher_explanation_logprobs: ``[B, Ke]`` teacher log-probs (teacher context) of the explanation tokens;
            may be None only when rKL is disabled.
        student_explanation_logprobs: ``[B, Ke]`` student log-probs (student context) of the same tokens.
        explanation_mask: ``[B, Ke]`` bool, shared by both explanation tensors.
        matched: ``[B]`` bool, True when the completion closed its explanation tag.
        config: reward options.

    Returns:
        A :class:`RewardOutput` of ``[B]`` tensors (fp32, or fp64 for fp64 inputs).
    """
    if matched.dim() != 1 or matched.dtype != torch.bool:
        raise ValueError(f"rlt_reward: matched must be a [B] bool tensor, got {tuple(matched.shape)} {matched.dtype}")
    batch = matched.shape[0]
    _check_pair("student_solution_logprobs", student_solution_logprobs, solution_mask, batch)
    _check_pair("student_explanation_logprobs", student_explanation_logprobs, explanation_mask, batch)
    if teacher_explanation_logprobs is None:
        if config.kl_enabled:
            raise ValueError("rlt_reward: teacher_explanation_logprobs is required when kl_penalty_coeffs are enabled")
    else:
        _check_pair("teacher_explanation_logprobs", teacher_explanation_logprobs, explanation_mask, batch)

    sol = _at_least_fp32(student_solution_logprobs)  # [B, Ks]
    stu = _at_least_fp32(student_explanation_logprobs)  # [B, Ke]
    penalty = config.not_matched_penalty
    components: dict[str, Tensor] = {}

    nonfinite = (~torch.isfinite(sol) & solution_mask).sum(dim=1)  # [B]
    nonfinite = nonfinite + (~torch.isfinite(stu) & explanation_mask).sum(dim=1)

    clip_lp = -config.clip_log_prob if config.clip_log_prob is not None else None
    rss = _weighted(
        _transform(sol, config.normalize_log_prob_fn, clip_lp, None),
        solution_mask,
        config.answer_log_prob_reductions,
        config.answer_log_prob_coeffs,
        penalty,
        "rss",
        components,
    )  # [B]

    zeros = torch.zeros_like(rss)
    rkl, rkl_no_entropy = zeros, zeros
    if config.kl_enabled:
        tea = _at_least_fp32(teacher_explanation_logprobs)  # [B, Ke]
        nonfinite = nonfinite + (~torch.isfinite(tea) & explanation_mask).sum(dim=1)
        d = tea - stu  # [B, Ke]
        if config.use_schulman_kl_estimation:
            d = d - 1.0 + torch.exp(-d)
        reds, coeffs = config.kl_reductions, config.kl_penalty_coeffs
        d_tilde = _transform(d, config.normalize_kl_fn, None, config.clip_kl)  # [B, Ke]
        nll_tilde = _transform(-stu, config.normalize_kl_fn, None, config.clip_kl)  # [B, Ke]
        rkl = _weighted(d_tilde, explanation_mask, reds, coeffs, -penalty, "rkl", components)
        rkl_no_entropy = _weighted(nll_tilde, explanation_mask, reds, coeffs, penalty, "rkl_no_entropy", components)
    elif teacher_explanation_logprobs is not None:
        tea = _at_least_fp32(teacher_explanation_logprobs)
        nonfinite = nonfinite + (~torch.isfinite(tea) & explanation_mask).sum(dim=1)

    match = torch.where(matched.to(rss.device), zeros, torch.full_like(rss, penalty))  # [B]
    reward_with = rss - rkl + match
    reward_without = rss - rkl_no_entropy + match
    use_entropy = config.include_teacher_think_entropy
    components.update(
        {
            "rkl_weighted": rkl,
            "rkl_no_entropy_weighted": rkl_no_entropy,
            "reward_with_entropy": reward_with,
            "reward_no_entropy": reward_without,
            "solution_tokens": solution_mask.sum(dim=1),
            "explanation_tokens": explanation_mask.sum(dim=1),
            "nonfinite_tokens": nonfinite,
        }
    )
    return RewardOutput(
        reward=reward_with if use_entropy else reward_without,
        rss=rss,
        rkl=rkl if use_entropy else rkl_no_entropy,
        match=match,
        components=components,
    )


def penalise_below_group(
    reward: Tensor, penalised: Tensor, groups: Tensor, margin: float, floor: float | None = None
) -> Tensor:
    """Put every penalised row at or below the worst regular reward of its group, by construction.

    ``out[i] = min(reward[i], min_{j regular, groups[j] = groups[i]} reward[j] - margin)`` for a penalised row ``i``
    (then ``min(., floor)`` when a floor is set; exactly ``floor`` when its group has no regular row); regular rows
    are unchanged. A fixed fill (rSS -1, rKL +1) is not a penalty: regular rewards are often far below it, and GRPO
    would then push the policy towards overflowing or empty outputs.

    Args:
        reward: ``[B]`` rewards (penalised rows may hold any finite value or NaN).
        penalised: ``[B]`` bool, True for rows whose reward is a penalty, not a measurement.
        groups: ``[B]`` int group ids (GRPO: the prompt each completion was sampled for).
        margin: how far below the worst regular reward (>= 0).
        floor: optional absolute upper bound of a penalised reward.

    Returns:
        ``[B]`` rewards (same dtype as ``reward``).
    """
    if reward.dim() != 1 or reward.shape != penalised.shape or reward.shape != groups.shape:
        raise ValueError(
            f"penalise_below_group: reward, penalised, groups must all be [B], got {tuple(reward.shape)}, "
            f"{tuple(penalised.shape)}, {tuple(groups.shape)}"
        )
    if not margin >= 0:
        raise ValueError(f"penalise_below_group: margin must be >= 0, got {margin}")
    if reward.numel() == 0 or not bool(penalised.any()):
        return reward
    _, gid = torch.unique(groups, return_inverse=True)  # [B] dense group index
    n_groups = int(gid.max()) + 1
    inf = torch.full((n_groups,), float("inf"), dtype=reward.dtype, device=reward.device)
    regular = torch.where(penalised, torch.full_like(reward, float("inf")), reward)
    worst = inf.scatter_reduce(0, gid, regular, reduce="amin")[gid]  # [B] worst regular reward of the group
    own = torch.nan_to_num(reward, nan=float("inf"))
    capped = torch.minimum(own, worst - margin)  # +inf when the group has no regular row and the row is NaN
    if floor is not None:
        capped = torch.minimum(capped, torch.full_like(capped, floor))
        capped = torch.where(torch.isinf(worst), torch.full_like(capped, floor), capped)
    else:
        capped = torch.where(torch.isinf(worst), reward, capped)
    return torch.where(penalised, capped, reward)
