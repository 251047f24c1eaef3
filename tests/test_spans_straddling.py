"""Spans and rewards with tokens that straddle a tag boundary (P4).

The tiny tokenizer's pre-tokenizer never lets a merge cross a tag, so these tests build a byte-level BPE with no
pre-tokenizer split and three hand-written merges that do: `>` glued to the newline after a tag, `x` glued to the
`<` of a closing tag, and a newline glued to that `<`. By the documented rule (rlt_pl.spans), a straddling token
belongs to neither side; the expected spans below are written out by hand from that rule.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from rlt_pl.formats import StratosFormat
from rlt_pl.rewards import RewardConfig
from rlt_pl.scoring import RLTScorer, causal_logprobs, teacher_logprobs_from_policy
from rlt_pl.spans import ByteOffsets, encode_with_spans
from rlt_pl.tiny import CHAT_SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN, qwen25_chat_template, tiny_qwen2_config

T = 0.7
FMT = StratosFormat()
Q = "What is 12 + 30?"
S = "\n\n42\n\n"
COMPLETION = "we add x<|end_of_explanation|>"
NL, SP = "Ċ", "Ġ"  # the byte-level spellings of "\n" and " "
MERGES = [(">", NL), ("x", "<"), (NL, "<")]


@pytest.fixture(scope="module")
def straddling_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges cross tag boundaries (no regex split: a merge may join anything)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in CHAT_SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
    )
    fast.chat_template = qwen25_chat_template()
    return fast


@pytest.fixture(scope="module")
def models_(straddling_tokenizer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Random tiny teacher (hidden 32) and student (hidden 24) over the straddling vocabulary."""
    out = []
    for seed, hidden in ((0, 32), (1, 24)):
        torch.manual_seed(seed)
        out.append(Qwen2ForCausalLM(tiny_qwen2_config(straddling_tokenizer, hidden_size=hidden, num_heads=2)).eval())
    return out[0], out[1]


def tokens_of(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def find_run(tokens: list[str], run: list[str]) -> int:
    """Index of the only occurrence of `run` in `tokens`."""
    hits = [i for i in range(len(tokens) - len(run) + 1) if tokens[i : i + len(run)] == run]
    assert len(hits) == 1, (run, hits)
    return hits[0]


def masked(batch, name: str) -> list[int]:
    return batch.masks[name][0].nonzero().squeeze(-1).tolist()


# hand-derived from the rule: the straddling tokens around each span are dropped, everything strictly inside kept
EXPL_TOKENS = [NL, "w", "e", SP, "a", "d", "d", SP]  # "\n\nwe add x" minus ">\n" (start) and "x<" (end)
EXPL_RUN = [">" + NL] + EXPL_TOKENS + ["x<"]
SOL_RUN = [">" + NL, NL, "4", "2", NL, NL + "<"]  # "\n\n42\n\n": ">\n" and "\n<" straddle, "\n42\n" inside


def test_merges_cross_the_tags(straddling_tokenizer) -> None:
    """The premise: in the rendered student text the tag boundaries really fall inside tokens."""
    tok = straddling_tokenizer
    text = FMT.student_text(Q, FMT.parse_completion(COMPLETION).explanation, S, tok).text
    tokens = tokens_of(tok, text)
    find_run(tokens, ["g", "h", "t", "|"] + EXPL_RUN + ["|", "e", "n", "d", "_", "o", "f", "_", "t"])
    find_run(tokens, ["n", "|"] + SOL_RUN + ["|", "e", "n", "d", "_", "o", "f", "_", "s"])
    assert "".join(tok.decode(i) for i in tok(text, add_special_tokens=False)["input_ids"]) == text


def test_straddling_tokens_belong_to_neither_span(straddling_tokenizer) -> None:
    """Student and teacher texts: each span's mask is exactly the hand-listed positions, on both sides."""
    tok = straddling_tokenizer
    offsets = ByteOffsets(tok)
    expl = FMT.parse_completion(COMPLETION).explanation
    assert expl == "\n\nwe add x"
    student = FMT.student_text(Q, expl, S, tok)
    batch = encode_with_spans(tok, offsets, [student.text], [student.spans])
    tokens = tok.convert_ids_to_tokens(batch.input_ids[0].tolist())
    e = find_run(tokens, EXPL_RUN) + 1
    assert masked(batch, "explanation") == list(range(e, e + len(EXPL_TOKENS)))
    s = find_run(tokens, SOL_RUN) + 1
    assert masked(batch, "solution") == list(range(s, s + 4))
    assert [tokens[j] for j in masked(batch, "solution")] == [NL, "4", "2", NL]

    prompt = FMT.teacher_prompt(Q, S, tok)
    teacher = FMT.teacher_scoring_text(prompt, COMPLETION)
    tbatch = encode_with_spans(tok, offsets, [teacher.text], [teacher.spans])
    ttokens = tok.convert_ids_to_tokens(tbatch.input_ids[0].tolist())
    t = find_run(ttokens, EXPL_RUN) + 1
    assert masked(tbatch, "explanation") == list(range(t, t + len(EXPL_TOKENS)))
    # both sides hold the same explanation ids (no mismatch to count)
    s_ids = batch.input_ids[0][batch.masks["explanation"][0]].tolist()
    assert tbatch.input_ids[0][tbatch.masks["explanation"][0]].tolist() == s_ids


def _hand_reward(straddling_tokenizer, teacher, student) -> tuple[float, float, float]:
    """(reward, rSS, rKL) by hand: plain forwards, the hand-listed positions, the paper's reductions and weights."""
    tok = straddling_tokenizer

    def logprobs(model, text: str) -> tuple[list[str], torch.Tensor]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model.double()(input_ids=torch.tensor([ids])).logits[0]
        model.float()
        lp = torch.log_softmax(logits / T, -1)
        # lp of token j given its prefix: row j - 1
        return tok.convert_ids_to_tokens(ids), torch.stack([lp[j - 1, ids[j]] for j in range(1, len(ids))])

    s_tokens, s_lp = logprobs(student, FMT.student_text(Q, "\n\nwe add x", S, tok).text)
    t_tokens, t_lp = logprobs(teacher, FMT.teacher_prompt(Q, S, tok) + COMPLETION)
    e, s = find_run(s_tokens, EXPL_RUN) + 1, find_run(s_tokens, SOL_RUN) + 1
    t = find_run(t_tokens, EXPL_RUN) + 1
    sol = s_lp[s - 1 : s - 1 + 4]
    d = t_lp[t - 1 : t - 1 + len(EXPL_TOKENS)] - s_lp[e - 1 : e - 1 + len(EXPL_TOKENS)]
    rss = float(sol.mean() + 0.01 * sol.min())
    rkl = float(3.0 * d.mean() + 0.03 * d.max())
    return rss - rkl, rss, rkl


def test_reward_with_straddling_tokens_equals_hand_computation(straddling_tokenizer, models_) -> None:
    """Text path and sampled-id path both equal the hand computation over the hand-listed positions."""
    tok = straddling_tokenizer
    teacher, student = models_
    reward, rss, rkl = _hand_reward(tok, teacher, student)
    prompt = FMT.teacher_prompt(Q, S, tok)
    scorer = RLTScorer(student, tok, FMT, RewardConfig())
    text = scorer.score([Q], [S], [COMPLETION], teacher_model=teacher, prompts=[prompt])
    assert text.output.reward.item() == pytest.approx(reward, abs=1e-4)
    assert text.output.rss.item() == pytest.approx(rss, abs=1e-4)
    assert text.output.rkl.item() == pytest.approx(rkl, abs=1e-4)
    assert text.counts["token_mismatch"] == 0 and text.counts["penalised"] == 0
    assert int(text.tokens.explanation_mask.sum()) == len(EXPL_TOKENS)
    assert int(text.tokens.solution.mask.sum()) == 4

    # sampled path: the prompt and the completion tokenized apart, as generation produces them
    p_ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    c_ids = torch.tensor([tok(COMPLETION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    assert tok.convert_ids_to_tokens(p_ids[0, -2:].tolist()) == [">" + NL, NL]  # the padding's first byte straddles
    assert "x<" in tok.convert_ids_to_tokens(c_ids[0].tolist())
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.ones(1, p_ids.shape[1] + c_ids.shape[1], dtype=torch.long)
    lp = causal_logprobs(teacher, ids, mask, temperature=T)
    completions = tok.batch_decode(c_ids, skip_special_tokens=True)
    tt = teacher_logprobs_from_policy(
        FMT, scorer.offsets, p_ids, torch.ones_like(p_ids), c_ids, torch.ones_like(c_ids), completions, lp
    )
    assert tok.convert_ids_to_tokens(tt.ids[0][tt.mask[0]].tolist()) == EXPL_TOKENS
    sampled = scorer.score([Q], [S], completions, teacher_tokens=tt)
    assert sampled.counts["token_mismatch"] == 0
    assert sampled.output.reward.item() == pytest.approx(reward, abs=1e-4)
