"""Token spans from character spans, exactly, for byte-level BPE tokenizers (Qwen2, Llama-3, GPT-2 style).

Each token of a byte-level tokenizer stands for a known number of UTF-8 bytes, so the byte offsets of a token
sequence are a cumulative sum over a per-vocabulary length table -- no offset-mapping trimming, no decode →
re-encode → sub-list search (spec pitfall P4). A span `[start, end)` of characters becomes the tokens whose byte
range lies entirely inside the span's byte range; tokens straddling a boundary (e.g. `|>` fused with the padding)
belong to neither side, which is what the authors' `sub[1:]`/`sub[:-1]` trimming produced in the common case.

Everything is carried as tensors: masks `[B, L]` over right-padded id batches.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _byte_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


class ByteOffsets:
    """Per-token UTF-8 byte lengths of a byte-level tokenizer's vocabulary.

    Args:
        tokenizer: a Hugging Face tokenizer whose regular tokens are byte-level strings.

    Raises:
        ValueError: if the vocabulary is not byte-level (spans would not be exact).
    """

    def __init__(self, tokenizer) -> None:
        alphabet = _byte_alphabet()
        size = len(tokenizer)
        lengths = torch.zeros(size, dtype=torch.long)
        special = torch.zeros(size, dtype=torch.bool)
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < size}
        special_ids = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        for i, tok in enumerate(tokens):
            if i in added:
                lengths[i] = len(added[i].content.encode("utf-8"))
                special[i] = i in special_ids or added[i].special
            elif tok is None:
                continue
            elif set(tok) <= alphabet:
                lengths[i] = len(tok)
            else:
                raise ValueError(
                    f"tokenizer is not byte-level (token {i} = {tok!r}); rlt_pl's exact spans need a byte-level BPE"
                )
        self.lengths = lengths
        self.special = special

    def offsets(self, ids: Tensor, skip_special: bool = False, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Byte `[start, end)` of every token of `ids` [B, L].

        With `skip_special`, special tokens have zero length, matching `decode(..., skip_special_tokens=True)`;
        tokens where `mask` [B, L] is 0 (padding, on either side) have zero length.
        """
        lengths = self.lengths.to(ids.device)[ids]  # [B, L]
        if skip_special:
            lengths = lengths.masked_fill(self.special.to(ids.device)[ids], 0)
        if mask is not None:
            lengths = lengths * mask.to(lengths.dtype)
        end = lengths.cumsum(dim=-1)
        return end - lengths, end


def byte_index(text: str, char_index: int) -> int:
    """UTF-8 byte position of a character position."""
    return len(text[:char_index].encode("utf-8"))


@dataclass
class EncodedBatch:
    """Right-padded token ids with span masks.

    Attributes:
        input_ids: [B, L] ids (pad id after each row).
        attention_mask: [B, L] 1 for real tokens.
        masks: span name -> [B, L] bool mask of the tokens inside that span.
        overflow: [B] bool, rows longer than `max_length` (truncated; their span masks are cleared).
    """

    input_ids: Tensor
    attention_mask: Tensor
    masks: dict[str, Tensor]
    overflow: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(-1)


def span_mask(start: Tensor, end: Tensor, lo: Tensor, hi: Tensor, valid: Tensor) -> Tensor:
    """Tokens with byte range inside `[lo, hi)` per row: start/end/valid [B, L], lo/hi [B] -> [B, L] bool."""
    return valid & (end > start) & (start >= lo[:, None]) & (end <= hi[:, None])


def encode_with_spans(
    tokenizer,
    offsets: ByteOffsets,
    texts: Sequence[str],
    spans: Sequence[dict[str, tuple[int, int]]],
    max_length: int | None = None,
) -> EncodedBatch:
    """Tokenize `texts` once (no special tokens added) and turn each row's character spans into token masks.

    Args:
        tokenizer: the (byte-level) tokenizer.
        offsets: its `ByteOffsets`.
        texts: rendered strings.
        spans: per row, span name -> character range `[start, end)`; every row has the same names.
        max_length: rows longer than this are truncated and flagged in `overflow` with empty span masks.
    """
    if len(texts) != len(spans):
        raise ValueError(f"{len(texts)} texts but {len(spans)} span dicts")
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    overflow = [max_length is not None and len(r) > max_length for r in rows]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    width = max(1, max(len(r) for r in rows)) if rows else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    start, end = offsets.offsets(ids)
    total = torch.tensor([len(t.encode("utf-8")) for t in texts])
    lengths = torch.tensor([len(r) for r in rows])
    full_end = end.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1) * (lengths > 0)
    bad = [i for i in range(len(rows)) if not overflow[i] and int(full_end[i]) != int(total[i])]
    if bad:
        raise ValueError(
            f"tokenization changed the bytes of row(s) {bad[:5]} (a normaliser rewrote the text); "
            "NFC-normalise inputs before rendering"
        )
    valid = attn.bool()
    names = list(spans[0]) if spans else []
    masks = {}
    for name in names:
        lo = torch.tensor([byte_index(t, s[name][0]) for t, s in zip(texts, spans)])
        hi = torch.tensor([byte_index(t, s[name][1]) for t, s in zip(texts, spans)])
        m = span_mask(start, end, lo, hi, valid)
        m[torch.tensor(overflow, dtype=torch.bool)] = False
        masks[name] = m
    return EncodedBatch(ids, attn, masks, torch.tensor(overflow, dtype=torch.bool))


def suffix_span_mask(offsets: ByteOffsets, ids: Tensor, attention_mask: Tensor, suffix_bytes: int) -> Tensor:
    """Tokens lying entirely inside the last `suffix_bytes` bytes of each (left-padded) row.

    Used for the explanation padding that ends the RL prompt: on the student side it belongs to the explanation.
    """
    start, end = offsets.offsets(ids, mask=attention_mask)
    total = end[:, -1]
    return span_mask(start, end, total - suffix_bytes, total, attention_mask.bool())


def completion_explanation_mask(
    offsets: ByteOffsets,
    completion_ids: Tensor,
    completion_mask: Tensor,
    explanation_end_bytes: Tensor,
) -> Tensor:
    """Sampled completion tokens that lie before the explanation end (byte index in the special-free text).

    Args:
        offsets: the tokenizer's `ByteOffsets`.
        completion_ids: [B, C] sampled ids, right-padded.
        completion_mask: [B, C] 1 for real completion tokens.
        explanation_end_bytes: [B] byte index (in `decode(ids, skip_special_tokens=True)`) where the explanation stops.
    """
    start, end = offsets.offsets(completion_ids, skip_special=True, mask=completion_mask)
    lo = torch.zeros_like(explanation_end_bytes)
    return span_mask(start, end, lo, explanation_end_bytes, completion_mask.bool())


def nfc_text(field: str, value: str) -> str:
    """`value` NFC-normalised (the exact-span encoder refuses text a tokenizer normaliser would rewrite).

    Raises:
        ValueError: naming `field`, for text that is not valid Unicode (a lone surrogate from a ``\\udXXX``
            escape), instead of a tokenizer failure deep inside a step.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"field {field!r} holds a lone surrogate (not valid Unicode text)") from err
    return unicodedata.normalize("NFC", value)


def loads_finite(text: str) -> object:
    """`json.loads` that refuses `NaN` / `Infinity` and numbers that overflow to them (ValueError naming the value):
    they are not JSON, and a row holding one would be written back as non-standard `NaN` / `Infinity`."""

    def constant(name: str) -> float:
        raise ValueError(f"non-finite number {name} (not JSON)")

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"number {literal[:20]} overflows to {value}")
        return value

    return json.loads(text, parse_constant=constant, parse_float=number)


def nfc_fields(row: dict, keys: Sequence[str] = ("question", "solution", "thought", "answer")) -> dict:
    """A copy of `row` with its text fields NFC-normalised (`nfc_text`); errors name the row and the field."""
    out = dict(row)
    for key in keys:
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = nfc_text(key, value)
            except ValueError as err:
                raise ValueError(f"row {row.get('id')!r}: {err}") from err
    return out
