"""B1: RLT reward throughput -- batched `RLTScorer.score` vs a per-sample loop mirroring the authors' (spec §2.1-2.4).

The per-sample implementation below exists only for this comparison: for each completion it renders the teacher and
student strings, re-tokenizes them, finds spans by token sub-list search (`find_valid_subsequence` + first/last
occurrence, spec §2.3), runs one teacher and one student forward and reduces (spec §2.5-2.7, default reductions).

Measured per (model size, G, explanation length): completions/s of
- `per_sample`: the authors' loop;
- `sampled`: one batched policy forward over `[prompt ‖ completion]` (`GRPOModule.policy_logprobs`) +
  `teacher_logprobs_from_policy` + `RLTScorer.score` (the training path with `sampler_logprobs=False`, or with an
  engine that records no log-probs: the teacher forward included so the comparison is like for like);
- `sampler`: the default training path (`GRPOModule.rollout_logprobs`, μ = 1): the completion log-probs the sampler
  recorded while generating (here computed untimed by a KV-cached decode of the same ids, as generation does) + one
  prompt-tail forward per distinct prompt + `teacher_logprobs_from_policy` + `RLTScorer.score`;
- `score_only`: `RLTScorer.score` given the teacher tokens (the reward's own cost on top of the policy forward);
- `text`: `RLTScorer.score` with the teacher re-run from text (parity path);
- `bare`: one batched no-grad student forward over the same right-padded student batch (the physical floor).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from benchmarks import interleaved_medians, load_model, load_tokenizer, short_format
from rlt_pl.formats import RLTFormat
from rlt_pl.generation import GenerationOutput
from rlt_pl.modules.grpo import PROMPT_TAIL_TOKENS, GRPOModule
from rlt_pl.rewards import RewardConfig
from rlt_pl.scoring import RLTScorer, causal_logprobs, teacher_logprobs_from_policy

WORDS = "the sum of and is we add carry so answer first then digit column number total check result".split()


# ------------------------------------------------------------------ inputs
def make_completion(tokenizer, n_tokens: int, rng: random.Random, end_tag: str) -> str:
    """A matched teacher completion whose explanation is about `n_tokens` tokens of words and digits.

    Words are added until the token count (additive under Qwen2's pre-tokenizer: every word is its own pre-token)
    reaches `n_tokens`; the text ends with a letter so no punctuation fuses with the end tag.

    Args:
        tokenizer: the shared tokenizer.
        n_tokens: target explanation length in tokens.
        rng: random source.
        end_tag: the explanation end tag.
    """
    words: list[str] = []
    count = 0
    while count < n_tokens:
        w = rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(0, 999))
        piece = w if not words else " " + w
        count += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        words.append(w)
    if not words[-1].isalpha():
        words.append("done")
    return " ".join(words) + end_tag


def make_batch(tokenizer, fmt: RLTFormat, group: int, n_tokens: int, seed: int = 0) -> dict:
    """One GRPO group: a question/solution repeated `group` times with distinct completions.

    Args:
        tokenizer: the shared tokenizer.
        fmt: the RLT format.
        group: G.
        n_tokens: explanation length in tokens.
        seed: random seed.
    """
    rng = random.Random(seed)
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    question = f"Return your final response within \\boxed{{}}. What is {a} + {b}?"
    solution = f"\n\nthe answer is \\boxed{{{a + b}}}\n\n"
    completions = [make_completion(tokenizer, n_tokens, rng, fmt.explanation_end) for _ in range(group)]
    prompt = fmt.teacher_prompt(question, solution, tokenizer)
    return {
        "questions": [question] * group,
        "solutions": [solution] * group,
        "prompts": [prompt] * group,
        "completions": completions,
    }


def sampled_ids(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> dict:
    """Left-padded prompt ids and right-padded completion ids (+ EOS), as `HFGenerationEngine` returns them.

    Args:
        tokenizer: the shared tokenizer.
        prompts: RL prompts.
        completions: completion texts.
    """
    p = tokenizer(list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"prompt_ids": p["input_ids"], "prompt_mask": p["attention_mask"], "completion_ids": ids, "mask": mask}


@torch.no_grad()
def decoded_logprobs(model: torch.nn.Module, ids: dict, temperature: float) -> torch.Tensor:
    """[N, C] log-probs of the completion ids as a sampler records them: a prefill of the prompt, then one KV-cached
    decode step per completion token, each scoring the next token under softmax(logits / T); 0 at padding.

    Args:
        model: the teacher.
        ids: `sampled_ids(...)` output (left-padded prompts, right-padded completions).
        temperature: the sampling temperature.
    """
    full = torch.cat([ids["prompt_ids"], ids["completion_ids"]], 1)
    attn = torch.cat([ids["prompt_mask"], ids["mask"]], 1)
    p = ids["prompt_ids"].shape[1]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=full[:, :p], attention_mask=attn[:, :p], position_ids=pos[:, :p], use_cache=True)
    name = "cache" if "cache" in out else "past_key_values"  # the KV cache's name since transformers 5 / before
    cache, logits, cols = out[name], out.logits[:, -1], []
    for j in range(ids["completion_ids"].shape[1]):
        token = full[:, p + j]
        cols.append(torch.log_softmax(logits.float() / temperature, -1).gather(1, token[:, None]).squeeze(1))
        step = model(
            input_ids=token[:, None],
            attention_mask=attn[:, : p + j + 1],
            position_ids=pos[:, p + j : p + j + 1],
            use_cache=True,
            **{name: cache},
        )
        cache, logits = step[name], step.logits[:, -1]
    return torch.stack(cols, 1) * ids["mask"]


# ------------------------------------------------------------------ the authors' per-sample loop (comparison only)
def find_valid_subsequence(sub: list[int], seq: list[int]) -> list[int] | None:
    """`sub`, else `sub[1:]`, `sub[:-1]`, `sub[1:-1]` -- the first that occurs contiguously in `seq` (spec §2.3)."""
    for cand in (sub, sub[1:], sub[:-1], sub[1:-1]):
        if cand and find_sublist(seq, cand) is not None:
            return cand
    return None


def find_sublist(seq: list[int], sub: list[int], reverse: bool = False) -> int | None:
    """Index of the first (or last, `reverse`) contiguous occurrence of `sub` in `seq`, by linear scan."""
    k = len(sub)
    starts = range(len(seq) - k, -1, -1) if reverse else range(len(seq) - k + 1)
    for i in starts:
        if seq[i : i + k] == sub:
            return i
    return None


def _lp_vector(model: torch.nn.Module, ids: list[int], temperature: float) -> torch.Tensor:
    """Log-prob vector of length L-1: entry j scores token j+1 (spec §2.4), fp32 log-softmax of logits / T."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)


@torch.no_grad()
def per_sample_reward(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    tokenizer,
    fmt: RLTFormat,
    prompt: str,
    question: str,
    solution: str,
    completion: str,
    config: RewardConfig,
) -> float:
    """The RLT reward of one completion, computed the authors' way (string rendering + sub-list span search).

    Supports the paper's reductions only (rSS mean/min, rKL mean/max). Returns NaN when a span is not found.

    Args:
        teacher: teacher model (text path).
        student: frozen student.
        tokenizer: the shared tokenizer.
        fmt: the RLT format.
        prompt: the RL prompt.
        question: question q.
        solution: solution content s.
        completion: teacher completion.
        config: reward options (paper defaults).
    """
    if config.answer_log_prob_reductions != ("mean", "min") or config.kl_reductions != ("mean", "max"):
        raise ValueError("per_sample_reward implements the paper's reductions only")

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix = fmt.masked_out_think_prefix
    c2 = prefix + completion
    p0 = prompt[: -len(prefix)]
    pattern = re.escape(fmt.explanation_start) + "(.*?)" + re.escape(fmt.explanation_end)
    m = re.search(pattern, c2, re.DOTALL)
    match = 0.0
    if m is None:
        match = config.not_matched_penalty
        c2 = c2 + fmt.explanation_end
        m = re.search(pattern, c2, re.DOTALL)
    expl = m.group(1)
    x_t = p0 + c2
    assistant = fmt.think_prefix + fmt.thought_start + expl + fmt.thought_end + fmt.think_solution_delimiter
    assistant += fmt.student_solution_start + solution + fmt.student_solution_end
    messages = [{"role": "system", "content": fmt.student_system_prompt}, {"role": "user", "content": question}]
    messages.append({"role": "assistant", "content": assistant})
    x_s = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=False
    )
    ids_c, ids_t, ids_s = tok(c2), tok(x_t), tok(x_s)
    t_e = find_valid_subsequence(tok(expl), ids_c)
    sol = find_valid_subsequence(tok(solution), ids_s)
    if t_e is None or sol is None:
        return float("nan")
    a = find_sublist(ids_c, t_e) - len(ids_c)  # negative offset from the end of τ(c')
    j = find_sublist(ids_s, t_e)
    k = find_sublist(ids_s, sol, reverse=True)
    if j is None:
        return float("nan")
    lt = _lp_vector(teacher, ids_t, config.teacher_temperature)
    ls = _lp_vector(student, ids_s, config.student_temperature)
    n_t = len(ids_t) - 1
    teacher_e = lt[n_t + a : n_t + a + len(t_e)]
    student_e = ls[j - 1 : j - 1 + len(t_e)]
    student_sol = ls[k - 1 : k - 1 + len(sol)].clamp(min=-config.clip_log_prob)
    w_mean, w_min = config.answer_log_prob_coeffs
    rss = w_mean * float(student_sol.mean()) + w_min * float(student_sol.min())
    d = (teacher_e - student_e).clamp(max=config.clip_kl)
    b_mean, b_max = config.kl_penalty_coeffs
    rkl = b_mean * float(d.mean()) + b_max * float(d.max()) if d.numel() else (b_mean + b_max) * -match
    return rss - rkl + match


# ------------------------------------------------------------------ one configuration
def bench_config(teacher, student, tokenizer, group: int, n_tokens: int, repeats: int, token_budget: int) -> dict:
    """Time every path on one group of `group` completions with ~`n_tokens`-token explanations, round-robin.

    Args:
        teacher: teacher model.
        student: student model.
        tokenizer: the shared tokenizer.
        group: G.
        n_tokens: explanation length.
        repeats: timed repetitions (median).
        token_budget: tokens per forward chunk of the batched paths.
    """
    fmt = short_format()
    config = RewardConfig()
    batch = make_batch(tokenizer, fmt, group, n_tokens)
    q, s, p, c = batch["questions"], batch["solutions"], batch["prompts"], batch["completions"]
    scorer = RLTScorer(student, tokenizer, fmt, config, token_budget=token_budget)
    ids = sampled_ids(tokenizer, p, c)

    def teacher_tokens(lp: torch.Tensor):
        scored_from = max(0, lp.shape[1] - ids["completion_ids"].shape[1] - PROMPT_TAIL_TOKENS)
        args = (ids["prompt_ids"], ids["prompt_mask"], ids["completion_ids"], ids["mask"], c, lp)
        return teacher_logprobs_from_policy(fmt, scorer.offsets, *args, scored_from=scored_from)

    def policy_tokens():
        full = torch.cat([ids["prompt_ids"], ids["completion_ids"]], 1)
        attn = torch.cat([ids["prompt_mask"], ids["mask"]], 1)
        last_n = ids["completion_ids"].shape[1] + PROMPT_TAIL_TOKENS  # as `GRPOModule.policy_logprobs`
        t = config.teacher_temperature
        return teacher_tokens(causal_logprobs(teacher, full, attn, t, token_budget, last_n=last_n, share_prefix=True))

    def sampled():
        return scorer.score(q, s, c, policy_tokens(), teacher, p)

    gen = GenerationOutput(
        ids["prompt_ids"],
        ids["prompt_mask"],
        ids["completion_ids"],
        ids["mask"],
        list(c),
        torch.ones(group).bool(),
        list(p),
        decoded_logprobs(teacher, ids, config.teacher_temperature),
        config.teacher_temperature,
    )
    host = SimpleNamespace(
        model=teacher,
        device=torch.device("cpu"),
        token_budget=token_budget,
        sampler_logprobs=True,
        num_iterations=1,
        loss_temperature=config.teacher_temperature,
    )

    def sampler():
        tokens = teacher_tokens(GRPOModule.rollout_logprobs(host, gen))
        return scorer.score(q, s, c, tokens, teacher, p)

    tokens = policy_tokens()
    rendered = [
        fmt.student_text(qq, fmt.parse_completion(cc).explanation, ss, tokenizer) for qq, ss, cc in zip(q, s, c)
    ]
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, padding=True, return_tensors="pt")

    @torch.no_grad()
    def bare():
        return student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits

    def per_sample():
        return [per_sample_reward(teacher, student, tokenizer, fmt, *row, config) for row in zip(p, q, s, c)]

    fns = {
        "sampled": sampled,
        "sampler": sampler,
        "score": lambda: scorer.score(q, s, c, tokens, teacher, p),
        "text": lambda: scorer.score(q, s, c, None, teacher, p),
        "bare": bare,
        "per_sample": per_sample,  # many forwards inside: self-warming
    }
    t = interleaved_medians(fns, repeats, warmup=("sampled", "sampler", "score", "text", "bare"))
    t_sampled, t_score, t_text, t_bare, t_per = (t[k] for k in ("sampled", "score", "text", "bare", "per_sample"))
    batched = sampled()
    reference = torch.tensor(per_sample(), dtype=torch.float32)
    text = scorer.score(q, s, c, None, teacher, p).output.reward.float()
    found = ~torch.isnan(reference)
    diff = (batched.output.reward.float() - reference)[found].abs()
    diff_sampler = (sampler().output.reward.float() - reference)[found].abs()
    return {
        "G": group,
        "expl_tokens": int(tokens.mask.sum(-1).float().mean()),
        "student_len": int(enc["attention_mask"].sum(-1).max()),
        "per_sample_cps": group / t_per,
        "sampled_cps": group / t_sampled,
        "sampler_cps": group / t["sampler"],
        "text_cps": group / t_text,
        "speedup_sampler": t_per / t["sampler"],
        "speedup_sampled": t_per / t_sampled,
        "speedup_text": t_per / t_text,
        "score_only_vs_bare": t_score / t_bare,
        "sampled_vs_bare": t_sampled / t_bare,
        "bare_s": t_bare,
        "max_abs_diff": float(diff.max()) if diff.numel() else float("nan"),
        "sampler_max_abs_diff": float(diff_sampler.max()) if diff_sampler.numel() else float("nan"),
        "text_vs_sampled_diff": float((text - batched.output.reward.float()).abs().max()),
        "span_not_found": int((~found).sum()),
        "token_mismatch": int(batched.counts.get("token_mismatch", 0)),
    }


def run(assets: dict, grid: dict[str, list[tuple[int, int]]], repeats: int = 3, token_budget: int = 65536) -> dict:
    """Run B1 over `grid` (`{size: [(G, n_tokens), ...]}`) and return rows plus the headline numbers.

    Args:
        assets: `benchmarks.build_assets(...)` output.
        grid: configurations per model size.
        repeats: timed repetitions per path.
        token_budget: tokens per forward chunk.
    """
    rows = []
    for size, configs in grid.items():
        teacher, student = load_model(assets[size]["teacher"]), load_model(assets[size]["student"])
        tokenizer = load_tokenizer(assets[size]["teacher"])
        for group, n_tokens in configs:
            row = {"model": size} | bench_config(teacher, student, tokenizer, group, n_tokens, repeats, token_budget)
            rows.append(row)
            print(f"[b1] {row}", flush=True)
    return {"rows": rows, "max_abs_diff": max(max(r["max_abs_diff"], r["sampler_max_abs_diff"]) for r in rows)}
