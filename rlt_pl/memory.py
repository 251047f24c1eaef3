"""Predicted peak GPU memory of a training config, term by term (computed, not measured).

    python -m rlt_pl.memory -c configs/teacher/rlt_qwen7b_qlora_24gb.yaml [-c more.yaml] [--budget-gib 22]

A run's peak is `static + max(phase)`: weights, adapters, optimizer states and the CUDA context stay resident; the
phases of a step (generation, no-grad scoring, the backward micro-step) come and go. What each term counts:

- weights by dtype and quantisation: bf16/fp32 bytes per parameter; NF4 (bitsandbytes, double quantisation) packs
  linear layers at 4 bits plus one uint8 absmax per 64 weights and one fp32 per 256 absmax, while embeddings, LM head,
  norms and biases stay in the load dtype (bitsandbytes quantises `nn.Linear` inside the decoder only); int8 keeps
  one fp32 scale per output row.
- LoRA adapters in fp32 (peft's adapter dtype) with fp32 gradients; full fine-tuning has gradients in the parameter
  dtype. torch AdamW keeps two moments in the parameter dtype (plus a 4-byte step per tensor); 8-bit AdamW keeps two
  uint8 moments plus one fp32 absmax per 256 values (tensors under 4,096 values stay 32-bit).
- activations of one micro-batch: with checkpointing the bf16 input of every decoder layer plus one layer recomputed
  in full; without it every layer's saved tensors (SDPA attention: no [T, T] matrix; LoRA adds an fp32 copy of each
  adapted input, and a dropout output + mask when dropout > 0).
- logits: the bf16 `[rows, kept positions, V]` logits, the fp32 chunks autograd keeps for the log-softmax backward,
  the logits' gradient, and the logged-only entropy, which is computed on fp32 chunks of 2**26 values.
- KV cache of one generate call (`engine.batch_size` sequences of max_prompt_tokens + max_new_tokens) and the prefill
  of that batch, one decoder layer at a time; the sampler's fp32 logits, warped scores, probabilities and the log-prob
  recorder's tempered copy of one step.
- no-grad scoring chunks (`token_budget` tokens): one layer's activations, the kept logits, and the KV cache of the
  whole chunk, which a chunk sharing its rows' prefix (`causal_logprobs(share_prefix=True)`) holds for every layer
  while its suffixes run.
- GRPO's loss forward keeps the logits of `max_new_tokens + 1` positions per row, plus up to 1/8 more for the
  spread of prompt lengths in a mask-free micro-batch of several rows.

Not counted: allocator fragmentation (keep a few GiB of headroom), CPU-offloaded or paged optimizer states (counted
as if on the GPU), the data loader. Model shapes come from the checkpoint's `config.json` when it is on disk (a local
path or the Hugging Face cache), else from `KNOWN_SHAPES`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlt_pl.grpo import ENTROPY_CHUNK_ELEMENTS

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + cuBLAS workspace: a constant, measured values are 0.3-0.6 GiB
_CHUNK_ELEMENTS = 2**26  # fp32 values per log-softmax chunk (rlt_pl.rewards.token_logprobs)
_NF4_BLOCK, _NF4_NESTED_BLOCK = 64, 256
_ADAM8_BLOCK, _ADAM8_MIN_SIZE = 256, 4096
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Qwen2/Llama-style decoder that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    qkv_bias: bool = True

    @classmethod
    def from_hf_config(cls, cfg) -> ModelShape:
        """From a transformers `PretrainedConfig` (Qwen2, Llama, Mistral field names)."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab=cfg.vocab_size,
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            intermediate=cfg.intermediate_size,
            tied_embeddings=bool(cfg.tie_word_embeddings),
            qkv_bias=cfg.model_type == "qwen2",
        )

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, has_bias) of the linear layers of one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        b = self.qkv_bias
        return [
            ("q_proj", h, q, b),
            ("k_proj", h, kv, b),
            ("v_proj", h, kv, b),
            ("o_proj", q, h, False),
            ("gate_proj", h, i, False),
            ("up_proj", h, i, False),
            ("down_proj", i, h, False),
        ]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


# Public config.json values (Qwen/Qwen2.5-7B-Instruct; Bespoke-Stratos-7B is a fine-tune of it, same shape).
_QWEN25_7B = ModelShape(152064, 3584, 28, 28, 4, 128, 18944, tied_embeddings=False)
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "bespokelabs/Bespoke-Stratos-7B": _QWEN25_7B,
}


def shape_for(name_or_path: str) -> ModelShape:
    """The shape of a checkpoint: its config.json if on disk (offline), else `KNOWN_SHAPES`."""
    from transformers import AutoConfig

    try:
        return ModelShape.from_hf_config(AutoConfig.from_pretrained(name_or_path, local_files_only=True))
    except (OSError, ValueError):
        if name_or_path in KNOWN_SHAPES:
            return KNOWN_SHAPES[name_or_path]
        raise ValueError(
            f"no config.json for {name_or_path!r} on disk and not in rlt_pl.memory.KNOWN_SHAPES; "
            "download the checkpoint's config or add its shape"
        ) from None


# ----------------------------------------------------------------------------------------- weights and optimizer
def nf4_bytes(numel: int) -> int:
    """Packed NF4 weight + double-quantised constants of one linear weight (bitsandbytes layout)."""
    blocks = math.ceil(numel / _NF4_BLOCK)
    nested = math.ceil(blocks / _NF4_NESTED_BLOCK)
    # packed 4-bit weight, uint8 absmax, fp32 nested absmax, 16-value fp32 NF4 code, 256-value fp32 nested code,
    # fp32 offset
    return math.ceil(numel / 2) + blocks + 4 * nested + 4 * 16 + 4 * 256 + 4


def weight_bytes(shape: ModelShape, dtype: str, quantization: str | None = None) -> int:
    """Bytes of all weights as loaded (parameters and quantisation state; no buffers).

    Args:
        shape: model dimensions.
        dtype: load dtype ("bfloat16", "float32", "float16") of everything not quantised.
        quantization: None, "4bit" (NF4 + double quantisation) or "8bit" (LLM.int8).
    """
    b = _BYTES[dtype]
    per_layer = 2 * shape.hidden * b  # input and post-attention RMSNorm
    for _, fan_in, fan_out, bias in shape.linears():
        n = fan_in * fan_out
        if quantization == "4bit":
            per_layer += nf4_bytes(n)
        elif quantization == "8bit":
            per_layer += n + 4 * fan_out
        else:
            per_layer += n * b
        per_layer += fan_out * b if bias else 0
    embeddings = shape.vocab * shape.hidden * b * (1 if shape.tied_embeddings else 2)
    return shape.layers * per_layer + embeddings + shape.hidden * b  # + final norm


def lora_tensors(shape: ModelShape, r: int, target_modules: str | Sequence[str]) -> list[int]:
    """Element counts of every adapter tensor (lora_A [r, in], lora_B [out, r])."""
    targets = None if target_modules == "all-linear" else set(target_modules)
    out = []
    for name, fan_in, fan_out, _ in shape.linears():
        if targets is None or name in targets:
            out += [r * fan_in, fan_out * r]
    return out * shape.layers


def optimizer_bytes(tensor_numels: Sequence[int], param_bytes: int, kind: str = "adamw") -> int:
    """Optimizer state of the trained tensors.

    Args:
        tensor_numels: element count of each trained tensor.
        param_bytes: bytes per element of the trained parameters (torch AdamW keeps its moments in this dtype).
        kind: "adamw" (torch: exp_avg + exp_avg_sq + a 4-byte step per tensor) or "adamw8bit" (bitsandbytes).
    """
    if kind == "adamw":
        return sum(2 * n * param_bytes + 4 for n in tensor_numels)
    total = 0
    for n in tensor_numels:
        if n < _ADAM8_MIN_SIZE:
            total += 2 * n * 4  # small tensors keep 32-bit states
        else:
            total += 2 * (n + 4 * math.ceil(n / _ADAM8_BLOCK))
    shared_maps = 2 * 256 * 4 if any(n >= _ADAM8_MIN_SIZE for n in tensor_numels) else 0  # one fp32 code per moment
    return total + shared_maps


# ----------------------------------------------------------------------------------------- activations and logits
def layer_activation_bytes(shape: ModelShape, act_bytes: int, lora_r: int | None, lora_dropout: float) -> int:
    """Saved tensors of one decoder layer for one token in a training forward (SDPA attention)."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # 2 norm inputs/outputs + residual, q/k/v before and after RoPE, attention output, MLP gate/up/act/product
    elements = 5 * h + 2 * (q + 2 * kv) + q + 4 * i
    total = elements * act_bytes
    if lora_r is not None:
        for _, fan_in, _, _ in shape.linears():
            total += 4 * fan_in + 4 * lora_r  # fp32 cast of the input, fp32 lora_A output
            if lora_dropout > 0:
                total += 5 * fan_in  # fp32 dropout output + bool mask
    return total


def nograd_layer_bytes(shape: ModelShape, act_bytes: int) -> int:
    """Live tensors of one decoder layer for one token in a no-grad forward (what prefill/scoring peak at)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return (3 * shape.hidden + q + 2 * kv + 3 * shape.intermediate) * act_bytes


def logits_train_bytes(rows: int, positions: int, vocab: int, logit_bytes: int) -> int:
    """Logits of a training forward: bf16 logits, the fp32 chunks kept for backward, the logits' gradient."""
    n = rows * positions * vocab
    return n * logit_bytes + n * 4 + n * logit_bytes


def entropy_bytes(vocab: int) -> int:
    """The logged-only entropy (`rlt_pl.grpo.token_entropy`): one fp32 chunk, its log-softmax, exp and product."""
    rows = max(1, ENTROPY_CHUNK_ELEMENTS // vocab)
    return 4 * rows * vocab * 4


def logits_nograd_bytes(rows: int, positions: int, vocab: int, logit_bytes: int) -> int:
    """Logits of a no-grad scoring forward plus one fp32 log-softmax chunk."""
    chunk = min(rows * positions, max(1, _CHUNK_ELEMENTS // vocab))
    return rows * positions * vocab * logit_bytes + 2 * chunk * vocab * 4


# ----------------------------------------------------------------------------------------- configs
@dataclass
class Term:
    """One line of a prediction: `phase` is "static" (resident all run) or the step phase it belongs to
    ("generate", "score: policy", "score: student", "train"; phases do not overlap)."""

    name: str
    phase: str
    bytes: int


def load_config(paths: Sequence[str | Path]) -> dict:
    """Merge YAML files as `-c a.yaml -c b.yaml` does (later files win; mappings merge, lists are replaced)."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    config: dict = {}
    for p in paths:
        config = merge(config, yaml.safe_load(Path(p).read_text()) or {})
    return config


def _init_args(node: dict | None) -> dict:
    node = node or {}
    return node.get("init_args", {}) if "class_path" in node else node


def _load_dtype(model: dict) -> str:
    dtype = model.get("dtype", "auto")
    return "bfloat16" if dtype == "auto" else dtype


def _world_size(trainer: dict, devices: int | None) -> int:
    n = devices if devices is not None else trainer.get("devices", 1)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"trainer.devices={n!r} does not say how many GPUs share the model; pass --devices N")
    return n * int(trainer.get("num_nodes", 1))


def _data_ranks(trainer: dict, devices: int | None) -> int:
    """Processes the global `data.batch_size` is split over (DDP or FSDP alike); 1 when `trainer.devices` is not a
    number (auto)."""
    n = devices if devices is not None else trainer.get("devices", 1)
    return (n if isinstance(n, int) and n >= 1 else 1) * int(trainer.get("num_nodes", 1))


def _student_config(config: dict) -> dict | None:
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("StudentRewardCallback"):
            return cb.get("init_args", {})
    return None


def predict(config: dict, devices: int | None = None, prompt_tokens: int = 1024) -> list[Term]:
    """Predicted memory terms per GPU for a merged training config (see the module docstring).

    Args:
        config: merged YAML (`load_config`) of a GRPO/RLT (`GRPOModule`, `TeacherRLModule`) or SFT
            (`TeacherSFTModule`, `StudentDistillModule`) run.
        devices: GPUs sharing an FSDP-sharded model; None reads `trainer.devices` x `trainer.num_nodes`.
        prompt_tokens: prompt length used when `sampling.max_prompt_tokens` is not set.
    """
    trainer = config.get("trainer") or {}
    module_path = str((config.get("model") or {}).get("class_path", ""))
    m = _init_args(config.get("model"))
    model = m.get("model") or {}
    if "name_or_path" not in model:
        raise ValueError("the config has no model.init_args.model.name_or_path")
    shape = shape_for(model["name_or_path"])
    dtype = _load_dtype(model)
    quant = model.get("quantization")
    lora = model.get("lora")
    precision = str(trainer.get("precision", "32-true"))
    act_bytes = 2 if precision.startswith(("bf16", "16")) or dtype != "float32" else 4
    fsdp = "FSDP" in str(trainer.get("strategy", "")) or str(trainer.get("strategy", "")) == "fsdp"
    world = _world_size(trainer, devices) if fsdp else 1
    ranks = _data_ranks(trainer, devices)  # data.batch_size is the global batch: each rank loads batch_size / ranks
    terms = [Term("CUDA context", "static", CUDA_CONTEXT_BYTES)]

    # trained model: weights, adapters, gradients, optimizer
    terms.append(Term(f"policy weights ({quant or dtype})", "static", weight_bytes(shape, dtype, quant) // world))
    optimizer = str(_init_args(m.get("optimizer")) and (m.get("optimizer") or {}).get("class_path", ""))
    opt_kind = "adamw8bit" if "8bit" in optimizer else "adamw"
    if lora is not None:
        tensors, param_bytes = lora_tensors(shape, int(lora.get("r", 16)), lora.get("target_modules", "all-linear")), 4
        terms.append(Term(f"LoRA r={lora.get('r', 16)} weights (fp32)", "static", 4 * sum(tensors) // world))
    else:
        param_bytes = _BYTES[dtype]
        tensors = [weight_bytes(shape, "float32") // 4]
    terms.append(
        Term(f"optimizer states ({opt_kind})", "static", optimizer_bytes(tensors, param_bytes, opt_kind) // world)
    )
    terms.append(Term("gradients", "train", param_bytes * sum(tensors) // world))
    if fsdp:
        gathered = 2 * weight_bytes(ModelShape(**{**shape.__dict__, "layers": 1, "vocab": 0}), "bfloat16")
        terms.append(Term("FSDP all-gathered layers (2, bf16)", "static", gathered))

    ckpt = bool(model.get("gradient_checkpointing", False))
    r = int(lora["r"]) if lora is not None else None
    dropout = float(lora.get("dropout", 0.05)) if lora is not None else 0.0
    per_layer = layer_activation_bytes(shape, act_bytes, r, dropout)

    def train_terms(rows: int, tokens: int, positions: int) -> None:
        if ckpt:
            stored = shape.layers * rows * tokens * shape.hidden * act_bytes
            terms.append(Term(f"activations: checkpointed layer inputs ({rows} x {tokens} tokens)", "train", stored))
            terms.append(Term("activations: one layer recomputed", "train", rows * tokens * per_layer))
        else:
            terms.append(
                Term(
                    f"activations, all layers ({rows} x {tokens} tokens)",
                    "train",
                    shape.layers * rows * tokens * per_layer,
                )
            )
        logits = logits_train_bytes(rows, positions, shape.vocab, act_bytes)
        terms.append(Term(f"logits + fp32 log-softmax + grad ({rows} x {positions} x V)", "train", logits))

    if module_path.endswith(("TeacherSFTModule", "StudentDistillModule")):
        rows = -(-int(_init_args(config.get("data")).get("batch_size", 1)) // ranks)
        tokens = int(m.get("max_length", 16384))
        train_terms(rows, tokens, tokens)
        return terms
    if not module_path.endswith(("GRPOModule", "TeacherRLModule")):
        raise ValueError(f"rlt_pl.memory predicts GRPO and SFT modules, not {module_path or 'this config'}")

    sampling = m.get("sampling") or {}
    new = int(sampling.get("max_new_tokens", 16384))
    prompt = int(sampling.get("max_prompt_tokens") or prompt_tokens)
    seq = prompt + new
    group = int(m.get("num_generations", 64))
    per_step = group * -(-int(_init_args(config.get("data")).get("batch_size", 1)) // ranks)  # this rank's
    gen_batch = int(_init_args(m.get("engine")).get("batch_size") or per_step)
    terms.append(
        Term(
            f"KV cache ({gen_batch} x {seq} tokens)", "generate", gen_batch * seq * shape.kv_bytes_per_token(act_bytes)
        )
    )
    terms.append(
        Term(
            f"prefill, one layer ({gen_batch} x {prompt} tokens)",
            "generate",
            gen_batch * prompt * nograd_layer_bytes(shape, act_bytes),
        )
    )
    terms.append(Term("sampling logits (fp32, 4 copies)", "generate", 4 * gen_batch * shape.vocab * 4))

    budget = int(m.get("token_budget", 65536))
    rows = max(1, budget // seq)
    score = rows * seq * (nograd_layer_bytes(shape, act_bytes) + shape.kv_bytes_per_token(act_bytes))
    score += logits_nograd_bytes(rows, new + 33, shape.vocab, act_bytes)
    terms.append(Term(f"no-grad policy/reference chunk ({rows} x {seq} tokens)", "score: policy", score))

    loss = m.get("loss") or {}
    beta = float(loss.get("beta", 0.04))
    reference = m.get("reference", "copy")
    student = _student_config(config) if module_path.endswith("TeacherRLModule") else None
    student_model = (student or {}).get("student")
    shared = student_model is not None and student_model == model
    if reference == "copy" and beta > 0 and not shared:
        terms.append(Term(f"reference copy ({quant or dtype})", "static", weight_bytes(shape, dtype, quant) // world))
    if student_model is not None:
        s_shape = shape_for(student_model["name_or_path"])
        s_quant = student_model.get("quantization")
        terms.append(
            Term(
                f"reward student ({s_quant or _load_dtype(student_model)})",
                "static",
                weight_bytes(s_shape, _load_dtype(student_model), s_quant),
            )
        )
        s_len = min(int(student.get("max_length") or seq), seq)
        s_budget = int(student.get("token_budget", 65536))
        s_rows = max(1, s_budget // s_len)
        s_score = s_rows * s_len * (nograd_layer_bytes(s_shape, act_bytes) + s_shape.kv_bytes_per_token(act_bytes))
        s_score += logits_nograd_bytes(s_rows, s_len, s_shape.vocab, act_bytes)
        terms.append(Term(f"student scoring chunk ({s_rows} x {s_len} tokens)", "score: student", s_score))

    rows = int(m.get("micro_batch_size", 1))
    if m.get("micro_batch_tokens") is not None:
        rows = max(1, min(rows, int(m["micro_batch_tokens"]) // seq))
    train_terms(rows, seq, new + 1 + (new // 8 if rows > 1 else 0))
    terms.append(Term("entropy (logged only, one fp32 chunk)", "train", entropy_bytes(shape.vocab)))
    return terms


def peak_bytes(terms: Sequence[Term]) -> int:
    """Static terms plus the largest phase."""
    static = sum(t.bytes for t in terms if t.phase == "static")
    phases: dict[str, int] = {}
    for t in terms:
        if t.phase != "static":
            phases[t.phase] = phases.get(t.phase, 0) + t.bytes
    return static + max(phases.values(), default=0)


def report(terms: Sequence[Term]) -> str:
    """A plain-text table of the terms, the per-phase totals and the peak, in GiB."""
    lines = [f"{'term':<64} {'phase':<15} {'GiB':>7}"]
    lines += [f"{t.name:<64} {t.phase:<15} {t.bytes / GIB:7.2f}" for t in terms]
    static = sum(t.bytes for t in terms if t.phase == "static")
    for phase in dict.fromkeys(t.phase for t in terms if t.phase != "static"):
        part = sum(t.bytes for t in terms if t.phase == phase)
        if part:
            lines.append(f"{'= static + ' + phase:<64} {'':<15} {(static + part) / GIB:7.2f}")
    lines.append(f"{'predicted peak per GPU':<64} {'':<15} {peak_bytes(terms) / GIB:7.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="YAML config (repeat to merge)")
    parser.add_argument("--budget-gib", type=float, default=None, help="warn (exit 1) when the peak exceeds this")
    parser.add_argument("--devices", type=int, default=None, help="GPUs sharing an FSDP model (default: trainer)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length if max_prompt_tokens unset")
    args = parser.parse_args(argv)
    terms = predict(load_config(args.config), devices=args.devices, prompt_tokens=args.prompt_tokens)
    print(report(terms))
    peak = peak_bytes(terms) / GIB
    if args.budget_gib is not None and peak > args.budget_gib:
        print(
            f"WARNING: predicted peak {peak:.2f} GiB exceeds the budget of {args.budget_gib:.2f} GiB", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
