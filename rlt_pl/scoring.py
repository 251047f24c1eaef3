"""Batched RLT scoring: from questions, solutions and teacher completions to rSS / rKL rewards.

`RLTScorer` owns the frozen student. For a whole generation batch it renders the student contexts (SakanaAI/RLT),
tokenizes them once with exact spans (`rlt_pl.spans`), runs one right-padded student forward chunked by a token
budget (no left-padding position shift, P12), and packs the solution and explanation log-probs for
`rlt_pl.rewards.rlt_reward`.

Teacher log-probs come from one of two places:
- *sampled path* (training): the policy forward GRPO already runs over the sampled ids
  (`teacher_logprobs_from_policy`), so the reward adds no teacher forward (P17);
- *text path* (parity, offline scoring): the teacher context `prompt + completion` is re-encoded and the teacher
  model is run (as the authors do, P3).
Rows whose sampled explanation tokens differ from the student-side tokenization (non-canonical BPE) are re-scored
on the text path when a teacher model is available, else scored on their longest common prefix; both are counted.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlt_pl.distributed import pad_forward_calls
from rlt_pl.formats import RLTFormat
from rlt_pl.grpo import token_entropy
from rlt_pl.rewards import (
    RewardConfig,
    RewardOutput,
    pack_masked,
    penalise_below_group,
    rlt_reward,
    token_logprobs,
)
from rlt_pl.spans import ByteOffsets, completion_explanation_mask, encode_with_spans, suffix_span_mask

SHARED_PREFIX_MIN = 16  # shortest common prefix (tokens) that causal_logprobs runs once per chunk, not per row
SHARED_PREFIX_SAVING = 0.1  # ... and only when that saves this fraction of the chunk's tokens (else one more forward)


@dataclass
class PackedTokens:
    """Left-aligned per-row token ids and log-probs of one span: each [B, K]."""

    ids: Tensor
    logprobs: Tensor
    mask: Tensor
    overflow: Tensor | None = None  # [B] bool: rows cut at the scorer's max_length (text path)
    mismatch: Tensor | None = None  # [B] bool: rows known to differ from the text path (sampled path)


@dataclass
class TokenScores:
    """The per-token terms behind a reward (for inspection): the student's solution tokens with their log-probs, and
    the explanation's token ids with teacher and student log-probs over `explanation_mask` (rKL term: teacher −
    student). Tensors are [B, K], left-aligned; `explanation_ids` are the student-side tokens."""

    solution: PackedTokens
    explanation_ids: Tensor
    teacher_logprobs: Tensor
    student_logprobs: Tensor
    explanation_mask: Tensor


@dataclass
class ScoreResult:
    """Reward output plus per-batch counters, the parsed explanations and the per-token terms."""

    output: RewardOutput
    explanations: list[str]
    matched: Tensor  # [B] bool
    counts: dict[str, int] = field(default_factory=dict)
    tokens: TokenScores | None = None


@torch.no_grad()
def causal_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    token_budget: int | None = None,
    last_n: int | None = None,
    share_prefix: bool = False,
) -> Tensor:
    """Token-aligned log-probs `out[:, j] = log p(x_j | x_<j)` (0 at j = 0 and at padding), chunked by tokens.

    Left, right and both-side padding are exact (P12). Rows are grouped by length so each chunk holds at most
    `token_budget` tokens (rows × padded width); padding columns are trimmed. A chunk whose rows are each one run of
    real tokens (every batch rlt_pl builds) is shifted so each run starts at column 0 and runs with neither attention
    mask nor position ids (see `_Chunk`); only a mask with holes takes the masked forward.
    With `last_n`, only the last `last_n` columns are scored (the LM head runs on those alone, via
    `logits_to_keep`): GRPO needs the completion, not a long prompt's `[P, V]` logits.
    With `share_prefix`, a chunk whose rows start with the same `SHARED_PREFIX_MIN`+ tokens (a GRPO group's prompt,
    the student's system prompt + question) runs that prefix once and reuses its KV cache for every row. This is a
    no-grad function, so the cache is built even for a model under gradient checkpointing; a model that returns
    none falls back to the plain forward.
    """
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True).tolist()
    budget = token_budget or input_ids.numel()
    chunks, i = [], 0
    while i < len(order):
        width = int(lengths[order[i]]) or 1
        rows = order[i : i + max(1, budget // width)]
        i += len(rows)
        keep = attention_mask[rows].any(0).nonzero().squeeze(-1)  # trim all-padding columns (either side)
        lo, hi = int(keep.min()) if keep.numel() else 0, int(keep.max()) + 1 if keep.numel() else 1
        k = hi - max(lo, input_ids.shape[1] - last_n) if last_n is not None else hi - lo
        if k > 0:
            chunks.append(_Chunk(rows, lo, hi, k, input_ids[rows, lo:hi], attention_mask[rows, lo:hi], share_prefix))
    pad_forward_calls(model, sum(c.forwards for c in chunks))  # sharded: the busiest rank's count (agreed first)
    for c in chunks:
        prev = torch.nn.functional.pad(c.attn[:, :-1], (1, 0))  # a row's first real token has no context: 0
        lp = c.logprobs(model, temperature)
        out[c.rows, c.hi - c.k : c.hi] = (lp * c.attn[:, -c.k :] * prev[:, -c.k :]).float()
    return out


class _Chunk:
    """One forward's rows of `causal_logprobs`: columns `[lo, hi)`, the last `k` scored.

    When every row is one run of real tokens (`contiguous_lead`), each row is shifted left by its leading padding, so
    the chunk is real tokens then padding and the model runs with neither attention mask nor position ids: under
    causal attention a real token never sees the padding after it, and default positions equal the mask's. Both
    arguments would make transformers build and apply a `[B, 1, L, L]` mask (position ids that stop increasing in
    the padding read as packed sequences), which on CPU costs ~2.5x in attention. The scored window is widened to
    cover every row's shifted columns, then mapped back. `prefix` > 0: the shifted rows share that many leading
    tokens, run once (`_prefix_shared_logprobs`)."""

    def __init__(self, rows: list[int], lo: int, hi: int, k: int, ids: Tensor, attn: Tensor, share: bool) -> None:
        self.rows, self.lo, self.hi, self.k, self.ids, self.attn = rows, lo, hi, k, ids, attn
        self.lead = contiguous_lead(attn)
        self.prefix = 0
        if self.lead is not None:
            width = ids.shape[1]
            length = attn.sum(-1)
            self.cols = torch.arange(width, device=ids.device)
            self.width = max(int(length.max()), 1)  # shifted width
            self.shifted = shift_to_front(ids, self.lead)[:, : self.width]
            self.kr = self.width - int((width - k - self.lead).clamp(min=0).min())  # scored columns, shifted
            if share:
                real = self.cols[: self.width] < length[:, None]
                self.prefix = _shared_prefix(self.shifted, real, self.width - self.kr)

    @property
    def forwards(self) -> int:
        return 1 + (self.prefix > 0)

    def logprobs(self, model: torch.nn.Module, temperature: float) -> Tensor:
        """[rows, k] log-probs of the chunk's last k columns (garbage at padding: the caller masks)."""
        if self.lead is None:  # a row with holes in its mask: the masked forward, positions from the mask
            return _masked_logprobs(model, self.ids, self.attn, self.k, temperature)[0]
        ids, w, kr = self.shifted, self.width, self.kr
        lp = _prefix_shared_logprobs(model, ids, self.prefix, kr, temperature) if self.prefix > 0 else None
        if lp is None:  # no shared prefix, or the model returned no KV cache (then the prefix forward is wasted)
            # use_cache=False: a scoring forward has no next step, a KV cache would be built (and held) for nothing
            if kr < w:
                logits = model(input_ids=ids, logits_to_keep=kr + 1, use_cache=False).logits
                lp = token_logprobs(logits, ids[:, -(kr + 1) :], temperature)[:, 1:]
            else:
                lp = token_logprobs(model(input_ids=ids, use_cache=False).logits, ids, temperature)
        full = torch.nn.functional.pad(lp, (w - kr, 0))  # [rows, w], shifted columns
        back = (self.cols[self.ids.shape[1] - self.k :] - self.lead[:, None]).clamp(0, w - 1)
        return full.gather(1, back)


def shift_to_front(ids: Tensor, lead: Tensor) -> Tensor:
    """Each row shifted left by its `lead` [B] (its leading padding); the freed tail repeats the row's last column
    (padding the caller masks). With `contiguous_lead`, every row becomes real tokens then padding."""
    cols = torch.arange(ids.shape[1], device=ids.device)
    return ids.gather(1, (cols + lead[:, None]).clamp(max=ids.shape[1] - 1))


def contiguous_lead(attention_mask: Tensor) -> Tensor | None:
    """[B] leading padding columns per row when each row's real tokens form one run (left, right or both-side
    padding: a GRPO batch is `[left-padded prompt ‖ right-padded completion]`); None when some row has a hole."""
    width = attention_mask.shape[1]
    real = attention_mask.bool()
    lead = real.int().argmax(-1)
    last = width - 1 - real.flip(-1).int().argmax(-1)
    length = real.sum(-1)
    ok = (length == 0) | (last - lead + 1 == length)
    return lead if bool(ok.all()) else None


def _masked_logprobs(
    model: torch.nn.Module, ids: Tensor, attn: Tensor, k: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Log-probs of the last `k` columns with the attention mask and mask-derived positions, and the logits they
    came from (`[b, k + 1, V]`; `[b, k, V]` when k spans the whole width)."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    # use_cache=False: no KV cache is built (and kept alive until backward) for a forward that has no next step
    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    if k < ids.shape[1]:
        logits = model(**kw, logits_to_keep=k + 1).logits
        return token_logprobs(logits, ids[:, -(k + 1) :], temperature)[:, 1:], logits
    logits = model(**kw).logits
    return token_logprobs(logits, ids, temperature), logits


def completion_logprobs(
    model: torch.nn.Module, ids: Tensor, attn: Tensor, prompt_cols: int, temperature: float, entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Differentiable log-probs (GRPO's loss forward) of the completion columns `[prompt_cols, W)` of
    `[prompt ‖ completion]` rows, and their logged-only entropy when `entropy`. Both `[b, W - prompt_cols]`.

    Rows are shifted so each starts at column 0 and the model runs with neither attention mask nor position ids
    (exact under causal attention; either argument makes transformers build a `[b, 1, W, W]` mask and on CPU
    costs ~2.5x in attention, on GPU it rules out the flash kernels). A row's completion then starts at its own
    column, so the LM head covers the micro-batch's spread of prompt lengths too: the shifted forward is used
    while that spread is at most `comp_len / 8` extra logits columns (micro-batches are length-sorted), else the
    masked one."""
    comp_len = ids.shape[1] - prompt_cols
    lead = contiguous_lead(attn)
    spread = int(lead.max() - lead.min()) if lead is not None else None
    if spread is None or 8 * spread > comp_len:
        lp, logits = _masked_logprobs(model, ids, attn, comp_len, temperature)
        h = token_entropy(logits[:, :-1], temperature) if entropy else None  # fp32 chunks, no grad
        return lp, h
    prompt_real = prompt_cols - lead  # [b] each row's prompt tokens
    width = int(attn.sum(-1).max())
    shifted = shift_to_front(ids, lead)[:, :width]
    keep = width - int(prompt_real.min()) + 1  # from the logits that score the earliest completion start
    logits = model(input_ids=shifted, logits_to_keep=keep, use_cache=False).logits
    lp_all = token_logprobs(logits, shifted[:, -keep:], temperature)[:, 1:]  # scores cols W-keep+1..
    cols = prompt_real[:, None] + torch.arange(comp_len, device=ids.device) - (width - keep + 1)
    cols = cols.clamp(0, keep - 2)  # past a row's end: padding, masked by the caller
    lp = lp_all.gather(1, cols)
    h = token_entropy(logits[:, :-1], temperature).gather(1, cols) if entropy else None
    return lp, h


def _shared_prefix(ids: Tensor, real: Tensor, first_scored: int) -> int:
    """Leading columns that every row of a right-padded chunk shares (real tokens, same ids), capped at the first
    scored column; 0 (no sharing) below `SHARED_PREFIX_MIN` tokens or a `SHARED_PREFIX_SAVING` fraction of the
    chunk, or for a single row."""
    rows, width = ids.shape
    if rows < 2:
        return 0
    same = ((ids == ids[:1]) & real).all(0)
    p = int(same.long().cumprod(0).sum())
    p = min(p, max(first_scored, 1), width - 1)
    return p if p >= SHARED_PREFIX_MIN and (rows - 1) * p >= SHARED_PREFIX_SAVING * rows * width else 0


def _prefix_shared_logprobs(model: torch.nn.Module, ids: Tensor, p: int, k: int, temperature: float) -> Tensor:
    """Log-probs of the last `k` columns of a right-padded chunk whose rows share their first `p` tokens (a GRPO
    group's prompt, the student's system prompt + question): the prefix runs once, its KV cache is repeated per row
    and only the suffixes run (`p <= width - k`, so every scored token lies after the prefix or is its successor).
    None when the forward returned no cache (a model that turns caching off)."""
    head = model(input_ids=ids[:1, :p], use_cache=True, logits_to_keep=1)
    name = "cache" if "cache" in head else "past_key_values"  # the KV cache's name since transformers 5 / before
    if head.get(name) is None:
        return None
    cache = head[name]
    cache.batch_repeat_interleave(ids.shape[0])
    width = ids.shape[1]
    keep = min(k + 1, width - p)
    logits = model(input_ids=ids[:, p:], logits_to_keep=keep, **{name: cache}).logits  # positions follow the cache
    if k + 1 > width - p:  # the first suffix token is scored by the prefix's last logits
        logits = torch.cat([head.logits.expand(ids.shape[0], -1, -1), logits], dim=1)
    return token_logprobs(logits, ids[:, -(k + 1) :], temperature)[:, 1:]


def scored_suffix(mask: Tensor) -> int | None:
    """Columns from the first masked position to the end: the LM head only runs there (skips the system prompt
    and question, whose `[L, V]` logits dominate memory for a 150k vocabulary). None when nothing is masked."""
    rows = mask.any(-1)
    if not bool(rows.any()):
        return None
    first = int(mask[rows].float().argmax(-1).min())
    return mask.shape[1] - first


def teacher_logprobs_from_policy(
    fmt: RLTFormat,
    offsets: ByteOffsets,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    completions: Sequence[str],
    logprobs: Tensor,
    scored_from: int = 0,
) -> PackedTokens:
    """Teacher explanation tokens and log-probs from a policy forward over `[prompt ‖ completion]` (sampled ids).

    Args:
        fmt: the format (explanation tags and padding).
        offsets: byte offsets of the tokenizer.
        prompt_ids: [B, P] left-padded prompt ids; prompt_mask [B, P].
        completion_ids: [B, C] right-padded sampled ids; completion_mask [B, C].
        completions: decoded completions (`skip_special_tokens=True`), as the reward parses them.
        logprobs: [B, P + C] token-aligned policy log-probs at the teacher temperature.
        scored_from: first column of `logprobs` that was computed (see `causal_logprobs(last_n=...)`).
    """
    ends = []
    for text in completions:
        parsed = fmt.parse_completion(text)
        ends.append(len(text[: parsed.end].encode("utf-8")))
    comp = completion_explanation_mask(offsets, completion_ids, completion_mask, torch.tensor(ends))
    pad = suffix_span_mask(offsets, prompt_ids, prompt_mask, len(fmt.explanation_padding.encode("utf-8")))
    mask = torch.cat([pad, comp.to(pad.device)], dim=1)
    if scored_from > 0 and bool(mask[:, :scored_from].any()):
        raise ValueError("explanation tokens lie before the scored columns; raise grpo.PROMPT_TAIL_TOKENS")
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    packed_lp, packed_mask = pack_masked(logprobs, mask)
    packed_ids, _ = pack_masked(ids, mask)
    return PackedTokens(packed_ids, packed_lp, packed_mask, mismatch=special_inside(offsets, completion_ids, comp))


def special_inside(offsets: ByteOffsets, completion_ids: Tensor, explanation: Tensor) -> Tensor:
    """[B] rows with a special token sampled before an explanation token (`explanation` [B, C] mask).

    The decoded text drops it, so the text path's teacher context lacks it while the sampled log-probs of every later
    explanation token are conditioned on it; the stop token after the explanation conditions nothing scored.
    """
    special = offsets.special.to(completion_ids.device)[completion_ids]
    pos = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    last = torch.where(explanation.to(completion_ids.device), pos, -1).max(-1).values
    return (special & (pos < last[:, None])).any(-1).cpu()


def _align(teacher: PackedTokens, student: PackedTokens) -> tuple[Tensor, Tensor]:
    """Per row: equal id sequences → (True, full mask); else the longest common prefix mask. Returns (equal, mask)."""
    k = max(teacher.ids.shape[1], student.ids.shape[1])

    def widen(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, k - x.shape[1]))

    t_ids, s_ids = widen(teacher.ids), widen(student.ids)
    t_m, s_m = widen(teacher.mask.long()).bool(), widen(student.mask.long()).bool()
    same = (t_ids == s_ids) & t_m & s_m
    equal = (t_m == s_m).all(-1) & (same == s_m).all(-1)
    prefix = same.long().cumprod(-1).bool()
    return equal, prefix


class RLTScorer:
    """Batched rSS/rKL scoring with a frozen student.

    Args:
        student: the frozen student causal LM (eval mode, no grad).
        tokenizer: the teacher's tokenizer (the student shares it, P13).
        fmt: the RLT format.
        config: reward options (paper defaults).
        max_length: student context budget in tokens; longer rows are counted and scored as empty (penalties).
        token_budget: max tokens per student forward chunk.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        tokenizer,
        fmt: RLTFormat,
        config: RewardConfig | None = None,
        max_length: int | None = None,
        token_budget: int = 65536,
    ) -> None:
        self.student = student
        self.tokenizer = tokenizer
        self.format = fmt
        self.config = config or RewardConfig()
        self.max_length = max_length
        self.token_budget = token_budget
        self.offsets = ByteOffsets(tokenizer)

    @property
    def uses_teacher(self) -> bool:
        return any(c > 0 for c in self.config.kl_penalty_coeffs) and self.config.include_teacher_think_entropy

    def _score_spans(
        self, model: torch.nn.Module, rendered, temperature: float, names: Sequence[str], max_length: int | None = None
    ) -> tuple[dict[str, PackedTokens], Tensor]:
        """Tokenize rendered texts once, run `model` over the scored suffix, pack each named span."""
        batch = encode_with_spans(
            self.tokenizer, self.offsets, [r.text for r in rendered], [r.spans for r in rendered], max_length
        )
        scored = torch.stack([batch.masks[n] for n in names]).any(0)
        device = next(model.parameters()).device
        lp = causal_logprobs(
            model,
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            temperature,
            self.token_budget,
            last_n=scored_suffix(scored),
            share_prefix=True,
        ).cpu()
        packed = {}
        for name in names:
            plp, pmask = pack_masked(lp, batch.masks[name])
            pids, _ = pack_masked(batch.input_ids, batch.masks[name])
            packed[name] = PackedTokens(pids, plp, pmask)
        return packed, batch.overflow

    def student_side(
        self, questions: Sequence[str], solutions: Sequence[str], explanations: Sequence[str]
    ) -> tuple[PackedTokens, PackedTokens, Tensor]:
        """Student forward over the §1.7 contexts; returns packed (solution, explanation) tokens and overflow [B]."""
        rendered = [
            self.format.student_text(q, e, s, self.tokenizer) for q, e, s in zip(questions, explanations, solutions)
        ]
        packed, overflow = self._score_spans(
            self.student, rendered, self.config.student_temperature, ("solution", "explanation"), self.max_length
        )
        return packed["solution"], packed["explanation"], overflow

    def teacher_text_side(self, teacher: torch.nn.Module, prompts: Sequence[str], completions: Sequence[str]):
        """Text path: re-encode `prompt + completion` and run the teacher (parity with the authors, P3)."""
        rendered = [self.format.teacher_scoring_text(p, c) for p, c in zip(prompts, completions)]
        packed, overflow = self._score_spans(
            teacher, rendered, self.config.teacher_temperature, ("explanation",), self.max_length
        )
        packed["explanation"].overflow = overflow
        return packed["explanation"]

    @torch.no_grad()
    def score(
        self,
        questions: Sequence[str],
        solutions: Sequence[str],
        completions: Sequence[str],
        teacher_tokens: PackedTokens | None = None,
        teacher_model: torch.nn.Module | None = None,
        prompts: Sequence[str] | None = None,
        groups: Tensor | None = None,
    ) -> ScoreResult:
        """Score teacher completions (text after the RL prompt, special tokens stripped).

        Penalised rows (context overflow, an empty solution or explanation span, an unclosed explanation tag) get
        a reward at or below the worst regular reward of their group (`RewardConfig.penalty_margin` below it, see
        `penalise_below_group`); `components["penalised"]` and `components["overflow"]` flag them.

        Args:
            questions: questions q.
            solutions: solution contents s (between the solution tags, verbatim).
            completions: teacher completions.
            teacher_tokens: teacher explanation tokens/log-probs from the policy forward (sampled path).
            teacher_model: teacher for the text path (all rows when `teacher_tokens` is None; mismatched rows else).
            prompts: RL prompts, needed for the text path.
            groups: [B] group ids (the prompt each completion belongs to); None: the batch is one group.
        """
        n = len(completions)
        if not (len(questions) == len(solutions) == n):
            raise ValueError(f"score(): {len(questions)} questions, {len(solutions)} solutions, {n} completions")
        # the exact-span encoder refuses text a tokenizer normaliser would rewrite: score the NFC form (counted)
        nfc = [[unicodedata.normalize("NFC", t) for t in texts] for texts in (questions, solutions, completions)]
        nfc_changed = sum(
            a != b for new, old in zip(nfc, (questions, solutions, completions)) for a, b in zip(new, old)
        )
        questions, solutions, completions = nfc
        if prompts is not None:
            prompts = [unicodedata.normalize("NFC", t) for t in prompts]
        parsed = [self.format.parse_completion(c) for c in completions]
        explanations = [p.explanation for p in parsed]
        matched = torch.tensor([p.matched for p in parsed], dtype=torch.bool)
        sol, expl, overflow = self.student_side(questions, solutions, explanations)
        counts = {"overflow": int(overflow.sum()), "unmatched": int((~matched).sum()), "nfc_normalized": nfc_changed}

        if self.uses_teacher:
            if teacher_tokens is None:
                if teacher_model is None or prompts is None:
                    raise ValueError("rKL needs teacher log-probs: pass teacher_tokens or teacher_model + prompts")
                teacher_tokens = self.teacher_text_side(teacher_model, prompts, completions)
            if teacher_tokens.overflow is not None:
                overflow = overflow | teacher_tokens.overflow
            equal, prefix = _align(teacher_tokens, expl)
            if teacher_tokens.mismatch is not None:  # a special token inside the explanation: text path
                equal = equal & ~teacher_tokens.mismatch
            mismatched = (~equal & ~overflow).nonzero().squeeze(-1).tolist()
            counts["token_mismatch"] = len(mismatched)
            k = prefix.shape[1]
            t_lp = torch.nn.functional.pad(teacher_tokens.logprobs, (0, k - teacher_tokens.logprobs.shape[1]))
            s_lp = torch.nn.functional.pad(expl.logprobs, (0, k - expl.logprobs.shape[1]))
            expl_mask = prefix
            if mismatched and teacher_model is not None and prompts is not None:
                redo = self.teacher_text_side(
                    teacher_model, [prompts[i] for i in mismatched], [completions[i] for i in mismatched]
                )
                sub = PackedTokens(expl.ids[mismatched], expl.logprobs[mismatched], expl.mask[mismatched])
                equal2, prefix2 = _align(redo, sub)
                overflow[torch.tensor(mismatched)] |= redo.overflow
                counts["token_mismatch_unresolved"] = int((~equal2).sum())
                k2 = max(k, prefix2.shape[1])
                t_lp, s_lp, expl_mask = (
                    torch.nn.functional.pad(x, (0, k2 - x.shape[1])) for x in (t_lp, s_lp, expl_mask)
                )
                rows = torch.tensor(mismatched)
                t_lp[rows] = torch.nn.functional.pad(redo.logprobs, (0, k2 - redo.logprobs.shape[1]))
                s_lp[rows] = torch.nn.functional.pad(sub.logprobs, (0, k2 - sub.logprobs.shape[1]))
                expl_mask[rows] = torch.nn.functional.pad(prefix2, (0, k2 - prefix2.shape[1]))
            else:
                counts["token_mismatch_unresolved"] = len(mismatched)
                if teacher_model is not None and prompts is not None:
                    pad_forward_calls(teacher_model, 0)  # sharded: join the ranks that re-score mismatched rows
        else:
            t_lp, s_lp, expl_mask = torch.zeros_like(expl.logprobs), expl.logprobs, expl.mask
        out = rlt_reward(sol.logprobs, sol.mask, t_lp, s_lp, expl_mask, matched, self.config)
        comps = out.components
        nan_filled = sum(v for k, v in comps.items() if k.endswith("_nan_filled")) > 0
        penalised = overflow | ~matched | nan_filled | (comps["explanation_tokens"] == 0)
        comps["overflow"] = overflow.long()
        counts["overflow"] = int(overflow.sum())  # student or teacher context cut at max_length
        comps["penalised"] = penalised.long()
        comps["reward_unpenalised"] = out.reward
        counts["penalised"] = int(penalised.sum())
        if self.config.penalty_margin is not None:
            ids = torch.zeros(n, dtype=torch.long) if groups is None else torch.as_tensor(groups).long().cpu()
            if ids.shape != (n,):
                raise ValueError(f"score(): groups must have one id per completion ({n}), got {tuple(ids.shape)}")
            out.reward = penalise_below_group(
                out.reward, penalised, ids, self.config.penalty_margin, self.config.penalty_floor
            )
        return ScoreResult(out, explanations, matched, counts, TokenScores(sol, expl.ids, t_lp, s_lp, expl_mask))
