"""Loading causal LMs and tokenizers: dtype, attention, bitsandbytes quantization, LoRA, checkpointing, export.

The paper fine-tunes all weights of Qwen2.5-7B-Instruct in bf16 (arXiv 2506.08388, §3.9) and keeps the student frozen
(§2.10). LoRA / QLoRA are departures offered for small GPUs: with LoRA the reference policy is the base model with
the adapter switched off (`reference_mode`), so no second copy of the weights is held. Teacher and student must share
one tokenizer (P13, `check_tokenizers_compatible`).
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from packaging.version import Version
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

if TYPE_CHECKING:
    import peft


log = logging.getLogger(__name__)

FIM_PAD_TOKEN = "<|fim_pad|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A Hugging Face Hub id: "name" or "org/name" (letters, digits, "-", "_", ".").
_BNB_CPU_MIN = "0.48"  # first bitsandbytes with CPU kernels for NF4 / int8 layers
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _peft():
    """peft, imported on first use: it imports bitsandbytes, whose CPU backend logs a "Failed to load CPU
    gemm_4bit_forward" warning at import time; runs without LoRA or quantization never import either."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import peft

    return peft


@dataclass
class LoraConfig:
    """Our typed LoRA schema (jsonargparse-friendly), converted to `peft.LoraConfig` for causal LMs.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear" (every linear layer except the LM head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.r <= 0:
            raise ValueError(f"model.lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module (or be 'all-linear')")

    def to_peft(self) -> peft.LoraConfig:
        """The equivalent `peft.LoraConfig` (task CAUSAL_LM, no bias training)."""
        self.validate()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return _peft().LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class ModelConfig:
    """How to load one causal LM. Defaults = the paper (bf16 on GPU, full fine-tuning, SDPA attention).

    Args:
        name_or_path: Hugging Face id (e.g. "Qwen/Qwen2.5-7B-Instruct") or a local directory.
        dtype: weight dtype; "auto" means bfloat16 on CUDA, float32 otherwise.
        attn_implementation: "sdpa", "eager", "flash_attention_2" (CUDA only) or None (transformers' choice).
        trust_remote_code: run modelling code shipped with the checkpoint; only when the config says so.
        quantization: load the weights with bitsandbytes: "4bit" (NF4, double quantization, bf16 compute) or
            "8bit". Training needs LoRA (QLoRA). Runs on CUDA, and on CPU with bitsandbytes >= 0.48 (slow; tests).
        lora: LoRA adapter settings; None trains all weights.
        gradient_checkpointing: non-reentrant activation checkpointing of every decoder layer.
        compile: `torch.compile` the model in place (opt-in).
        revision: Hub branch, tag or commit to load.
    """

    name_or_path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    quantization: Literal["4bit", "8bit"] | None = None
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    revision: str | None = None

    def validate(self, needs_cuda_ok: bool | None = None) -> None:
        """Check the config before any weight is touched; raise ValueError naming the field.

        Args:
            needs_cuda_ok: whether CUDA-only features may be used; None asks `torch.cuda.is_available()` now.
        """
        cuda_ok = torch.cuda.is_available() if needs_cuda_ok is None else needs_cuda_ok
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"model.dtype must be one of auto/float32/bfloat16/float16, got {self.dtype!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"model.quantization must be null, '4bit' or '8bit', got {self.quantization!r}")
        if self.quantization is not None and not cuda_ok and not bitsandbytes_runs_on_cpu():
            raise ValueError(
                f"model.quantization={self.quantization!r} needs a CUDA device, or bitsandbytes >= "
                f"{_BNB_CPU_MIN} on CPU; set model.quantization: null to load unquantized weights on this machine"
            )
        if self.quantization is not None and self.compile:
            raise ValueError("model.compile=true is not supported with model.quantization; set one of them off")
        if self.quantization is not None and self.dtype == "float32":
            raise ValueError("model.quantization computes in bfloat16; set model.dtype to 'auto' or 'bfloat16'")
        if self.attn_implementation is not None and self.attn_implementation.startswith("flash") and not cuda_ok:
            raise ValueError(
                f"model.attn_implementation={self.attn_implementation!r} needs CUDA; use 'sdpa' or 'eager' here"
            )
        if self.lora is not None:
            self.lora.validate()
        resolve_name_or_path(self.name_or_path)

    def torch_dtype(self) -> torch.dtype:
        """The concrete dtype of the weights ("auto": bfloat16 on CUDA or when quantized, else float32)."""
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() or self.quantization else torch.float32
        return _DTYPES[self.dtype]

    def quantization_config(self) -> BitsAndBytesConfig | None:
        """The transformers `BitsAndBytesConfig` for `quantization`, or None."""
        if self.quantization == "4bit":
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        if self.quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return None


def bitsandbytes_runs_on_cpu() -> bool:
    """Whether the installed bitsandbytes runs 4-bit / 8-bit layers on CPU tensors (>= 0.48)."""
    try:
        import bitsandbytes
    except ImportError:
        return False
    return Version(bitsandbytes.__version__) >= Version(_BNB_CPU_MIN)


# First path components that are this project's output folders: "runs/x" is never a Hub id.
LOCAL_ROOTS = ("runs", "logs", "lightning_logs")


def resolve_name_or_path(name_or_path: str) -> str:
    """Return an absolute local path if `name_or_path` is one, else the Hub id unchanged.

    Args:
        name_or_path: a directory (absolute, relative, "~") or a Hub id "org/name". A string is a local path when
            it starts with ".", "/" or "~", has more than one "/", its parent directory exists here, or it starts
            with one of `LOCAL_ROOTS` ("runs/...").

    Raises:
        ValueError: a path-looking string that does not exist, or a string that is neither a path nor a Hub id.
    """
    if not name_or_path:
        raise ValueError("model.name_or_path is empty")
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    looks_like_path = (
        name_or_path.startswith((".", "/", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
        or path.parent.is_dir()
        and path.parent != Path(".")  # e.g. runs/teacherX with runs/ here
        or path.parts[0] in LOCAL_ROOTS
    )
    if looks_like_path:
        raise ValueError(
            f"model.name_or_path={name_or_path!r} looks like a local path but {path.resolve()} does not exist; "
            "point it at an exported checkpoint directory (the export_dir of an earlier stage) or a Hub id"
        )
    if not _HUB_ID.match(name_or_path):
        raise ValueError(
            f"model.name_or_path={name_or_path!r} is neither an existing directory nor a Hub id 'org/name'"
        )
    return name_or_path


def load_tokenizer(
    name_or_path: str,
    trust_remote_code: bool = False,
    padding_side: Literal["left", "right"] = "left",
    require_chat_template: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token and the requested padding side (paper: left, arXiv 2506.08388).

    If it has no pad token, `<|fim_pad|>` is used when in the vocabulary, else EOS (arXiv 2506.08388).

    Args:
        name_or_path: Hub id or local directory.
        trust_remote_code: allow tokenizer code shipped with the checkpoint.
        padding_side: "left" (generation) or "right".
        require_chat_template: raise if the tokenizer has no chat template.
        revision: Hub branch, tag or commit.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    source = resolve_name_or_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        fim_id = tok.convert_tokens_to_ids(FIM_PAD_TOKEN)
        if fim_id is not None and fim_id != tok.unk_token_id:
            tok.pad_token = FIM_PAD_TOKEN
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad token, {FIM_PAD_TOKEN}, nor an EOS token")
    if require_chat_template and not tok.chat_template:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no chat template; the RLT prompts are rendered with one "
            "(use an Instruct checkpoint or set tokenizer.chat_template)"
        )
    return tok


def _enable_checkpointing(model: PreTrainedModel) -> None:
    kwargs = {"use_reentrant": False}
    # transformers >= 5 renamed gradient_checkpointing_enable (kept as a deprecated alias); pyproject admits 4.51.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _keep_cpu_kbit_layout(model: torch.nn.Module) -> None:
    """Keep 4-bit weights of a trained model in their standard layout on CPU.

    bitsandbytes (0.50) repacks a `Linear4bit` weight into an AVX512-BF16 inference layout on its first eval-mode
    forward (e.g. generation); its kernel for that layout is not differentiable, so the next training forward fails.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_causal_lm(config: ModelConfig, trainable: bool = True) -> PreTrainedModel:
    """Load a causal LM as `config` says, ready to train (`trainable=True`) or frozen for inference.

    Frozen: `eval()` and no parameter requires grad. Trainable: `train()`; with `config.lora` only adapter parameters
    are trainable. A quantized base is frozen and otherwise kept as loaded: unlike
    `peft.prepare_model_for_kbit_training` nothing is upcast to fp32 (that would hold embeddings and LM head, ~1.1B
    parameters on Qwen2.5-7B, in fp32: +2 GiB), since bf16 norms and embeddings are what the bf16 compute reads anyway.

    Args:
        config: what to load and how.
        trainable: False for frozen models (the student in the reward, arXiv 2506.08388).

    Returns:
        The model, a `peft.PeftModel` when `config.lora` is set and `trainable`.
    """
    config.validate()
    path = resolve_name_or_path(config.name_or_path)
    adapter = _adapter_dir(path) if trainable else None  # frozen: transformers loads base + adapter itself
    if trainable and config.quantization is not None and config.lora is None and adapter is None:
        raise ValueError(
            f"model.quantization={config.quantization!r} weights cannot be trained directly; set model.lora (QLoRA)"
        )
    quant = config.quantization_config()
    kwargs: dict = {
        "dtype": config.torch_dtype(),
        "trust_remote_code": config.trust_remote_code,
        "revision": config.revision,
    }
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes weights cannot be moved after loading: place them on this rank's device now.
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    if adapter is not None:  # an adapter-only export seeding this stage: its base, then the adapter, trainable
        path = resolve_name_or_path(_adapter_base(config, adapter))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)

    if not trainable:
        model.eval()
        model.requires_grad_(False)
    else:
        if quant is not None:
            model.requires_grad_(False)  # the quantized base is frozen; only the adapter trains
            _keep_cpu_kbit_layout(model)
        if config.gradient_checkpointing:
            _enable_checkpointing(model)
        if config.lora is not None or adapter is not None:
            if config.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: keep a grad path into checkpointed layers
            if adapter is not None:  # the saved adapter's own config; only its LoRA weights train
                model = _peft().PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
            else:
                model = _peft().get_peft_model(model, config.lora.to_peft())
        model.train()
    if config.compile:
        model.compile()  # in place: the module keeps its type, so peft / save_pretrained still work
    return model


def _adapter_dir(path: str) -> Path | None:
    """The folder when `path` is a local LoRA adapter export (`adapter_config.json`, no full weights), else None."""
    folder = Path(path)
    return folder if (folder / "adapter_config.json").is_file() else None


def _adapter_base(config: ModelConfig, adapter: Path) -> str:
    """The base model an adapter-only export was trained on; `model.lora`, if set, must agree with the adapter's rank
    and alpha (the adapter's own config is what is loaded)."""
    saved = _peft().PeftConfig.from_pretrained(str(adapter))
    if config.lora is not None and (config.lora.r, config.lora.alpha) != (saved.r, saved.lora_alpha):
        raise ValueError(
            f"model.lora (r={config.lora.r}, alpha={config.lora.alpha}) differs from the adapter at "
            f"{config.name_or_path} (r={saved.r}, alpha={saved.lora_alpha}); drop model.lora or match it"
        )
    return saved.base_model_name_or_path


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft-wrapped model (LoRA adapters).

    Args:
        model: any module.
    """
    return "peft" in sys.modules and isinstance(model, _peft().PeftModel)  # no peft imported: no peft model


@contextmanager
def reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run a LoRA model as its frozen base (adapters off): the KL reference without a second weight copy.

    Args:
        model: a `peft.PeftModel`.

    Raises:
        TypeError: `model` has no adapters (keep a separate reference model instead).
    """
    if not is_lora(model):
        raise TypeError(
            f"reference_mode needs a peft (LoRA) model, got {type(model).__name__}; "
            "full fine-tuning needs a separate frozen reference model"
        )
    with model.disable_adapter():
        yield


def check_tokenizers_compatible(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, probe_strings: Sequence[str]
) -> None:
    """P13: teacher and student must tokenize identically (same vocabulary, same ids for the probes).

    Args:
        a: first tokenizer (e.g. the teacher's).
        b: second tokenizer (e.g. the student's).
        probe_strings: strings that must map to the same ids, e.g. format tags and chat specials.

    Raises:
        ValueError: sizes, a probe, or the vocabularies differ; the message names the first difference.
    """
    if len(a) != len(b):
        raise ValueError(
            f"tokenizers differ in vocabulary size: {len(a)} vs {len(b)}; teacher and student must share one"
        )
    for probe in probe_strings:
        ids_a = a.encode(probe, add_special_tokens=False)
        ids_b = b.encode(probe, add_special_tokens=False)
        if ids_a != ids_b:
            raise ValueError(
                f"tokenizers differ on probe {probe!r}: {ids_a} vs {ids_b}; teacher and student must share one"
            )
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        diff = sorted(set(vocab_a.items()) ^ set(vocab_b.items()), key=lambda kv: kv[1])[0]
        raise ValueError(f"tokenizers differ in vocabulary, first at token {diff[0]!r} (id {diff[1]})")


def _is_quantized(model: PreTrainedModel) -> bool:
    # transformers records the BitsAndBytesConfig on the model config only for quantized loads.
    return model.config.to_dict().get("quantization_config") is not None


def export_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    merge_lora: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    export_dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Save a Hugging Face checkpoint (model + tokenizer) to `out_dir`.

    A LoRA model is saved as its adapter only, or with `merge_lora=True` as a full merged checkpoint; the merge is
    done on a deep copy (one extra copy of the weights in memory) so the live model and its reference are untouched.
    `merge_lora` is ignored for models without adapters. A quantized (QLoRA) base is dequantised and merged out of
    place (`rlt_pl.merge.merged_weights`) into a plain, unquantized checkpoint of `export_dtype`.

    Args:
        model: a `PreTrainedModel` or a `peft.PeftModel`.
        tokenizer: saved beside the weights.
        out_dir: target directory (created).
        merge_lora: write merged full weights instead of the adapter.
        state_dict: the full state dict of a sharded model (`rlt_pl.distributed.full_state_dict`, gathered by
            every rank); it is loaded into a fresh unsharded copy built from `model`'s config, which is saved.
        export_dtype: dtype of a merged QLoRA export (the 4-bit base computes in bfloat16).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model = _unsharded_copy(model, state_dict)
    if is_lora(model) and merge_lora:
        if _is_quantized(model.get_base_model()):
            merged = _dequantized_merged_copy(model, export_dtype)
        else:
            merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out)
        del merged
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU model of `model`'s architecture (and LoRA adapters) holding `state_dict` (full, unsharded tensors)."""
    base = model.get_base_model() if is_lora(model) else model
    if _is_quantized(base):
        raise ValueError("exporting a sharded quantized model is not supported; train QLoRA with DDP or one device")
    with torch.device("meta"):
        copy_ = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(state_dict.values())).dtype)
    if is_lora(model):
        copy_ = _peft().get_peft_model(copy_, model.peft_config[model.active_adapter])
    copy_.load_state_dict(state_dict, strict=True, assign=True)
    copy_.tie_weights()
    if hasattr(base, "generation_config"):
        (copy_.get_base_model() if is_lora(copy_) else copy_).generation_config = base.generation_config
    return copy_


def _dequantized_merged_copy(model: torch.nn.Module, dtype: torch.dtype) -> PreTrainedModel:
    """A plain (unquantized) CPU model holding the merged, dequantised weights of a QLoRA `model`."""
    from rlt_pl.merge import merged_weights

    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    del config.quantization_config  # a plain checkpoint: from_pretrained must not quantize it again
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {name: t.to("cpu", copy=True) for name, t in merged_weights(model, dtype)}
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain
