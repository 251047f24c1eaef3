"""RLTScorer against a per-sample float64 reference of the authors' loop (SakanaAI/RLT), plus P5 alignment, the
sampled-id path (P3, P17), overflow and chunking."""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch

from rlt_pl.formats import CompactFormat, StratosFormat
from rlt_pl.generation import HFGenerationEngine, SamplingConfig
from rlt_pl.rewards import RewardConfig
from rlt_pl.scoring import RLTScorer, causal_logprobs, teacher_logprobs_from_policy

T = 0.7  # teacher and student temperature (paper defaults)
WORDS = "we add the digits then carry so the answer is 5 . , check 12 + 30 = 42 first".split()


# ----------------------------------------------------------------------------------------------------------------------
# Reference: one completion at a time, strings rendered as in SakanaAI/RLT / §2.2, spans by character offsets,
# float64 forwards, python-float reductions (SakanaAI/RLT). Independent of rlt_pl.formats / spans / scoring.


class RefStrings:
    """Authors'-style string building for one format."""

    def __init__(self, kind: str, tokenizer=None) -> None:
        self.kind, self.tok = kind, tokenizer
        if kind == "stratos":
            fmt = StratosFormat()
            self.t_sys, self.s_sys = fmt.teacher_system_prompt, fmt.student_system_prompt
            self.start, self.end = "<|begin_of_explanation|>", "<|end_of_explanation|>"
            self.prefix = self.start + "\n\n"
        else:
            self.start, self.end, self.prefix = "<E>", "</E>", "<E>"

    def chat(self, system: str, user: str, assistant: str) -> str:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        msgs.append({"role": "assistant", "content": assistant})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)

    def rl_prompt(self, q: str, s: str) -> str:
        if self.kind == "compact":
            return "<Q>" + q + "<S>" + s + "<E>"
        divider = "<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"
        full = self.chat(self.t_sys, q, "<|begin_of_solution|>" + s + divider + "x<|end_of_explanation|>")
        head, _ = full.split(divider)
        return head + divider

    def student(self, q: str, e: str, s: str) -> tuple[str, int, int]:
        """Student text and the char offsets of the explanation and solution contents."""
        if self.kind == "compact":
            text = "<Q>" + q + "<T>" + e + "</T><A>" + s + "</A>"
            a = len("<Q>" + q + "<T>")
            return text, a, a + len(e + "</T><A>")
        assistant = (
            "<|begin_of_thought|>" + e + "<|end_of_thought|>\n\n<|begin_of_solution|>" + s + "<|end_of_solution|>"
        )
        text = self.chat(self.s_sys, q, assistant)
        a = text.rfind(assistant) + len("<|begin_of_thought|>")
        return text, a, a + len(e + "<|end_of_thought|>\n\n<|begin_of_solution|>")


def ref_token_logprobs(model64, tokenizer, text: str, spans: list[tuple[int, int]]) -> list[tuple[list, list]]:
    """Per char span [lo, hi): ids and float64 log softmax(z / T) of the tokens whose char range lies inside."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits / T, dim=-1)
    out = []
    for lo, hi in spans:
        inside = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if j > 0 and lo <= a and b <= hi and b > a]
        out.append(([ids[j] for j in inside], [float(lp[j - 1, ids[j]]) for j in inside]))
    return out


def ref_reduce(vals: list[float], coeffs: tuple[float, float], hows: tuple[str, str], fill: float) -> float:
    total = 0.0
    for c, how in zip(coeffs, hows):
        if not vals:
            v = fill
        elif how == "mean":
            v = sum(vals) / len(vals)
        else:
            v = min(vals) if how == "min" else max(vals)
        total += c * v
    return total


def ref_reward(ref: RefStrings, teacher64, student64, q: str, s: str, c: str) -> tuple[float, float, float, bool]:
    """(reward, rss, rkl, matched) of one completion, the authors' way."""
    tok = ref.tok
    p = ref.rl_prompt(q, s)
    p0 = p[: len(p) - len(ref.prefix)]
    c1 = ref.prefix + c
    pattern = re.escape(ref.start) + "(.*?)" + re.escape(ref.end)
    m = re.search(pattern, c1, flags=re.DOTALL)
    match = 0.0
    if m is None:
        match, c1 = -1.0, c1 + ref.end
        m = re.search(pattern, c1, flags=re.DOTALL)
    e = m.group(1)
    x_t = p0 + c1
    a_t = len(p0) + len(ref.start)
    [(t_ids, l_t)] = ref_token_logprobs(teacher64, tok, x_t, [(a_t, a_t + len(e))])
    x_s, a_e, a_s = ref.student(q, e, s)
    (s_ids, l_s), (_, l_sol) = ref_token_logprobs(student64, tok, x_s, [(a_e, a_e + len(e)), (a_s, a_s + len(s))])
    assert t_ids == s_ids, "reference inputs must tokenize the explanation identically on both sides"
    rss = ref_reduce([max(v, -1e5) for v in l_sol], (1.0, 0.01), ("mean", "min"), -1.0)
    d = [min(a - b, 1e5) for a, b in zip(l_t, l_s)]
    rkl = ref_reduce(d, (3.0, 0.03), ("mean", "max"), 1.0)
    return rss - rkl + match, rss, rkl, match == 0.0


def make_rows(kind: str, n: int, max_words: int) -> tuple[list[str], list[str], list[str]]:
    """Questions, solutions and completions of varied lengths: closed, unclosed, empty, text after the end tag."""
    rng = random.Random(0)
    end = "<|end_of_explanation|>" if kind == "stratos" else "</E>"
    pad = "\n\n" if kind == "stratos" else ""
    qs, ss, cs = [], [], []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        qs.append(f"what is {a} + {b}?")
        ss.append(f"{pad}{a + b}{pad}")
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max(1, max_words * i // n))))
        body = body.replace(" .", ".") + pad
        variant = i % 6
        if variant == 0:
            cs.append(body + end)
        elif variant == 1:
            cs.append(body)  # never closed
        elif variant == 2:
            cs.append("" if i % 12 == 2 else end)  # empty, unclosed or closed
        elif variant == 3:
            cs.append(body + end + " after the tag " + body[:10])
        elif variant == 4:
            cs.append(body + end + end)
        else:
            cs.append(body[: rng.randint(0, len(body))])
    return qs, ss, cs


@pytest.fixture(scope="module")
def compact_assets(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlt_pl.tiny import build_compact_assets

    dirs = build_compact_assets(tmp_path_factory.mktemp("compact"), CompactFormat().tag_tokens())
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(dirs["teacher"]),
        "teacher": load(dirs["teacher"]),
        "student": load(dirs["student"]),
    }


def setup_kind(kind: str, request) -> tuple:
    if kind == "stratos":
        tok = request.getfixturevalue("tokenizer")
        return tok, request.getfixturevalue("teacher_model"), request.getfixturevalue("student_model"), StratosFormat()
    assets = request.getfixturevalue("compact_assets")
    return assets["tokenizer"], assets["teacher"], assets["student"], CompactFormat()


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_logprobs_index_alignment(teacher_model, side: str) -> None:
    """P5/P12: batched, padded, chunked log-probs equal a per-sequence gather of log p(tok_j | <j)."""
    gen = torch.Generator().manual_seed(0)
    vocab = teacher_model.config.vocab_size
    lengths = [1, 3, 17, 9, 30, 2]
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], attn[i, cols] = s, 1
    for budget in (None, 40):
        out = causal_logprobs(teacher_model, ids, attn, temperature=T, token_budget=budget)
        assert out.shape == ids.shape
        assert torch.all(out[attn == 0] == 0)
        for i, s in enumerate(seqs):
            with torch.no_grad():
                logits = teacher_model(input_ids=s[None]).logits[0].double()
            lp = torch.log_softmax(logits / T, dim=-1)
            expected = [0.0] + [float(lp[j - 1, s[j]]) for j in range(1, len(s))]
            got = out[i][attn[i].bool()].double()
            torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "n"), [("stratos", 12), ("compact", 32)])
def test_batched_reward_matches_per_sample_reference(kind: str, n: int, request) -> None:
    """Stratos: the paper's strings (long system prompts, so fewer rows); compact: many rows, empty spans."""
    tok, teacher, student, fmt = setup_kind(kind, request)
    qs, ss, cs = make_rows(kind, n, max_words=24)
    prompts = [fmt.teacher_prompt(q, s, tok) for q, s in zip(qs, ss)]
    scorer = RLTScorer(student, tok, fmt, RewardConfig(penalty_margin=None))  # the authors' fixed fills (parity)
    res = scorer.score(qs, ss, cs, teacher_model=teacher, prompts=prompts)

    ref = RefStrings(kind, tok)
    assert prompts == [ref.rl_prompt(q, s) for q, s in zip(qs, ss)]
    t64, s64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    rows = [ref_reward(ref, t64, s64, q, s, c) for q, s, c in zip(qs, ss, cs)]
    expected = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(res.output.reward.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.output.rss.double(), torch.tensor([r[1] for r in rows]).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.output.rkl.double(), torch.tensor([r[2] for r in rows]).double(), atol=1e-5, rtol=0)
    assert res.matched.tolist() == [r[3] for r in rows]
    assert res.counts["unmatched"] == sum(not r[3] for r in rows) > 0
    assert res.counts["overflow"] == 0 and res.counts["token_mismatch"] == 0
    if kind == "compact":  # "</E>" alone: empty explanation -> rKL NaN fill (+1 per coefficient unit)
        empty = [i for i, c in enumerate(cs) if c == "</E>"]
        assert empty and all(float(res.output.rkl[i]) == pytest.approx(3.03) for i in empty)


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def test_sampled_id_path(tokenizer, teacher_model, student_model) -> None:
    """P3/P17: policy log-probs over sampled ids equal the text path on canonical rows; others are counted."""
    fmt = StratosFormat()
    qs = [f"what is {a} + 7?" for a in range(2)]
    ss = [f"\n\n{a + 7}\n\n" for a in range(2)]
    prompts = [fmt.teacher_prompt(q, s, tokenizer) for q, s in zip(qs, ss)]
    torch.manual_seed(0)
    out = HFGenerationEngine().generate(teacher_model, tokenizer, prompts, 3, SamplingConfig(max_new_tokens=5))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_rows = [r[m.bool()].tolist() for r, m in zip(out.prompt_ids, out.prompt_mask)]
    comp_rows = [r[m.bool()].tolist() for r, m in zip(out.completion_ids, out.completion_mask)]
    row_q = [qs[i // 3] for i in range(len(out))]
    row_s = [ss[i // 3] for i in range(len(out))]
    row_p = [prompts[i // 3] for i in range(len(out))]
    # hand-built rows: canonical, and the same text with one merged token split into its two bytes
    p_ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    for text in ["we add the digits <|end_of_explanation|>", "we add the digits"]:
        canon = tokenizer(text, add_special_tokens=False)["input_ids"]
        multi = next(j for j, t in enumerate(canon) if len(tokenizer.convert_ids_to_tokens(t)) == 2)
        halves = tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(canon[multi])))
        split = canon[:multi] + halves + canon[multi + 1 :]
        for ids in (canon, split):
            prompt_rows.append(p_ids)
            comp_rows.append(ids + [eos])
            row_q.append(qs[0])
            row_s.append(ss[0])
            row_p.append(prompts[0])
    texts = tokenizer.batch_decode(comp_rows, skip_special_tokens=True)
    assert texts[-2] == texts[-1] == "we add the digits"

    prompt_ids, prompt_mask = _pad(prompt_rows, pad, left=True)
    comp_ids, comp_mask = _pad(comp_rows, pad, left=False)
    lp = causal_logprobs(
        teacher_model, torch.cat([prompt_ids, comp_ids], 1), torch.cat([prompt_mask, comp_mask], 1), temperature=T
    )
    tt = teacher_logprobs_from_policy(
        fmt, ByteOffsetsOf(tokenizer), prompt_ids, prompt_mask, comp_ids, comp_mask, texts, lp
    )

    # canonical: re-encoding the teacher context reproduces the sampled ids (special tokens dropped)
    special = set(tokenizer.all_special_ids)
    canonical = []
    for p, c, prow, crow in zip(row_p, texts, prompt_rows, comp_rows):
        parsed = fmt.parse_completion(c)
        full = tokenizer(p + c + ("" if parsed.matched else fmt.explanation_end), add_special_tokens=False)
        sampled = prow + [t for t in crow if t not in special]
        canonical.append(full["input_ids"][: len(sampled)] == sampled)
    assert canonical[-4:] == [True, False, True, False]

    scorer = RLTScorer(student_model, tokenizer, fmt, RewardConfig(penalty_margin=None))  # per-row, no group floor
    text_path = scorer.score(row_q, row_s, texts, teacher_model=teacher_model, prompts=row_p)
    sampled = scorer.score(row_q, row_s, texts, teacher_tokens=tt)
    mixed = scorer.score(row_q, row_s, texts, teacher_tokens=tt, teacher_model=teacher_model, prompts=row_p)
    n_bad = canonical.count(False)
    assert sampled.counts["token_mismatch"] == n_bad == mixed.counts["token_mismatch"]
    assert sampled.counts["token_mismatch_unresolved"] == n_bad
    assert mixed.counts["token_mismatch_unresolved"] == 0
    good = torch.tensor(canonical)
    torch.testing.assert_close(sampled.output.reward[good], text_path.output.reward[good], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.output.reward, text_path.output.reward, atol=1e-5, rtol=0)
    # the split row is scored on the common prefix only: it must differ from the text path
    assert not torch.isclose(sampled.output.reward[-1], text_path.output.reward[-1], atol=1e-5)


def ByteOffsetsOf(tokenizer):  # noqa: N802 - reads like the class it builds
    from rlt_pl.spans import ByteOffsets

    return ByteOffsets(tokenizer)


@pytest.mark.parametrize(("kind", "n"), [("stratos", 4), ("compact", 16)])
def test_overflow_rows_are_counted_and_penalised(kind: str, n: int, request) -> None:
    tokenizer, teacher_model, student_model, fmt = setup_kind(kind, request)
    qs, ss, cs = make_rows(kind, n, max_words=30)
    prompts = [fmt.teacher_prompt(q, s, tokenizer) for q, s in zip(qs, ss)]
    full = RLTScorer(student_model, tokenizer, fmt).score(qs, ss, cs, teacher_model=teacher_model, prompts=prompts)
    lengths = [
        len(tokenizer(fmt.student_text(q, e, s, tokenizer).text, add_special_tokens=False)["input_ids"])
        for q, s, e in zip(qs, ss, full.explanations)
    ]
    limit = sorted(lengths)[len(lengths) // 2]
    short = RLTScorer(student_model, tokenizer, fmt, max_length=limit)
    res = short.score(qs, ss, cs, teacher_model=teacher_model, prompts=prompts)
    # the teacher forward is bounded by the same limit: a row whose teacher context is longer overflows too
    t_lengths = [
        len(tokenizer(fmt.teacher_scoring_text(p, c).text, add_special_tokens=False)["input_ids"])
        for p, c in zip(prompts, cs)
    ]
    over = torch.tensor([a > limit or b > limit for a, b in zip(lengths, t_lengths)])
    assert res.output.components["overflow"].bool().tolist() == over.tolist()
    assert res.counts["overflow"] == int(over.sum()) > 0
    assert res.counts["token_mismatch"] == 0
    penalty = -1.01 - 3.03 + res.output.match  # rSS and rKL NaN fills, before the group floor
    s_over = torch.tensor([a > limit for a in lengths])  # student context cut: both fills
    torch.testing.assert_close(res.output.components["reward_unpenalised"][s_over], penalty[s_over])
    pen = res.output.components["penalised"].bool()
    assert bool(pen[over].all()) and float(res.output.reward[pen].max()) <= float(res.output.reward[~pen].min()) - 1
    regular = ~over & ~full.output.components["penalised"].bool()
    torch.testing.assert_close(res.output.reward[regular], full.output.reward[regular], atol=1e-5, rtol=0)
    assert torch.isfinite(res.output.reward).all()


def test_chunked_scoring_equals_one_chunk(compact_assets) -> None:
    tokenizer, teacher_model, student_model = (compact_assets[k] for k in ("tokenizer", "teacher", "student"))
    fmt = CompactFormat()
    qs, ss, cs = make_rows("compact", 16, max_words=30)
    prompts = [fmt.teacher_prompt(q, s, tokenizer) for q, s in zip(qs, ss)]
    one = RLTScorer(student_model, tokenizer, fmt, token_budget=10**7)
    many = RLTScorer(student_model, tokenizer, fmt, token_budget=300)  # several chunks, some of a single row
    a = one.score(qs, ss, cs, teacher_model=teacher_model, prompts=prompts)
    b = many.score(qs, ss, cs, teacher_model=teacher_model, prompts=prompts)
    longest = max(
        len(tokenizer(fmt.student_text(q, e, s).text)["input_ids"]) for q, s, e in zip(qs, ss, a.explanations)
    )
    assert 300 < 16 * longest  # the budget really splits the batch
    torch.testing.assert_close(a.output.reward, b.output.reward, atol=1e-6, rtol=0)
    for key in ("rss/mean", "rss/min", "rkl/mean", "rkl/max"):
        torch.testing.assert_close(a.output.components[key], b.output.components[key], atol=1e-6, rtol=0)


def test_score_input_errors(tokenizer, student_model) -> None:
    scorer = RLTScorer(student_model, tokenizer, StratosFormat())
    with pytest.raises(ValueError, match="questions"):
        scorer.score(["q"], ["s", "t"], ["c"])
    with pytest.raises(ValueError, match="teacher"):
        scorer.score(["q"], ["s"], ["c"])


def test_special_token_inside_explanation_takes_the_text_path(tokenizer, teacher_model, student_model) -> None:
    """A special token sampled inside the explanation is dropped from the decoded text, so the sampled teacher
    log-probs (conditioned on it) differ from the text path's: the row is a token mismatch and is re-scored."""
    fmt = StratosFormat()
    q, s = "what is 5 + 7?", "\n\n12\n\n"
    prompt = fmt.teacher_prompt(q, s, tokenizer)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    inner = next(i for i in tokenizer.all_special_ids if i != eos)
    head = tokenizer("we add the", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" digits <|end_of_explanation|>", add_special_tokens=False)["input_ids"]
    comp_rows = [head + tail + [eos], head + [inner] + tail + [eos], head + tail + [inner, eos]]
    texts = tokenizer.batch_decode(comp_rows, skip_special_tokens=True)
    assert len(set(texts)) == 1  # the special token vanishes from the decoded text
    prompt_ids, prompt_mask = _pad([p_ids] * 3, pad, left=True)
    comp_ids, comp_mask = _pad(comp_rows, pad, left=False)
    lp = causal_logprobs(
        teacher_model, torch.cat([prompt_ids, comp_ids], 1), torch.cat([prompt_mask, comp_mask], 1), temperature=T
    )
    tt = teacher_logprobs_from_policy(
        fmt, ByteOffsetsOf(tokenizer), prompt_ids, prompt_mask, comp_ids, comp_mask, texts, lp
    )
    assert tt.mismatch.tolist() == [False, True, False]  # after the explanation it conditions nothing scored
    scorer = RLTScorer(student_model, tokenizer, fmt, RewardConfig(penalty_margin=None))
    qs, ss, ps = [q] * 3, [s] * 3, [prompt] * 3
    text_path = scorer.score(qs, ss, texts, teacher_model=teacher_model, prompts=ps)
    mixed = scorer.score(qs, ss, texts, teacher_tokens=tt, teacher_model=teacher_model, prompts=ps)
    assert mixed.counts["token_mismatch"] == 1 and mixed.counts["token_mismatch_unresolved"] == 0
    torch.testing.assert_close(mixed.output.reward, text_path.output.reward, atol=1e-6, rtol=0)
    # the sampled log-probs really differ: used as they are, the reward would depart from the text path
    sampled_lp = tt.logprobs[1][tt.mask[1]]
    assert not torch.allclose(sampled_lp, tt.logprobs[0][tt.mask[0]], atol=1e-4)
