"""Exact token spans (rlt_pl.spans) on the tiny byte-level tokenizer: properties over random explanations (P4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rlt_pl.formats import StratosFormat
from rlt_pl.rewards import pack_masked
from rlt_pl.scoring import PackedTokens, _align
from rlt_pl.spans import ByteOffsets, byte_index, encode_with_spans, span_mask

FMT = StratosFormat()
Q = "What is 12 + 30?"
S = "\n\n42\n\n"
PROMPT_CACHE: dict[int, str] = {}


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table (printable bytes map to themselves, the rest to 256 + k)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes a token stands for (added tokens: their content)."""
    added = tokenizer.added_tokens_decoder
    if token_id in added:
        return added[token_id].content.encode("utf-8")
    return bytes(BYTE_DECODER[c] for c in tokenizer.convert_ids_to_tokens(token_id))


@pytest.fixture(scope="module")
def offsets(tokenizer) -> ByteOffsets:
    return ByteOffsets(tokenizer)


def rl_prompt(tokenizer) -> str:
    if id(tokenizer) not in PROMPT_CACHE:
        PROMPT_CACHE[id(tokenizer)] = FMT.teacher_prompt(Q, S, tokenizer)
    return PROMPT_CACHE[id(tokenizer)]


def check_spans(tokenizer, offsets: ByteOffsets, text: str, spans: dict[str, tuple[int, int]]) -> dict[str, list]:
    """Assert the span property for one rendered text; return each span's token ids."""
    batch = encode_with_spans(tokenizer, offsets, [text], [spans])
    ids = batch.input_ids[0].tolist()
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")  # lossless: offsets are exact
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    out = {}
    for name, (lo_c, hi_c) in spans.items():
        lo, hi = byte_index(text, lo_c), byte_index(text, hi_c)
        mask = batch.masks[name][0].tolist()
        chosen = [j for j, m in enumerate(mask) if m]
        for j, p in enumerate(pieces):
            s, e = starts[j], starts[j] + len(p)
            inside = lo <= s and e <= hi and e > s
            assert mask[j] == inside, (name, j, p, lo, hi)
        if chosen:
            assert chosen == list(range(chosen[0], chosen[-1] + 1))  # contiguous
            got = b"".join(pieces[j] for j in chosen)
            first, last = starts[chosen[0]], starts[chosen[-1]] + len(pieces[chosen[-1]])
            # a substring of the span, missing only the boundary-straddling tokens
            assert got == text.encode("utf-8")[first:last] and lo <= first and last <= hi
            if first > lo:
                j = chosen[0] - 1
                assert starts[j] < lo < starts[j] + len(pieces[j])
            if last < hi:
                j = chosen[-1] + 1
                assert starts[j] < hi < starts[j] + len(pieces[j])
        boundaries = set(starts) | {len(text.encode("utf-8"))}
        if lo in boundaries and hi in boundaries:
            got = b"".join(pieces[j] for j in chosen)
            assert got.decode("utf-8") == text[lo_c:hi_c]  # exactly the span text
        out[name] = [ids[j] for j in chosen]
    return out


def explanation_ids_agree(tokenizer, offsets: ByteOffsets, completion: str) -> tuple[bool, bool]:
    """(teacher-side ids == student-side ids, what `_align` says) for one completion."""
    prompt = rl_prompt(tokenizer)
    t = FMT.teacher_scoring_text(prompt, completion)
    e = FMT.parse_completion(completion).explanation
    s = FMT.student_text(Q, e, S, tokenizer)
    t_ids = check_spans(tokenizer, offsets, t.text, t.spans)["explanation"]
    s_ids = check_spans(tokenizer, offsets, s.text, s.spans)["explanation"]

    def packed(ids: list[int]) -> PackedTokens:
        row = torch.tensor([ids or [0]])
        mask = torch.tensor([[bool(ids)] * max(1, len(ids))])
        return PackedTokens(row, torch.zeros(row.shape), mask)

    equal, prefix = _align(packed(t_ids), packed(s_ids))
    common = 0
    while common < min(len(t_ids), len(s_ids)) and t_ids[common] == s_ids[common]:
        common += 1
    assert int(prefix.sum()) == common
    return t_ids == s_ids, bool(equal[0])


_LOOKALIKES = st.sampled_from(
    ["<|end_of_thought|>", "<|begin_of_", "<|end_of_explanation", "|>", "<|", "<|im_end|>", "\n\n", " ", "é", "😀"]
)
_ANY = st.lists(st.one_of(st.text(max_size=8), _LOOKALIKES), max_size=10).map("".join)
_NORMAL = st.text(alphabet="abcdefghij xyz0123456789+=.,", min_size=1, max_size=40)
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(completion=_ANY)
def test_spans_random_text(tokenizer, offsets, completion: str) -> None:
    assume("\r" not in completion)  # keep the NFC check meaningful; CR is handled like any other byte
    import unicodedata

    assume(unicodedata.normalize("NFC", completion) == completion)
    same, equal = explanation_ids_agree(tokenizer, offsets, completion)
    assert same == equal  # a mismatch is always detected, never silent


@_SETTINGS
@given(body=_NORMAL, closed=st.booleans(), tail=st.text(alphabet="ab <|>", max_size=6))
def test_spans_normal_text_nonempty_and_equal(tokenizer, offsets, body: str, closed: bool, tail: str) -> None:
    completion = body + ("<|end_of_explanation|>" + tail if closed else "")
    prompt = rl_prompt(tokenizer)
    t = FMT.teacher_scoring_text(prompt, completion)
    s = FMT.student_text(Q, FMT.parse_completion(completion).explanation, S, tokenizer)
    t_ids = check_spans(tokenizer, offsets, t.text, t.spans)["explanation"]
    spans = check_spans(tokenizer, offsets, s.text, s.spans)
    assert t_ids and spans["explanation"] and spans["solution"] and spans["completion"]
    same, equal = explanation_ids_agree(tokenizer, offsets, completion)
    assert same and equal


def test_spans_empty_and_very_long(tokenizer, offsets) -> None:
    for completion in ["", "<|end_of_explanation|>", "x" * 3000 + " yé😀 " * 400, "<|end_of_thought|>" * 50]:
        same, equal = explanation_ids_agree(tokenizer, offsets, completion)
        assert same == equal
    # an empty explanation (padding only) still holds the padding token
    t = FMT.teacher_scoring_text(rl_prompt(tokenizer), "")
    ids = check_spans(tokenizer, offsets, t.text, t.spans)["explanation"]
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == b"\n\n"


def test_exact_span_when_boundaries_are_token_boundaries(tokenizer, offsets) -> None:
    text = "abc<|im_end|>de"
    spans = {"tag": (3, 13), "tail": (13, 15), "empty": (5, 5)}
    got = check_spans(tokenizer, offsets, text, spans)
    assert got["tag"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert got["empty"] == []
    assert b"".join(token_bytes(tokenizer, i) for i in got["tail"]) == b"de"


def test_byte_offsets_lengths(tokenizer, offsets) -> None:
    text = "Sum é 中 😀 <|im_end|>\n\n42"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    start, end = offsets.offsets(ids)
    assert int(end[0, -1]) == len(text.encode("utf-8"))
    assert torch.equal(start[0, 1:], end[0, :-1])
    start, end = offsets.offsets(ids, skip_special=True)
    decoded = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert int(end[0, -1]) == len(decoded.encode("utf-8"))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    start, end = offsets.offsets(ids, mask=mask)
    assert int(end[0, 2]) == 0 and int(end[0, -1]) == len(text.encode()) - len(tokenizer.decode(ids[0, :3]).encode())


def test_span_mask_excludes_straddling_and_padding() -> None:
    start = torch.tensor([[0, 2, 5, 9]])
    end = torch.tensor([[2, 5, 9, 9]])
    valid = torch.tensor([[True, True, True, False]])
    got = span_mask(start, end, torch.tensor([2]), torch.tensor([8]), valid)
    assert got.tolist() == [[False, True, False, False]]


def test_non_byte_level_tokenizer_is_refused() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"hello world": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(ValueError, match="not byte-level"):
        ByteOffsets(tok)


def test_encode_with_spans_batch_overflow_and_errors(tokenizer, offsets) -> None:
    texts = ["abc def", "a", "abcdefghij" * 5]
    spans = [{"x": (0, len(t))} for t in texts]
    batch = encode_with_spans(tokenizer, offsets, texts, spans, max_length=6)
    assert batch.overflow.tolist() == [False, False, True]
    assert batch.input_ids.shape[1] == 6
    assert not batch.masks["x"][2].any() and batch.masks["x"][0].any()
    assert batch.lengths.tolist()[1] == 1
    with pytest.raises(ValueError, match="span dicts"):
        encode_with_spans(tokenizer, offsets, texts, spans[:2])
    # a normaliser that rewrites the text (NFC composes e + combining acute) is reported, not silently misaligned
    with pytest.raises(ValueError, match="NFC"):
        encode_with_spans(tokenizer, offsets, ["cafe\u0301"], [{"x": (0, 5)}])
    packed, pmask = pack_masked(batch.input_ids, batch.masks["x"])
    assert pmask.sum().item() == batch.masks["x"].sum().item()
