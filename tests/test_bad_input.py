"""Bad input, one test each: it is refused with an error naming the flag, or counted, reported and penalised --
never a crash deep inside a run, never silently dropped. Also config validation at construction and
`trust_remote_code` staying off unless configured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import rlt_pl.models as models
from rlt_pl.callbacks import StudentRewardCallback
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.datamodules.base import RowDataModule
from rlt_pl.datamodules.loading import make_row, require_str
from rlt_pl.formats import CompactFormat, StratosFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.grpo import PolicyLossConfig, group_advantages
from rlt_pl.models import LoraConfig, ModelConfig
from rlt_pl.modules.grpo import GRPOModule, Reward, RewardResult
from rlt_pl.optim import AdamW8bit
from rlt_pl.rewards import RewardConfig, rlt_reward
from rlt_pl.tasks.addition import AdditionTask
from rlt_pl.tiny import build_compact_assets

FMT = CompactFormat()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> dict:
    dirs = build_compact_assets(tmp_path_factory.mktemp("compact_bad"), FMT.tag_tokens(), seed=0)
    tok = models.load_tokenizer(str(dirs["teacher"]))
    student = models.load_causal_lm(ModelConfig(str(dirs["student"]), dtype="float32"), trainable=False)
    teacher = models.load_causal_lm(ModelConfig(str(dirs["teacher"]), dtype="float32"), trainable=False)
    return {"dirs": dirs, "tokenizer": tok, "student": student, "teacher": teacher}


def _callback(compact: dict, **kwargs) -> tuple[StudentRewardCallback, SimpleNamespace]:
    """A StudentRewardCallback bound to a stand-in module (tokenizer, format, device are all it reads)."""
    cb = StudentRewardCallback(ModelConfig(str(compact["dirs"]["student"]), dtype="float32"), **kwargs)
    cb.student = compact["student"]
    module = SimpleNamespace(tokenizer=compact["tokenizer"], format=FMT, device=torch.device("cpu"))
    return cb, module


def _score(compact: dict, completions: list[str], **kwargs):
    cb, module = _callback(compact, **kwargs)
    qs, ss = ["12+30"] * len(completions), ["42"] * len(completions)
    prompts = [FMT.teacher_prompt(q, s, compact["tokenizer"]) for q, s in zip(qs, ss)]
    result, metrics = cb.score(module, qs, ss, completions, teacher_model=compact["teacher"], prompts=prompts)
    return result, metrics


# ------------------------------------------------------------------------------------------------- data rows
class _QA(RowDataModule):
    name = "qa"

    def build_task(self) -> AdditionTask:
        return AdditionTask()

    def default_stage_splits(self) -> dict[str, str]:
        return {"train": "all"}

    def normalize(self, raw: dict, index: int) -> dict:
        rid = require_str(raw, "id")
        return make_row(rid, require_str(raw, "question"), require_str(raw, "answer"), raw.get("answer", ""))


def test_malformed_rows_are_counted_and_reported_by_id(tmp_path):
    lines = [
        json.dumps({"id": "ok-1", "question": "1+1", "answer": "2"}),
        json.dumps({"id": "no-answer", "question": "2+2"}),
        "{not json",
        json.dumps({"id": "empty-q", "question": "  ", "answer": "3"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "ok-1", "question": "dup", "answer": "1"}),
        json.dumps({"id": "ok-2", "question": "3+4", "answer": "7"}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines))
    dm = _QA(data_path=str(path))
    with pytest.warns(UserWarning, match=r"skipped 5 of 7 malformed rows: .*qa-1 \(missing field 'answer'\)"):
        dm.setup()
    assert [r["id"] for r in dm.rows] == ["ok-1", "ok-2"]
    reasons = dict(dm.invalid_rows)
    assert set(reasons) == {"qa-1", "qa-2", "qa-3", "qa-4", "ok-1"}
    assert "not valid JSON" in reasons["qa-2"] and "empty" in reasons["qa-3"] and "duplicate" in reasons["ok-1"]
    assert dm.data_stats()["data/qa/invalid_rows"] == 5.0


# ------------------------------------------------------------------------------------------------- reward inputs
def test_completion_without_tags_gets_the_match_penalty(compact):
    # the RL prompt ends with the explanation tag: a completion is `explanation</E>`
    result, metrics = _score(compact, ["12 plus 30</E>", "no closing tag at all", "<E>"])
    assert result.matched.tolist() == [True, False, False]
    assert result.counts["unmatched"] == 2
    assert result.output.match.tolist() == [0.0, -1.0, -1.0]
    out = result.output
    torch.testing.assert_close(out.components["reward_unpenalised"], out.rss - out.rkl + out.match)
    # the unmatched rows are penalised: exactly min(own reward, the matched row's reward - margin 1)
    want = torch.minimum(out.components["reward_unpenalised"][1:], out.reward[0] - 1.0)
    torch.testing.assert_close(out.reward[1:], want)
    assert metrics["match_rate"].tolist() == [1.0, 0.0, 0.0]


def test_empty_explanation_takes_the_nan_penalty_path(compact):
    result, _ = _score(compact, ["</E>", "12 plus 30 is 42</E>"])
    comps = result.output.components
    assert result.explanations[0] == ""
    assert bool(comps["rkl_nan_filled"][0]) and not bool(comps["rkl_nan_filled"][1])
    # P8: no dtype-sentinel reward from an empty mask: the rKL fill is +1 per coefficient (3 + 0.03)
    assert float(result.output.rkl[0]) == pytest.approx(3.03)
    assert float(comps["reward_unpenalised"][0]) == pytest.approx(float(result.output.rss[0]) - 3.03)
    assert float(result.output.reward[0]) <= float(result.output.reward[1]) - 1.0  # penalised below the regular row


def test_context_overflow_is_counted_and_penalised(compact):
    long = "the sum " * 40 + "</E>"
    regular = ["42</E>", "12 plus 30 is 42</E>", "add the tens then the ones</E>"]
    full, _ = _score(compact, [long, *regular])
    cut, _ = _score(compact, [long, *regular], max_length=60)
    assert cut.counts["overflow"] == 1 and full.counts["overflow"] == 0
    comps = cut.output.components
    assert bool(comps["rss_nan_filled"][0]) and bool(comps["rkl_nan_filled"][0])
    assert comps["overflow"].tolist() == [1, 0, 0, 0] and comps["penalised"].tolist() == [1, 0, 0, 0]
    # a penalty is the worst reward of its group, by construction: the worst regular reward minus the margin
    worst = float(cut.output.reward[1:].min())
    assert float(cut.output.reward[0]) == pytest.approx(worst - RewardConfig().penalty_margin, abs=1e-6)
    assert int(cut.output.reward.argmin()) == 0
    torch.testing.assert_close(cut.output.reward[1:], full.output.reward[1:], atol=1e-6, rtol=0)


def test_penalties_are_below_every_regular_reward_of_their_group(compact):
    # two groups of three; in each, an empty explanation, an unclosed tag and two regular completions
    comps = ["</E>", "12 plus 30 is 42</E>", "never closed", "42</E>", "</E>", "the tens: 40, then 2 more</E>"]
    cb, module = _callback(compact)
    qs, ss = ["12+30"] * 6, ["42"] * 6
    prompts = [FMT.teacher_prompt(q, s, compact["tokenizer"]) for q, s in zip(qs, ss)]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    result, _ = cb.score(module, qs, ss, comps, None, compact["teacher"], prompts, groups=groups)
    reward, pen = result.output.reward, result.output.components["penalised"].bool()
    assert pen.tolist() == [True, False, True, False, True, False]
    for g in (0, 1):
        in_g = groups == g
        assert float(reward[in_g & pen].max()) <= float(reward[in_g & ~pen].min()) - 1.0 + 1e-6
    floor_cb, _ = _callback(compact, reward=RewardConfig(penalty_floor=-50.0))
    floored, _ = floor_cb.score(module, qs, ss, comps, None, compact["teacher"], prompts, groups=groups)
    assert floored.output.reward[pen].tolist() == [-50.0, -50.0, -50.0]
    torch.testing.assert_close(floored.output.reward[~pen], reward[~pen])


def test_nonfinite_logprobs_are_counted_in_reward_components():
    sol = torch.tensor([[-0.5, float("nan")], [-0.1, -0.2]])
    exp_s = torch.tensor([[-1.0, float("-inf")], [-0.3, -0.4]])
    exp_t = torch.tensor([[-0.9, -0.8], [-0.2, float("inf")]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = rlt_reward(sol, mask, exp_t, exp_s, mask, torch.tensor([True, True]), RewardConfig())
    assert out.components["nonfinite_tokens"].tolist() == [2, 1]
    # row 0: a NaN solution token -> both rSS reductions NaN -> filled with -1 each: rss = -1.01;
    # both rows: d = [0.1, +inf] (teacher +inf or student -inf) -> +inf clipped to 1e5 -> rkl = 3 mean + 0.03 max
    rkl = 3.0 * (0.1 + 1e5) / 2 + 0.03 * 1e5
    assert out.rss.tolist() == pytest.approx([-1.01, -0.15 + 0.01 * -0.2])
    assert out.rkl.tolist() == pytest.approx([rkl, rkl])
    assert out.components["rss_nan_filled"].tolist() == [2, 0]


def test_zero_variance_groups_get_zero_advantages():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0])
    for scale in ("std", "none"):
        adv = group_advantages(rewards, 4, scale=scale)
        assert torch.isfinite(adv).all()
        assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert adv[4:].abs().min() > 0
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)


# ------------------------------------------------------------------------------------------------- tokenizers
def test_stratos_format_without_chat_template_fails_at_setup_naming_the_flag(compact, tmp_path):
    plain = tmp_path / "no_template"
    shutil.copytree(compact["dirs"]["teacher"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    module = GRPOModule(ModelConfig(str(plain), dtype="float32"), format=StratosFormat(), num_generations=2)
    with pytest.raises(ValueError, match="no chat template.*use_chat_template"):
        module.setup("fit")


def test_mismatched_tokenizers_are_refused_unless_allowed(compact, tmp_path):
    other = build_compact_assets(tmp_path / "other", FMT.tag_tokens()[:-1], seed=0)  # one tag fewer
    for allow in (False, True):
        cb = StudentRewardCallback(ModelConfig(str(other["student"]), dtype="float32"), allow_tokenizer_mismatch=allow)
        cb.student = compact["student"]
        module = SimpleNamespace(tokenizer=compact["tokenizer"], format=FMT, device=torch.device("cpu"))
        if allow:
            scorer = cb.scorer(module)
            assert scorer.student is compact["student"] and scorer.tokenizer is compact["tokenizer"]
        else:
            with pytest.raises(ValueError, match="(?s)tokenizers differ.*must share.*allow_tokenizer_mismatch"):
                cb.scorer(module)


# ------------------------------------------------------------------------------------------------- non-finite steps
class _FlakyReward(Reward):
    """NaN rewards on the calls listed in `nan_calls` (0-based), else 1 for a `=` in the completion."""

    def __init__(self, nan_calls: set[int]) -> None:
        self.nan_calls, self.calls = nan_calls, 0

    def __call__(self, module, rows, gen, policy_logprobs) -> RewardResult:
        call, self.calls = self.calls, self.calls + 1
        r = torch.tensor([float("=" in t) + 0.1 * len(t) for t in gen.texts])
        return RewardResult(torch.full_like(r, float("nan")) if call in self.nan_calls else r)


class _Skips(L.Callback):
    def __init__(self) -> None:
        self.skipped: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.skipped.append(float(trainer.callback_metrics.get("train/skipped_steps", 0.0)))


def _grpo_fit(compact: dict, reward: Reward, max_steps: int, max_nonfinite: int):
    L.seed_everything(0)
    module = GRPOModule(
        ModelConfig(str(compact["dirs"]["teacher"]), dtype="float32"),
        reward=reward,
        format=FMT,
        num_generations=2,
        micro_batch_size=8,
        lr=1e-3,
        loss=PolicyLossConfig(beta=0.0),
        reference="none",
        max_nonfinite_steps=max_nonfinite,
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
        sample_table_every_n_steps=0,
    )
    skips = _Skips()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[skips],
    )
    return module, trainer, skips


def test_nonfinite_reward_skips_the_step_and_is_logged(compact):
    module, trainer, skips = _grpo_fit(compact, _FlakyReward({1}), max_steps=2, max_nonfinite=3)
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    assert trainer.global_step == 2  # the skipped batch did not count as an optimizer step
    assert module.nonfinite_steps == 1
    assert skips.skipped == [0.0, 1.0, 1.0]
    assert any(not torch.equal(v, before[k]) for k, v in module.model.state_dict().items())


def test_nonfinite_budget_is_restored_on_resume(compact, tmp_path):
    """The skipped-step count is part of the checkpoint: a resumed run keeps spending the same budget."""
    module, trainer, _ = _grpo_fit(compact, _FlakyReward({1}), max_steps=2, max_nonfinite=3)
    trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    assert module.nonfinite_steps == 1
    ckpt = tmp_path / "skipped.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, trainer2, skips = _grpo_fit(compact, _FlakyReward(set()), max_steps=3, max_nonfinite=3)
    trainer2.fit(resumed, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2), ckpt_path=ckpt)
    assert trainer2.global_step == 3
    assert resumed.nonfinite_steps == 1  # restored, not reset to 0 (and no new skip)
    assert skips.skipped == [0.0]  # the one resumed step was not skipped


def test_too_many_nonfinite_steps_stop_the_run(compact):
    module, trainer, skips = _grpo_fit(compact, _FlakyReward(set(range(100))), max_steps=10, max_nonfinite=2)
    with pytest.raises(RuntimeError, match="max_nonfinite_steps=2"):
        trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    assert module.nonfinite_steps == 3 and trainer.global_step == 0
    assert skips.skipped == [1.0, 2.0]


# ------------------------------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_iterations": 2}, "num_iterations > 1 needs loss.clip_eps_low"),
        ({"reference": "adapter"}, "reference='adapter' needs model.lora"),
        ({"num_generations": 0}, "num_generations must be >= 1"),
        ({"num_generations": 1}, "num_generations=1 makes GRPO a no-op"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"sampling": SamplingConfig(temperature=0.0)}, "sampling.temperature=0"),
        ({"sampling": SamplingConfig(top_k=1)}, "top_k=1"),
        ({"token_budget": 0}, "token_budget must be >= 1"),
        ({"val_num_generations": 0}, "val_num_generations must be >= 1"),
        ({"micro_batch_tokens": 0}, "micro_batch_tokens must be >= 1"),
        ({"max_nonfinite_steps": -1}, "max_nonfinite_steps must be >= 0"),
    ],
)
def test_grpo_config_errors_name_the_flag(compact, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOModule(ModelConfig(str(compact["dirs"]["teacher"])), **kwargs)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (ModelConfig("org/model", quantization="3bit"), "model.quantization must be null, '4bit' or '8bit'"),
        (ModelConfig("./no/such/model"), "looks like a local path but .* does not exist"),
        (ModelConfig("org/model", lora=LoraConfig(r=0)), "lora.r must be > 0"),
    ],
)
def test_model_config_errors_name_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        config.validate(needs_cuda_ok=False)


def test_eight_bit_optimizer_on_cpu_is_refused_naming_the_flag():
    params = [torch.nn.Parameter(torch.zeros(4))]
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the 8-bit optimizer is allowed")
    with pytest.raises(RuntimeError, match="allow_cpu"):
        AdamW8bit(params)
    opt = AdamW8bit(params, lr=0.1, allow_cpu=True)
    params[0].grad = torch.ones(4)
    opt.step()  # bitsandbytes' CPU path really steps: the weights move against the gradient
    assert (params[0].detach() < -0.05).all(), params[0]


# ------------------------------------------------------------------------------------------------- security
def test_trust_remote_code_is_off_unless_configured(compact, monkeypatch):
    seen: list[bool] = []

    def spy(real):
        class Spy:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                seen.append(kwargs["trust_remote_code"])
                return real.from_pretrained(*args, **kwargs)

        return Spy

    monkeypatch.setattr(models, "AutoModelForCausalLM", spy(models.AutoModelForCausalLM))
    monkeypatch.setattr(models, "AutoTokenizer", spy(models.AutoTokenizer))
    path = str(compact["dirs"]["teacher"])
    models.load_causal_lm(ModelConfig(path, dtype="float32"), trainable=False)
    models.load_tokenizer(path)
    assert seen == [False, False]
    assert ModelConfig(path).trust_remote_code is False
    models.load_tokenizer(path, trust_remote_code=True)
    assert seen[-1] is True  # only an explicit setting turns it on
    assert Path(path).is_dir()
