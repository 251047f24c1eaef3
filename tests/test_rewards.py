"""Golden tests for rlt_pl.rewards: a float64 per-row reference of SakanaAI/RLT, hand-computed values, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlt_pl.rewards import (
    RewardConfig,
    masked_reduce,
    pack_masked,
    penalise_below_group,
    rlt_reward,
    token_logprobs,
)

# ----------------------------------------------------------------------------------------------------------------------
# Reference implementation: python floats (float64), one row at a time, written from the spec, not from rewards.py.


def ref_reduce(vals: list[float], how: str) -> float:
    if not vals:
        return math.nan
    if how == "mean":
        return sum(vals) / len(vals)
    if how == "sum":
        return sum(vals)
    return min(vals) if how == "min" else max(vals)


def ref_transform(x: float, fn: str | None, lo: float | None, hi: float | None) -> float:
    if fn == "exp":
        x = math.exp(x)
    elif fn == "exp_norm":
        x = 1.0 - math.exp(-x)
    if lo is not None:
        x = max(x, lo)
    if hi is not None:
        x = min(x, hi)
    return x


def ref_score(vals: list[float], reds, coeffs, fill: float) -> tuple[float, dict[str, float]]:
    total, parts = 0.0, {}
    for how, c in zip(reds, coeffs):
        v = ref_reduce(vals, how)
        v = fill if math.isnan(v) else v
        parts[how] = v
        total += c * v
    return total, parts


def ref_row(sol: list[float], tea: list[float], stu: list[float], matched: bool, cfg: RewardConfig) -> dict:
    pen = cfg.not_matched_penalty
    lo = -cfg.clip_log_prob if cfg.clip_log_prob is not None else None
    sol_t = [ref_transform(x, cfg.normalize_log_prob_fn, lo, None) for x in sol]
    rss, rss_parts = ref_score(sol_t, cfg.answer_log_prob_reductions, cfg.answer_log_prob_coeffs, pen)
    rkl = rkl_ne = 0.0
    rkl_parts, ne_parts = {}, {}
    if any(c > 0 for c in cfg.kl_penalty_coeffs):
        d = [t - s for t, s in zip(tea, stu)]
        if cfg.use_schulman_kl_estimation:
            d = [x - 1.0 + math.exp(-x) for x in d]
        d = [ref_transform(x, cfg.normalize_kl_fn, None, cfg.clip_kl) for x in d]
        rkl, rkl_parts = ref_score(d, cfg.kl_reductions, cfg.kl_penalty_coeffs, -pen)
        nll = [ref_transform(-s, cfg.normalize_kl_fn, None, cfg.clip_kl) for s in stu]
        rkl_ne, ne_parts = ref_score(nll, cfg.kl_reductions, cfg.kl_penalty_coeffs, pen)
    m = 0.0 if matched else pen
    out = {
        "rss": rss,
        "match": m,
        "reward_with_entropy": rss - rkl + m,
        "reward_no_entropy": rss - rkl_ne + m,
        "rkl_weighted": rkl,
        "rkl_no_entropy_weighted": rkl_ne,
    }
    out["reward"] = out["reward_with_entropy"] if cfg.include_teacher_think_entropy else out["reward_no_entropy"]
    out["rkl"] = rkl if cfg.include_teacher_think_entropy else rkl_ne
    out.update({f"rss/{k}": v for k, v in rss_parts.items()})
    out.update({f"rkl/{k}": v for k, v in rkl_parts.items()})
    out.update({f"rkl_no_entropy/{k}": v for k, v in ne_parts.items()})
    return out


def random_batch(seed: int, rows: int = 40) -> dict:
    """Packed batch with varied lengths, NaN padding, empty explanations/solutions and unmatched rows."""
    g = torch.Generator().manual_seed(seed)
    ks, ke = 12, 15
    sol_len = torch.randint(1, ks + 1, (rows,), generator=g)
    exp_len = torch.randint(1, ke + 1, (rows,), generator=g)
    exp_len[::7] = 0  # empty explanation -> NaN fill path
    sol_len[rows // 2] = 0  # an empty solution span (spec P8)
    matched = torch.rand(rows, generator=g) > 0.3
    matched[::7] = False
    sol_mask = torch.arange(ks)[None] < sol_len[:, None]
    exp_mask = torch.arange(ke)[None] < exp_len[:, None]
    pad = float("nan")  # padding must never leak into a reduction
    sol = torch.where(sol_mask, -6 * torch.rand(rows, ks, generator=g) - 0.01, pad)
    tea = torch.where(exp_mask, -4 * torch.rand(rows, ke, generator=g), pad)
    stu = torch.where(exp_mask, -5 * torch.rand(rows, ke, generator=g), pad)
    return dict(sol=sol, sol_mask=sol_mask, tea=tea, stu=stu, exp_mask=exp_mask, matched=matched)


def check_against_reference(batch: dict, cfg: RewardConfig) -> None:
    out = rlt_reward(
        batch["sol"], batch["sol_mask"], batch["tea"], batch["stu"], batch["exp_mask"], batch["matched"], cfg
    )
    got = {"reward": out.reward, "rss": out.rss, "rkl": out.rkl, "match": out.match, **out.components}
    for i in range(batch["sol"].shape[0]):
        sm, em = batch["sol_mask"][i], batch["exp_mask"][i]
        ref = ref_row(
            batch["sol"][i][sm].double().tolist(),
            batch["tea"][i][em].double().tolist(),
            batch["stu"][i][em].double().tolist(),
            bool(batch["matched"][i]),
            cfg,
        )
        for key, want in ref.items():
            have = float(got[key][i])
            assert have == pytest.approx(want, rel=1e-5, abs=1e-5), (key, i, have, want)
    assert torch.isfinite(out.reward).all()
    assert torch.equal(out.components["solution_tokens"], batch["sol_mask"].sum(1))
    assert torch.equal(out.components["explanation_tokens"], batch["exp_mask"].sum(1))
    assert int(out.components["nonfinite_tokens"].sum()) == 0


CONFIGS = {
    "default": RewardConfig(),
    "schulman": RewardConfig(use_schulman_kl_estimation=True),
    "exp": RewardConfig(normalize_log_prob_fn="exp", normalize_kl_fn="exp"),
    "exp_norm": RewardConfig(normalize_log_prob_fn="exp_norm", normalize_kl_fn="exp_norm"),
    "clip_active": RewardConfig(clip_log_prob=2.0, clip_kl=0.5),
    "no_clip": RewardConfig(clip_log_prob=None, clip_kl=None),
    "no_entropy": RewardConfig(include_teacher_think_entropy=False),
    "rkl_disabled_empty": RewardConfig(kl_penalty_coeffs=(), kl_reductions=()),
    "rkl_disabled_scalar": RewardConfig(kl_penalty_coeffs=0.0, kl_reductions="mean"),
    "scalar_coeffs": RewardConfig(
        answer_log_prob_coeffs=2.0, answer_log_prob_reductions="min", kl_penalty_coeffs=0.5, kl_reductions="mean"
    ),
    "all_reductions": RewardConfig(
        answer_log_prob_coeffs=(1.0, 0.5, 0.2, 0.1),
        answer_log_prob_reductions=("mean", "min", "max", "sum"),
        kl_penalty_coeffs=(1.0, 0.3, 0.2, 0.05),
        kl_reductions=("sum", "max", "min", "mean"),
        not_matched_penalty=-2.5,
    ),
    "schulman_exp_norm_clip_no_entropy": RewardConfig(
        use_schulman_kl_estimation=True,
        normalize_kl_fn="exp_norm",
        clip_kl=0.3,
        clip_log_prob=3.0,
        include_teacher_think_entropy=False,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reward_matches_float64_reference(name: str) -> None:
    check_against_reference(random_batch(seed=len(name)), CONFIGS[name])


def test_config_coercion_and_disabled_rkl() -> None:
    cfg = CONFIGS["scalar_coeffs"]
    assert cfg.answer_log_prob_coeffs == (2.0,) and cfg.answer_log_prob_reductions == ("min",)
    assert cfg.kl_penalty_coeffs == (0.5,) and cfg.kl_reductions == ("mean",)
    batch = random_batch(seed=3)
    out = rlt_reward(
        batch["sol"],
        batch["sol_mask"],
        None,
        batch["stu"],
        batch["exp_mask"],
        batch["matched"],
        CONFIGS["rkl_disabled_empty"],
    )
    assert torch.equal(out.rkl, torch.zeros_like(out.rkl))
    assert torch.allclose(out.reward, out.rss + out.match)


def test_hand_computed_two_rows() -> None:
    nan = float("nan")
    sol = torch.tensor([[-0.5, -1.0, -1.5], [-2.0, -1.0, nan]])
    sol_mask = torch.tensor([[True, True, True], [True, True, False]])
    tea = torch.tensor([[-0.2, -0.4, -0.6], [nan, nan, nan]])
    stu = torch.tensor([[-0.5, -1.0, -0.9], [nan, nan, nan]])
    exp_mask = torch.tensor([[True, True, True], [False, False, False]])
    matched = torch.tensor([True, False])
    out = rlt_reward(sol, sol_mask, tea, stu, exp_mask, matched, RewardConfig())
    # row 0: rss = 1 * mean(-0.5, -1, -1.5) + 0.01 * (-1.5) = -1.015
    #        d = (0.3, 0.6, 0.3) -> rkl = 3 * 0.4 + 0.03 * 0.6 = 1.218
    # row 1: rss = 1 * (-1.5) + 0.01 * (-2) = -1.52
    #        empty explanation -> both KL reductions filled with +1 -> rkl = 3.03; unmatched -> m = -1
    torch.testing.assert_close(out.rss, torch.tensor([-1.015, -1.52]))
    torch.testing.assert_close(out.rkl, torch.tensor([1.218, 3.03]))
    torch.testing.assert_close(out.match, torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(out.reward, torch.tensor([-2.233, -5.55]))
    # no-entropy: row 0 -l^S = (0.5, 1.0, 0.9) -> 3 * 0.8 + 0.03 * 1.0 = 2.43; row 1 filled with -1 (spec P9) -> -3.03
    torch.testing.assert_close(out.components["reward_no_entropy"], torch.tensor([-3.445, 0.51]))
    torch.testing.assert_close(out.components["rkl_nan_filled"], torch.tensor([0, 2]))
    ne = rlt_reward(sol, sol_mask, tea, stu, exp_mask, matched, RewardConfig(include_teacher_think_entropy=False))
    torch.testing.assert_close(ne.reward, torch.tensor([-3.445, 0.51]))
    torch.testing.assert_close(ne.rkl, torch.tensor([2.43, -3.03]))


def test_nonfinite_tokens_are_clamped_filled_and_counted() -> None:
    sol = torch.tensor([[-float("inf"), -1.0], [-1.0, -1.0]])
    tea = torch.tensor([[-1.0, -1.0], [float("nan"), -1.0]])
    stu = torch.tensor([[-1.0, -1.0], [-1.0, -float("inf")]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = rlt_reward(sol, mask, tea, stu, mask, torch.tensor([True, True]), RewardConfig())
    # row 0: -inf clamps to -1e5: rss = (-1e5 - 1) / 2 + 0.01 * -1e5; d = 0 -> rkl = 0
    assert float(out.rss[0]) == pytest.approx((-1e5 - 1) / 2 - 1e3, rel=1e-6)
    assert float(out.rkl[0]) == 0.0
    # row 1: NaN teacher token -> both KL reductions NaN -> filled with +1 -> rkl = 3.03
    assert float(out.rkl[1]) == pytest.approx(3.03)
    assert out.components["nonfinite_tokens"].tolist() == [1, 2]
    assert torch.isfinite(out.reward).all()


def test_reward_input_validation() -> None:
    b = random_batch(seed=1, rows=4)
    args = [b["sol"], b["sol_mask"], b["tea"], b["stu"], b["exp_mask"], b["matched"], RewardConfig()]
    with pytest.raises(TypeError, match="bool"):
        rlt_reward(b["sol"], b["sol_mask"].float(), *args[2:])
    with pytest.raises(ValueError, match="teacher_explanation_logprobs"):
        rlt_reward(*args[:2], b["tea"][:, :3], *args[3:])
    with pytest.raises(ValueError, match="required"):
        rlt_reward(*args[:2], None, *args[3:])
    with pytest.raises(ValueError, match="matched"):
        rlt_reward(*args[:5], b["matched"][:2], args[6])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(answer_log_prob_coeffs=(1.0,)), "answer_log_prob_coeffs"),
        (dict(kl_reductions=("mean", "median")), "kl_reductions"),
        (dict(kl_reductions=("mean", "mean")), "kl_reductions"),
        (dict(answer_log_prob_coeffs=0.0, answer_log_prob_reductions="mean"), "answer_log_prob_coeffs"),
        (dict(student_temperature=0.0), "student_temperature"),
        (dict(teacher_temperature=-1.0), "teacher_temperature"),
        (dict(clip_kl=0.0), "clip_kl"),
        (dict(normalize_kl_fn="log"), "normalize_kl_fn"),
        (dict(not_matched_penalty=float("nan")), "not_matched_penalty"),
        (dict(penalty_margin=-1.0), "penalty_margin"),
        (dict(penalty_floor=float("inf")), "penalty_floor"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RewardConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# masked_reduce, pack_masked, token_logprobs


@pytest.mark.parametrize("how", ["mean", "min", "max", "sum"])
def test_masked_reduce_empty_row_is_nan_not_a_sentinel(how: str) -> None:
    x = torch.tensor([[1.0, -2.0, float("inf")], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_reduce(x, mask, how)
    assert math.isnan(float(out[1]))
    assert float(out[0]) == {"mean": -0.5, "min": -2.0, "max": 1.0, "sum": -1.0}[how]
    assert torch.isnan(masked_reduce(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), how)).all()


def test_masked_reduce_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="how"):
        masked_reduce(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "median")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        masked_reduce(torch.zeros(1, 2), torch.ones(1, 2), "mean")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5).flatmap(lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), max_size=6)))
def test_pack_masked_matches_python_loop(rows: list[list[bool]]) -> None:
    width = len(rows[0]) if rows else 0
    mask = torch.tensor(rows, dtype=torch.bool).reshape(len(rows), width)
    x = torch.arange(mask.numel(), dtype=torch.float32).reshape(mask.shape) + 1.0
    packed, packed_mask = pack_masked(x, mask)
    kept = [[float(v) for v, m in zip(xr, mr) if m] for xr, mr in zip(x.tolist(), rows)]
    k = max([1] + [len(r) for r in kept])
    assert packed.shape == packed_mask.shape == (len(rows), k)
    for i, r in enumerate(kept):
        assert packed[i, : len(r)].tolist() == r
        assert packed_mask[i].tolist() == [j < len(r) for j in range(k)]
        assert packed[i, len(r) :].eq(0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
def test_token_logprobs_matches_float64_gather(temperature: float, chunk_rows: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    out = token_logprobs(logits, ids, temperature=temperature, chunk_rows=chunk_rows)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], torch.zeros(3))
    for b in range(3):
        for j in range(1, 7):
            want = torch.log_softmax(logits[b, j - 1].double() / temperature, dim=-1)[ids[b, j]]
            assert float(out[b, j]) == pytest.approx(float(want), abs=1e-5)


def test_token_logprobs_bf16_grad_and_errors() -> None:
    logits = torch.randn(2, 4, 9, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 9, (2, 4))
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0  # the last position scores nothing
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(logits, torch.full((2, 4), 9))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[:, :3], ids)


def test_penalise_below_group_golden_values() -> None:
    # group 0: a fixed-fill penalty (-4.04) that is the best reward of its group; group 1: only penalised rows
    reward = torch.tensor([-4.04, -5.52, -6.80, 1.0, float("nan"), 3.0, 2.0])
    pen = torch.tensor([True, False, False, True, True, False, True])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = penalise_below_group(reward, pen, groups, margin=1.0)
    expected = torch.tensor([-7.80, -5.52, -6.80, 1.0, float("nan"), 3.0, 2.0])
    torch.testing.assert_close(out, expected, equal_nan=True)
    floored = penalise_below_group(reward, pen, groups, margin=0.5, floor=-10.0)
    torch.testing.assert_close(floored, torch.tensor([-10.0, -5.52, -6.80, -10.0, -10.0, 3.0, -10.0]))
    assert penalise_below_group(reward, torch.zeros(7, dtype=torch.bool), groups, 1.0) is reward
    with pytest.raises(ValueError, match="margin"):
        penalise_below_group(reward, pen, groups, margin=-1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-50, 50), st.booleans(), st.integers(0, 3)), min_size=1, max_size=12),
    st.floats(0, 5),
)
def test_penalised_rows_rank_below_every_regular_row_of_their_group(rows, margin) -> None:
    reward = torch.tensor([r for r, _, _ in rows], dtype=torch.float64)
    pen = torch.tensor([p for _, p, _ in rows])
    groups = torch.tensor([g for _, _, g in rows])
    out = penalise_below_group(reward, pen, groups, margin)
    assert torch.equal(out[~pen], reward[~pen])
    for g in groups.unique():
        in_g = groups == g
        if bool((in_g & pen).any()) and bool((in_g & ~pen).any()):
            assert float(out[in_g & pen].max()) <= float(out[in_g & ~pen].min()) - margin + 1e-9
