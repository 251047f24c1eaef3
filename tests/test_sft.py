"""Supervised stages: teacher SFT and student distillation losses fall, and only completion tokens carry loss.

Mask tests use the tiny Qwen-template tokenizer with `StratosFormat` (SakanaAI/RLT: loss after
`<|begin_of_explanation|>` + "\\n\\n"; SakanaAI/RLT: loss after `<|im_start|>assistant\\n`).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat, StratosFormat
from rlt_pl.models import ModelConfig
from rlt_pl.modules.sft import StudentDistillModule, TeacherSFTModule
from rlt_pl.tiny import build_compact_assets

ROW = {
    "id": "r0",
    "question": "What is 2 + 3?",
    "solution": "\n\nThe answer is \\boxed{5}.\n\n",
    "thought": "\n\nWe add 2 and 3 to get 5.\n\n",
    "answer": "5",
    "metadata": {},
}


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    """Tiny compact-format teacher/student (character vocabulary, one token per tag)."""
    return build_compact_assets(tmp_path_factory.mktemp("compact"), CompactFormat().tag_tokens(), seed=0)


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))  # the token mean of the batch


def _fit(module, data, steps: int) -> list[float]:
    rec = _LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[rec],
    )
    trainer.fit(module, datamodule=data)
    return rec.losses


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _split_by_mask(module, row: dict) -> tuple[str, str, torch.Tensor]:
    batch = module.encode([row])
    ids, mask = batch.input_ids[0], batch.masks["completion"][0]
    ids = ids[batch.attention_mask[0].bool()]
    mask = mask[batch.attention_mask[0].bool()]
    tok = module.tokenizer
    return tok.decode(ids[mask == 0]), tok.decode(ids[mask == 1]), mask


def test_teacher_sft_loss_falls(compact_dirs):
    module = TeacherSFTModule(
        ModelConfig(name_or_path=str(compact_dirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        lr=3e-3,
        max_length=64,
    )
    data = AdditionDataModule(num_train=256, num_heldout=8, batch_size=8)
    losses = _fit(module, data, 30)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.5, losses


def test_student_distill_loss_falls(compact_dirs):
    module = StudentDistillModule(
        ModelConfig(name_or_path=str(compact_dirs["student"]), dtype="float32"),
        format=CompactFormat(),
        lr=3e-3,
        max_length=64,
    )
    data = AdditionDataModule(num_train=256, num_heldout=8, batch_size=8)
    losses = _fit(module, data, 30)
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.5, losses


def _stratos(cls, tiny_dirs, tokenizer):
    module = cls(ModelConfig(name_or_path=str(tiny_dirs["teacher"]), dtype="float32"), format=StratosFormat())
    module.tokenizer = tokenizer
    return module


def test_teacher_sft_mask_starts_after_explanation_tag(tiny_dirs, tokenizer):
    module = _stratos(TeacherSFTModule, tiny_dirs, tokenizer)
    context, trained, mask = _split_by_mask(module, ROW)
    assert context.endswith("<|begin_of_explanation|>\n\n")
    assert ROW["solution"] in context  # the solution is context only (SakanaAI/RLT)
    assert trained == "We add 2 and 3 to get 5.\n\n<|end_of_explanation|><|im_end|>\n"
    # one contiguous run of ones at the end
    first = int(mask.nonzero()[0])
    assert bool(mask[first:].all()) and not bool(mask[:first].any())


def test_student_mask_starts_after_assistant_header(tiny_dirs, tokenizer):
    module = _stratos(StudentDistillModule, tiny_dirs, tokenizer)
    context, trained, mask = _split_by_mask(module, ROW)
    assert context.endswith("<|im_start|>assistant\n")
    assert context.endswith(ROW["question"] + "<|im_end|>\n<|im_start|>assistant\n")
    expected = "<|begin_of_thought|>" + ROW["thought"] + "<|end_of_thought|>\n\n<|begin_of_solution|>" + ROW["solution"]
    assert trained == expected + "<|end_of_solution|><|im_end|>\n"
    first = int(mask.nonzero()[0])
    assert bool(mask[first:].all()) and not bool(mask[:first].any())


def test_loss_ignores_prompt_tokens(tiny_dirs, tokenizer, teacher_model):
    """Changing only the question changes the context but the loss is still a mean over completion tokens only."""
    module = _stratos(StudentDistillModule, tiny_dirs, tokenizer)
    module.model = teacher_model
    loss, stats = module.loss_on([ROW])
    _, trained, mask = _split_by_mask(module, ROW)
    assert stats["completion_tokens"] == mask.sum()
    # hand-computed: token-mean NLL over mask==1 positions
    batch = module.encode([ROW])
    with torch.no_grad():
        logits = teacher_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, batch.input_ids[0, 1:, None])[:, 0]
    m = batch.masks["completion"][0, 1:].float()
    assert torch.allclose(loss.detach(), -(lp * m).sum() / m.sum(), atol=1e-5)


def test_truncation_is_counted(tiny_dirs, tokenizer, teacher_model):
    module = StudentDistillModule(
        ModelConfig(name_or_path=str(tiny_dirs["teacher"]), dtype="float32"), format=StratosFormat(), max_length=16
    )
    module.tokenizer, module.model = tokenizer, teacher_model
    loss, stats = module.loss_on([ROW])
    assert float(stats["truncated_rows"]) == 1.0
    assert float(stats["completion_tokens"]) == 0.0  # the system prompt alone exceeds 16 tokens
    assert float(loss.detach()) == 0.0  # no completion token left: nothing to learn, not a NaN from 0 / 0


def test_teacher_sft_refuses_rows_without_thought(tiny_dirs, tokenizer):
    module = _stratos(TeacherSFTModule, tiny_dirs, tokenizer)
    with pytest.raises(ValueError, match="reference explanation"):
        module.encode([dict(ROW, thought=None)])


def test_bad_eval_k_fails_at_construction(tiny_dirs):
    with pytest.raises(ValueError, match="eval_k"):
        StudentDistillModule(ModelConfig(name_or_path=str(tiny_dirs["teacher"])), eval_k=(4,), eval_num_samples=2)


def test_distill_gradient_is_the_token_mean_over_the_accumulation_window(compact_dirs):
    """A 10-token and a 1,000-token trace in one accumulation window (batch 1, accumulate 2): the gradient equals
    that of the token mean over both traces (HF `num_items_in_batch`), not the mean of the two per-trace means."""
    from torch.utils.data import DataLoader

    rows = [
        dict(ROW, id="short", question="1+2", thought="", solution="3"),
        dict(ROW, id="long", question="1+2", thought="1 plus 2 is 3; " * 66, solution="3"),
    ]
    grads: dict[str, torch.Tensor] = {}

    class Recording(StudentDistillModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            grads.update({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})

    config = ModelConfig(str(compact_dirs["student"]), dtype="float32")
    module = Recording(config, format=CompactFormat(), max_length=2048, lr=1e-3, log_reward_every_n_steps=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    loader = DataLoader(rows, batch_size=1, shuffle=False, collate_fn=list)
    reference = StudentDistillModule(config, format=CompactFormat(), max_length=2048)
    reference.setup("fit")
    reference.configure_model()
    trainer.fit(module, loader)

    reference.model.train()
    token_sum, tokens = 0.0, 0.0
    for row in rows:
        loss, stats = reference.loss_on([row])
        token_sum = token_sum + loss * stats["completion_tokens"]
        tokens += float(stats["completion_tokens"])
    assert min(float(reference.loss_on([r])[1]["completion_tokens"]) for r in rows) <= 12
    assert tokens >= 1000
    (token_sum / tokens).backward()
    assert grads
    for name, p in reference.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)
