"""Mutation run: plant one hand-made bug at a time and check the relevant tests go red.

    python -m benchmarks.mutate [--only NAME ...] [--list] [--timeout 600] [--json OUT.json]

Each mutant replaces one exact snippet of one source file (the snippet must occur exactly once) and runs only the
tests named for it (`pytest -x -q -m "not gpu"`), so a run stays affordable on two cores. The file is restored
in a `finally` block after every mutant, and the script refuses to start on a dirty worktree of the mutated
files. A mutant is *caught* when pytest fails; *survived* when it passes (each survivor is printed; an
equivalent mutant must be argued in the report). Outside the default test suite (`make mutate`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    group: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


R, S, SC, G, GM = (
    "rlt_pl/rewards.py",
    "rlt_pl/scoring.py",
    "rlt_pl/score.py",
    "rlt_pl/grpo.py",
    "rlt_pl/modules/grpo.py",
)
TW, DB, TR, SD = (
    "rlt_pl/callbacks/trace_writer.py",
    "rlt_pl/datamodules/loading.py",
    "rlt_pl/datamodules/traces.py",
    "rlt_pl/callbacks/shutdown.py",
)
T_REW = ("tests/test_rewards.py", "-k", "reference or hand_computed or nonfinite or token_logprobs or masked_reduce")
T_PEN = (
    "tests/test_rewards.py",
    "tests/test_bad_input.py::test_penalties_are_below_every_regular_reward_of_their_group",
)
T_SC = ("tests/test_score_guarantees.py",)
T_ROW = ("tests/test_row_guarantees.py",)
T_GRPO = ("tests/test_grpo.py",)
T_CFG = ("tests/test_bad_input.py::test_grpo_config_errors_name_the_flag",)
T_TR = (
    "tests/test_traces.py::test_rerun_with_other_batching_loses_and_duplicates_nothing",
    "tests/test_traces.py::test_rerun_with_another_lineage_is_refused_unless_restarted",
)
T_SIG = ("tests/test_signals.py",)
T_UPD = ("tests/test_grpo_update.py",)
T_SPECIAL = ("tests/test_scoring.py::test_special_token_inside_explanation_takes_the_text_path",)
T_MERGE = ("tests/test_merge.py",)
T_STRADDLE = ("tests/test_spans_straddling.py",)
SP = "rlt_pl/spans.py"
T_OUT = ("tests/test_output_paths.py",)
MG, PA, CK, CLI = "rlt_pl/merge.py", "rlt_pl/paths.py", "rlt_pl/callbacks/checkpoint.py", "rlt_pl/cli.py"
GV = "rlt_pl/generation_vllm.py"
T_VLLM = ("tests/test_generation_vllm.py", "-m", "not slow")
_SYNC_LOOP = "    for name, tensor in merged_weights(model, dtype):\n"
T_TORN_SHARD = ("tests/test_file_faults.py::test_trace_shard_killed_mid_write_is_never_read",)
T_TORN_CKPT = ("tests/test_file_faults.py::test_checkpoint_killed_mid_write_keeps_the_last_published_one",)
T_CLI_RESUME = ("tests/test_fault_injection.py::test_sigkill_then_resume_equals_the_uninterrupted_run",)

MUTANTS = [
    # GRPO module plumbing, pinned by a hand computation of one real step
    Mutant(
        "microbatch_scale_dropped",
        "grpo_plumbing",
        GM,
        "                scale = len(idx) / n",
        "                scale = 1.0",
        T_UPD,
    ),
    Mutant(
        "clip_skipped",
        "grpo_plumbing",
        GM,
        "clip_grad_norm_(self.trainable_parameters(), max_norm)",
        'clip_grad_norm_(self.trainable_parameters(), float("inf"))',
        T_UPD,
    ),
    Mutant(
        "reference_shifted",
        "grpo_plumbing",
        GM,
        'buf["ref_lp"][idx][:, prompt_len:hi]',
        'buf["ref_lp"][idx][:, prompt_len - 1 : hi - 1]',
        T_UPD,
    ),
    Mutant(
        "stats_unweighted", "grpo_plumbing", GM, "weight = float(scale) / self.num_iterations", "weight = 0.5", T_UPD
    ),
    Mutant(
        "nonfinite_budget_not_restored",
        "resume",
        GM,
        '        self.nonfinite_steps = state.get("nonfinite_steps", 0)',
        "        pass",
        ("tests/test_bad_input.py::test_nonfinite_budget_is_restored_on_resume",),
    ),
    # special token sampled inside an explanation
    Mutant("special_inside_ignored", "scorer", S, "equal = equal & ~teacher_tokens.mismatch", "pass", T_SPECIAL),
    # tokens straddling a tag boundary belong to neither span
    Mutant("span_end_off_by_one", "spans", SP, "& (end <= hi[:, None])", "& (end <= hi[:, None] + 1)", T_STRADDLE),
    Mutant(
        "span_start_off_by_one", "spans", SP, "& (start >= lo[:, None])", "& (start + 1 >= lo[:, None])", T_STRADDLE
    ),
    Mutant(
        "span_overlap_not_inside",
        "spans",
        SP,
        "(start >= lo[:, None]) & (end <= hi[:, None])",
        "(end > lo[:, None]) & (start < hi[:, None])",
        T_STRADDLE,
    ),
    Mutant(
        "prompt_padding_off_by_one",
        "spans",
        SP,
        "total - suffix_bytes, total,",
        "total - suffix_bytes - 1, total,",
        T_STRADDLE,
    ),
    Mutant(
        "completion_end_off_by_one",
        "spans",
        SP,
        "span_mask(start, end, lo, explanation_end_bytes,",
        "span_mask(start, end, lo, explanation_end_bytes + 1,",
        T_STRADDLE,
    ),
    # merged, dequantised export weights
    Mutant("merge_scale_dropped", "export", MG, "d = (b @ a) * layer.scaling[name]", "d = b @ a", T_MERGE),
    # vLLM engine (against the stub vllm module): what is pushed, when, and in which order
    Mutant(
        "vllm_packed_weights",
        "vllm",
        GV,
        _SYNC_LOOP,
        _SYNC_LOOP.replace("merged_weights(model, dtype)", "model.state_dict().items()"),
        T_VLLM,
    ),
    Mutant(
        "vllm_inplace_merge",
        "vllm",
        GV,
        _SYNC_LOOP,
        "    model.merge_adapter()\n    model.unmerge_adapter()\n" + _SYNC_LOOP,
        (*T_VLLM, "-k", "qlora"),
    ),
    Mutant("vllm_engine_dtype_ignored", "vllm", GV, _SYNC_LOOP, _SYNC_LOOP.replace("dtype)", "None)"), T_VLLM),
    Mutant("vllm_no_reset_after_sync", "vllm", GV, "llm.reset_prefix_cache()  # cached", "pass  #", T_VLLM),
    Mutant(
        "vllm_load_before_wake",
        "vllm",
        GV,
        '        self._wake(llm, "weights")\n        target = driver_model(llm)',
        "        target = driver_model(llm)",
        T_VLLM,
    ),
    Mutant(
        "vllm_sync_every_round",
        "vllm",
        GV,
        "        if self._synced_version != self._policy_version:\n            self.sync_weights(model)",
        "        self.sync_weights(model)",
        T_VLLM,
    ),
    Mutant("vllm_level2_kept", "vllm", GV, "self._synced_version = None  # level 2", "pass  #", T_VLLM),
    Mutant("step_not_announced", "vllm", GM, "        self.engine.weights_changed()", "        pass", T_VLLM),
    Mutant(
        "fsdp_shards_not_gathered",
        "vllm",
        MG,
        "    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor",
        "    return tensor",
        ("tests/test_generation_vllm.py::test_fsdp2_sync_pushes_gathered_full_tensors",),
    ),
    # output paths checked before work
    Mutant(
        "unwritable_accepted", "export", PA, "    except OSError as err:", "    except ZeroDivisionError as err:", T_OUT
    ),
    # reward maths
    Mutant("kl_sign", "reward", R, "d = tea - stu  # [B, Ke]", "d = stu - tea  # [B, Ke]", T_REW),
    Mutant("reward_rkl_sign", "reward", R, "reward_with = rss - rkl + match", "reward_with = rss + rkl + match", T_REW),
    Mutant(
        "nan_fill_sign", "reward", R, "torch.full_like(value, nan_fill)", "torch.full_like(value, -nan_fill)", T_REW
    ),
    Mutant("rkl_fill_value", "reward", R, 'reds, coeffs, -penalty, "rkl"', 'reds, coeffs, penalty, "rkl"', T_REW),
    Mutant("min_is_max", "reward", R, 'float("inf"))).amin(dim=1)', 'float("inf"))).amax(dim=1)', T_REW),
    Mutant("temperature_mul", "reward", R, ".to(out_dtype) / temperature", ".to(out_dtype) * temperature", T_REW),
    Mutant("clip_side", "reward", R, "x = x.clamp(min=clip_min)", "x = x.clamp(max=clip_min)", T_REW),
    Mutant("mean_count", "reward", R, "total / count.clamp(min=1)", "total / count.clamp(min=2)", T_REW),
    Mutant("schulman", "reward", R, "d = d - 1.0 + torch.exp(-d)", "d = d - 1.0 + torch.exp(d)", T_REW),
    Mutant("no_entropy_nll", "reward", R, "_transform(-stu, config", "_transform(stu, config", T_REW),
    Mutant("logprob_shift", "reward", R, "targets = input_ids[:, 1:]", "targets = input_ids[:, :-1]", T_REW),
    Mutant("exp_norm", "reward", R, "x = 1.0 - torch.exp(-x)", "x = 1.0 - torch.exp(x)", T_REW),
    # penalties by construction
    Mutant(
        "penalty_margin_sign",
        "penalty",
        R,
        "torch.minimum(own, worst - margin)",
        "torch.minimum(own, worst + margin)",
        T_PEN,
    ),
    Mutant("penalty_no_cap", "penalty", R, "capped = torch.minimum(own, worst - margin)", "capped = own", T_PEN),
    Mutant(
        "penalty_floor_ignored",
        "penalty",
        R,
        "capped = torch.minimum(capped, torch.full_like(capped, floor))",
        "pass",
        T_PEN,
    ),
    Mutant(
        "penalty_group_ignored",
        "penalty",
        R,
        "[gid]  # [B] worst regular",
        "[gid].amin().expand_as(gid)  # [B] worst regular",
        T_PEN,
    ),
    Mutant(
        "penalised_without_unmatched", "penalty", S, "overflow | ~matched | nan_filled", "overflow | nan_filled", T_PEN
    ),
    Mutant("penalty_not_applied", "penalty", S, "if self.config.penalty_margin is not None:", "if False:", T_PEN),
    # GRPO loss
    Mutant(
        "k3_sign",
        "grpo_loss",
        G,
        "return torch.exp(delta) - delta - 1.0",
        "return torch.exp(delta) + delta - 1.0",
        T_GRPO,
    ),
    Mutant(
        "seq_mean",
        "grpo_loss",
        G,
        "per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)",
        "per_token.sum(dim=1)",
        T_GRPO,
    ),
    Mutant("adv_eps", "grpo_loss", G, "if not eps > 0:", "if False:", T_GRPO),
    # GRPO construction-time refusals
    Mutant(
        "allow_g1",
        "grpo_module",
        GM,
        "        if num_generations == 1:\n",
        "        if num_generations == -1:\n",
        T_CFG,
    ),
    Mutant(
        "allow_negative_clip",
        "grpo_module",
        GM,
        'not 0 < max_grad_norm < float("inf")',
        "max_grad_norm != max_grad_norm",
        T_CFG,
    ),
    Mutant(
        "allow_greedy",
        "grpo_module",
        GM,
        "if self.sampling.temperature == 0 or self.sampling.top_k == 1:",
        "if False:",
        T_CFG,
    ),
    Mutant(
        "allow_zero_budget",
        "grpo_module",
        GM,
        '            if value < 1:\n                raise ValueError(f"model.init_args.{name}',
        '            if value < 0:\n                raise ValueError(f"model.init_args.{name}',
        T_CFG,
    ),
    # scorer CLI
    Mutant(
        "score_output_is_input", "scorer", SC, "if out_path.resolve() == in_path.resolve() or", "if False and", T_SC
    ),
    Mutant("score_umask", "scorer", SC, "os.fchmod(fd, 0o666 & ~umask)", "pass", T_SC),
    Mutant(
        "score_lineage_format",
        "scorer",
        SC,
        "if requested is not None and recorded is not None and requested != recorded:",
        "if False:",
        T_SC,
    ),
    Mutant(
        "score_format_rows",
        "scorer",
        SC,
        "    if any(own in c for c in completions):\n        return\n",
        "    return\n",
        T_SC,
    ),
    Mutant(
        "score_thought_matched",
        "scorer",
        SC,
        'closed = kind == "explanation" or row.get("matched") is not False',
        "closed = True",
        T_SC,
    ),
    Mutant(
        "score_surrogate",
        "scorer",
        SC,
        "            return str(err), False",
        "            nfc = value",
        T_SC,
    ),
    Mutant("score_global_groups", "scorer", SC, "    apply_group_penalties(scored, config.penalty_margin)\n", "", T_SC),
    Mutant("score_tokenizer_check", "scorer", SC, "    if not args.allow_tokenizer_mismatch:", "    if False:", T_SC),
    Mutant("score_teacher_bound", "scorer", S, '("explanation",), self.max_length', '("explanation",), None', T_SC),
    Mutant(
        "score_writable",
        "scorer",
        SC,
        "        os.close(fd)\n        os.unlink(probe)\n    except OSError",
        "        os.close(fd)\n        os.unlink(probe)\n    except ZeroDivisionError",
        T_SC,
    ),
    # DataModule rows
    Mutant(
        "dm_nfc",
        "datamodule",
        DB,
        "nfc = nfc_text(key, value)\n        except ValueError as err:\n            raise RowError",
        "nfc = value\n        except ValueError as err:\n            raise RowError",
        T_ROW,
    ),
    Mutant(
        "dm_recursion",
        "datamodule",
        DB,
        "    except RecursionError:\n        return RowError",
        "    except KeyError:\n        return RowError",
        T_ROW,
    ),
    Mutant(
        "dm_utf8",
        "datamodule",
        DB,
        'text = line.decode("utf-8")',
        'text = line.decode("utf-8", errors="replace")',
        T_ROW,
    ),
    Mutant("dm_null_id", "datamodule", TR, 'if "id" in raw and raw["id"] is None:', "if False:", T_ROW),
    Mutant("dm_id_collision", "datamodule", TR, "if kinds != type(rid).__name__:", "if False:", T_ROW),
    Mutant("dm_missing_thought", "datamodule", TR, "self.missing_thought.append(str(rid))", "pass", T_ROW),
    Mutant(
        "sft_nfc",
        "datamodule",
        "rlt_pl/spans.py",
        "out[key] = nfc_text(key, value)",
        "out[key] = value",
        T_ROW,
    ),
    # trace atomicity / lineage
    Mutant(
        "trace_pending_by_position",
        "traces",
        TW,
        'todo = [r for r in rows if str(r["id"]) not in self.done_ids]',
        "todo = list(rows)",
        T_TR,
    ),
    Mutant("trace_lineage_ignored", "traces", TW, "            if diff:\n", "            if False:\n", T_TR),
    Mutant("trace_restart_ignored", "traces", TW, "if finished and self.restart:", "if False:", T_TR),
    Mutant(
        "trace_dropped_forgotten",
        "traces",
        TW,
        "        if dropped:  # before the shard",
        "        if False:  # before the shard",
        T_TR,
    ),
    # writes killed halfway at the file layer (tests/file_faults.py)
    Mutant(
        "trace_shard_in_place",
        "traces",
        TW,
        '    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")',
        "    fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), str(path)",
        T_TORN_SHARD,
    ),
    Mutant(
        "trace_shard_moved",
        "traces",
        TW,
        "        os.replace(tmp, path)",
        '        __import__("shutil").move(tmp, path)',
        T_TORN_SHARD,
    ),
    Mutant(
        "ckpt_saved_in_place",
        "checkpoint",
        CK,
        "        partial = filepath + PARTIAL_SUFFIX",
        "        partial = filepath",
        T_TORN_CKPT,
    ),
    Mutant(
        "ckpt_published_by_copy",
        "checkpoint",
        CK,
        "        _fsync_path(partial)\n        os.replace(partial, final)",
        "        _fsync_path(partial)\n        shutil.copyfile(partial, final)",
        T_TORN_CKPT,
    ),
    Mutant(
        "ckpt_path_ignored",
        "resume",
        CLI,
        '            check_ckpt_path_last(self.trainer, self.config[subcommand].get("ckpt_path"))',
        '            self.config_init[subcommand]["ckpt_path"] = None',
        T_CLI_RESUME,
    ),
    Mutant(
        "resume_rng_not_restored",
        "resume",
        GM,
        "            restore_rng_states(self._pending_rng)\n            self._pending_rng = None",
        "            self._pending_rng = None",
        T_CLI_RESUME,
    ),
    # signals
    Mutant("sig_exit_zero", "signals", SD, "exception.code = 128 + int(signum)", "pass", T_SIG),
    Mutant("sig_no_checkpoint", "signals", SD, "        trainer.save_checkpoint(partial)\n", "        return\n", T_SIG),
    Mutant(
        "sig_predict_ignored",
        "signals",
        SD,
        "        if signum is not None:  # every earlier",
        "        if False:  # every earlier",
        T_SIG,
    ),
    Mutant(
        "sig_sigint_ignored", "signals", SD, "self._trainer._signal_connector.received_sigterm = True", "pass", T_SIG
    ),
]


def run_one(m: Mutant, timeout: int) -> tuple[str, float]:
    path = REPO / m.path
    original = path.read_text(encoding="utf-8")
    if original.count(m.old) != 1:
        return f"stale (snippet found {original.count(m.old)} times)", 0.0
    t0 = time.time()
    try:
        path.write_text(original.replace(m.old, m.new), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *m.tests]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=timeout)
            status = "survived" if proc.returncode == 0 else "caught"
        except subprocess.TimeoutExpired:
            status = "caught (timeout)"
    finally:
        path.write_text(original, encoding="utf-8")
    return status, time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mutate")
    p.add_argument("--only", nargs="*", default=None, help="mutant names or groups")
    p.add_argument("--list", action="store_true")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only or m.group in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.group:12s} {m.name:30s} {m.path}  -> {' '.join(m.tests)}")
        return 0
    dirty = subprocess.run(
        ["git", "status", "--porcelain", *{m.path for m in chosen}], cwd=REPO, capture_output=True, text=True
    ).stdout
    if dirty.strip():
        raise SystemExit(f"uncommitted changes in mutated files; commit or stash first:\n{dirty}")
    results = []
    for m in chosen:
        status, secs = run_one(m, args.timeout)
        results.append({"name": m.name, "group": m.group, "status": status, "seconds": round(secs, 1)})
        print(f"{status:16s} {secs:6.1f}s  {m.group:12s} {m.name}", flush=True)
    caught = sum(r["status"].startswith("caught") for r in results)
    valid = sum(not r["status"].startswith("stale") for r in results)
    print(f"caught {caught}/{valid} ({100 * caught / max(valid, 1):.0f}%)")
    for r in results:
        if not r["status"].startswith("caught"):
            print(f"  {r['status']}: {r['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if caught == valid else 1


if __name__ == "__main__":
    raise SystemExit(main())
