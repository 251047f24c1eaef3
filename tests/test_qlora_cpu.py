"""QLoRA on CPU (bitsandbytes >= 0.48 runs NF4 layers on CPU): loading keeps the non-quantized weights in bf16,
a TeacherRLModule step trains only the adapter while the 4-bit base (and so the adapter-off reference) stays
bit-identical, and the adapter is exported."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlt_pl.callbacks import StudentRewardCallback
from rlt_pl.datamodules.addition import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.models import LoraConfig, ModelConfig, bitsandbytes_runs_on_cpu, load_causal_lm, reference_mode
from rlt_pl.modules.teacher_rl import TeacherRLModule
from rlt_pl.tiny import build_compact_assets

pytestmark = pytest.mark.skipif(not bitsandbytes_runs_on_cpu(), reason="needs bitsandbytes >= 0.48 (NF4 on CPU)")


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("qlora"), CompactFormat().tag_tokens(), seed=0)


def _qlora(path, checkpointing: bool = False) -> ModelConfig:
    return ModelConfig(
        str(path), quantization="4bit", lora=LoraConfig(r=4, dropout=0.0), gradient_checkpointing=checkpointing
    )


def test_kbit_loading_upcasts_nothing(compact_dirs):
    """Embeddings, norms and LM head stay bf16 (peft's k-bit preparation would make them fp32); linear layers are
    packed NF4; only the adapter is trainable (fp32, peft's adapter dtype)."""
    model = load_causal_lm(_qlora(compact_dirs["teacher"], checkpointing=True))
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_proj.dtype == torch.uint8 and type(q_proj).__name__ == "Params4bit"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # checkpointed layers with frozen embeddings still pass gradients into the adapter (lora_B starts at 0, so only
    # lora_B has a gradient at step 0)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in trainable.items() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_teacher_rl_qlora_step_and_export(compact_dirs, tmp_path):
    """One RLT step on a 4-bit teacher with the adapter-off reference: the adapter moves, the 4-bit base and the
    reference log-probs are bit-identical, the reward is finite, and the adapter is exported at the end."""
    L.seed_everything(0)
    export = tmp_path / "export"
    module = TeacherRLModule(
        _qlora(compact_dirs["teacher"]),
        format=CompactFormat(),
        num_generations=2,
        micro_batch_size=4,
        lr=1e-2,
        reference="adapter",
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.7),
        sample_table_every_n_steps=0,
        export_dir=str(export),
    )
    student = StudentRewardCallback(ModelConfig(str(compact_dirs["student"]), dtype="float32"))
    module.configure_model()
    assert module.ref_model is None  # the reference is the base with the adapter off: no second copy
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 4]])
    state0 = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    with torch.no_grad(), reference_mode(module.model):
        ref0 = module.model(input_ids=ids).logits
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        log_every_n_steps=1,  # GRPO step metrics are logged on logging steps
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[student],
    )
    trainer.fit(module, AdditionDataModule(num_train=8, num_heldout=2, batch_size=2))

    state = module.model.state_dict()
    moved = [k for k in state0 if "lora_" in k and not torch.equal(state[k], state0[k])]
    assert moved, "no adapter weight changed"
    frozen = [k for k in state0 if "lora_" not in k]
    assert frozen and all(torch.equal(state[k], state0[k]) for k in frozen), "the 4-bit base changed"
    with torch.no_grad(), reference_mode(module.model):
        assert torch.equal(module.model(input_ids=ids).logits, ref0)
    assert torch.isfinite(trainer.callback_metrics["train/reward"])
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    assert (export / "tokenizer_config.json").is_file()
