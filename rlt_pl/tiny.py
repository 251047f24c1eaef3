"""Tiny offline assets: a Qwen2-architecture causal LM and a locally trained BPE tokenizer.

Nothing here downloads. The tokenizer is trained with `tokenizers` using Qwen2's own NFC normaliser and
pre-tokenizer regex (digits split one by one), so `AutoTokenizer.from_pretrained(dir)` -- which builds a
`Qwen2Tokenizer` when a Qwen2 `config.json` sits beside it -- and `PreTrainedTokenizerFast` agree on ids.
The chat template is Qwen2.5's (tools branch removed), so every rendering in `rlt_pl.formats` is the same
string it would be for `Qwen/Qwen2.5-7B-Instruct`.

    python -m rlt_pl.tiny DIR           # writes DIR/teacher and DIR/student (shared tokenizer)
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rlt_pl.formats import read_prompt  # formats owns its prompt files; tiny depends on formats, not back

# Qwen2's pre-tokenizer pattern (the regex its tokenizer.json uses); reproduced for tokenization compatibility.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def qwen25_chat_template() -> str:
    """Qwen2.5-Instruct's chat template (tools branch removed), shipped as package data."""
    return resources.files("rlt_pl").joinpath("templates/qwen2_5.jinja").read_text()


def default_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Text the tiny BPE is trained on: the paper's prompts, format tags and synthetic math."""
    rng = random.Random(seed)
    tags = [
        "<|begin_of_solution|>",
        "<|end_of_solution|>",
        "<|begin_of_explanation|>",
        "<|end_of_explanation|>",
        "<|begin_of_thought|>",
        "<|end_of_thought|>",
    ]
    lines = [read_prompt("teacher_stratos"), read_prompt("student_stratos"), " ".join(tags)]
    words = "the sum of and is we add carry so answer first then digit column number total check result".split()
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(f"Return your final response within \\boxed{{}}. What is {a} + {b}?\n\n{filler} {a + b}.\n\n")
    return lines


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    special_tokens: Sequence[str] = (),
    model_max_length: int = 32768,
    tag_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen2's normaliser and pre-tokenizer, Qwen chat specials and template.

    Args:
        corpus: training text.
        vocab_size: target vocabulary size; 256 + specials means no merges (character level).
        special_tokens: extra single-token strings (e.g. one-token tags of a compact format).
        model_max_length: recorded maximum length (keep it large: the paper's prompts are long).
        tag_tokens: strings kept as single, non-special tokens (they survive `skip_special_tokens` decoding).
    """
    specials = list(CHAT_SPECIAL_TOKENS) + [t for t in special_tokens if t not in CHAT_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        additional_special_tokens=[t for t in specials if t not in (EOS_TOKEN, PAD_TOKEN)],
    )
    if tag_tokens:
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in tag_tokens])
    fast.chat_template = qwen25_chat_template()
    return fast


def tiny_qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 4096,
) -> Qwen2Config:
    """A Qwen2 config of a few hundred K parameters sized to `tokenizer`."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


# Sampling settings of Qwen/Qwen2.5-7B-Instruct's generation_config.json (its eos_token_id is [151645, 151643],
# i.e. <|im_end|> and <|endoftext|>, mapped to the tiny vocabulary by `qwen25_instruct_generation_config`).
QWEN25_INSTRUCT_SAMPLING = {
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def qwen25_instruct_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Qwen2.5-7B-Instruct's `generation_config.json` with its token ids mapped to `tokenizer`."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        **QWEN25_INSTRUCT_SAMPLING,
    )


def build_model_dir(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    qwen_generation_config: bool = False,
) -> Path:
    """Save a randomly initialised tiny Qwen2 causal LM and `tokenizer` to `out_dir` (loadable offline).

    With `qwen_generation_config` the checkpoint carries Qwen2.5-7B-Instruct's generation_config.json (its sampling
    settings and both EOS ids), as a real Instruct checkpoint and every stage exported from it do.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen2_config(tokenizer, hidden_size, num_layers, num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if qwen_generation_config:
        model.generation_config = qwen25_instruct_generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_assets(
    out_dir: str | Path, seed: int = 0, vocab_size: int = 512, qwen_generation_config: bool = False
) -> dict[str, Path]:
    """Build `out_dir/teacher` (hidden 64, 2 layers) and `out_dir/student` (hidden 48, 2 layers), one tokenizer.

    `qwen_generation_config`: both carry Qwen2.5-7B-Instruct's generation_config.json (see `build_model_dir`).
    """
    out = Path(out_dir)
    tokenizer = train_tokenizer(default_corpus(seed), vocab_size=vocab_size)
    q = qwen_generation_config
    return {
        "teacher": build_model_dir(out / "teacher", tokenizer, seed=seed, hidden_size=64, qwen_generation_config=q),
        "student": build_model_dir(out / "student", tokenizer, seed=seed + 1, hidden_size=48, qwen_generation_config=q),
    }


def build_compact_assets(
    out_dir: str | Path, tag_tokens: Sequence[str], seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> dict[str, Path]:
    """Character-level tokenizer (no merges) with one token per tag, and tiny teacher/student models.

    Used by the compact format (`rlt_pl.formats.CompactFormat`) and `make demo`.
    """
    out = Path(out_dir)
    tokenizer = train_tokenizer(["0123456789+-=;.,: abcdefghijklmnopqrstuvwxyz"], vocab_size=0, tag_tokens=tag_tokens)
    return {
        "teacher": build_model_dir(out / "teacher", tokenizer, seed, hidden_size, num_layers),
        "student": build_model_dir(out / "student", tokenizer, seed + 1, hidden_size, num_layers),
    }


def trace_predict_yaml(
    out: str | Path, teacher: str | Path, num_train: int, batch_size: int, max_new_tokens: int, temperature: float = 0.7
) -> str:
    """A `predict` config writing addition traces of a CompactFormat teacher into `out` (tests, fault scenarios)."""
    return f"""
seed_everything: 0
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: rlt_pl.callbacks.trace_writer.TraceWriter
      init_args: {{output_dir: {out}}}
model:
  class_path: rlt_pl.modules.sft.TeacherSFTModule
  init_args:
    model: {{name_or_path: {teacher}, dtype: float32}}
    format: {{class_path: rlt_pl.formats.CompactFormat}}
    sampling: {{max_new_tokens: {max_new_tokens}, temperature: {temperature}}}
data:
  class_path: rlt_pl.datamodules.addition.AdditionDataModule
  init_args: {{num_train: {num_train}, num_heldout: 4, batch_size: {batch_size}}}
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--compact", action="store_true", help="character-level vocabulary with CompactFormat tags")
    args = parser.parse_args(argv)
    if args.compact:
        from rlt_pl.formats import CompactFormat

        paths = build_compact_assets(args.out_dir, CompactFormat().tag_tokens(), seed=args.seed)
    else:
        paths = build_tiny_assets(args.out_dir, seed=args.seed, vocab_size=args.vocab_size)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
