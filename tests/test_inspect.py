"""The explanation inspector: per-token terms from the scorer match the reward, the page's structure (one coloured
span per token, the reward decomposition, the group's advantages), the teacher-RL module writes a page next to its
TensorBoard logs, the CLI renders a run directory, and (slow) headless Chromium screenshots the page."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import lightning as L
import pytest
import torch

from rlt_pl.callbacks import StudentRewardCallback
from rlt_pl.datamodules import AdditionDataModule
from rlt_pl.formats import CompactFormat
from rlt_pl.generation import SamplingConfig
from rlt_pl.inspect import main, read_records, render_html, rkl_colour, sample_records, solution_colour
from rlt_pl.models import ModelConfig, load_causal_lm, load_tokenizer
from rlt_pl.modules import TeacherRLModule
from rlt_pl.scoring import RLTScorer
from rlt_pl.tiny import build_compact_assets


@pytest.fixture(scope="module")
def compact_dirs(tmp_path_factory) -> dict:
    return build_compact_assets(tmp_path_factory.mktemp("inspect"), CompactFormat().tag_tokens(), seed=0)


class Spans(HTMLParser):
    """Collect the token spans (class, title, text) and the tags a page uses."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict] = []
        self.tags: set[str] = set()
        self.external: list[str] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag in ("script", "link", "img", "iframe") or any(k in a for k in ("src", "href")):
            self.external.append(tag)
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._open = {"class": a["class"], "title": a.get("title", ""), "style": a.get("style", ""), "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def _scored(dirs):
    fmt, tok = CompactFormat(), load_tokenizer(str(dirs["teacher"]))
    student = load_causal_lm(ModelConfig(str(dirs["student"]), dtype="float32"), trainable=False)
    teacher = load_causal_lm(ModelConfig(str(dirs["teacher"]), dtype="float32"), trainable=False)
    qs, ss = ["12+34=?", "5+6=?"], ["46", "11"]
    completions = ["2+4=06;1+3=04;" + fmt.explanation_end, "46" + fmt.explanation_end]
    prompts = [fmt.teacher_prompt(q, s, tok) for q, s in zip(qs, ss)]
    res = RLTScorer(student, tok, fmt).score(qs, ss, completions, teacher_model=teacher, prompts=prompts)
    return res, tok, qs


def test_per_token_terms_reproduce_the_reward(compact_dirs):
    """The record's per-token values are the ones the reward reduces: with the default reductions
    rKL = 3 · mean(d) + 0.03 · max(d) and rSS = mean(ℓS) + 0.01 · min(ℓS) (authors' weights)."""
    res, tok, qs = _scored(compact_dirs)
    records = sample_records(res, tok, qs, advantages=[0.5, -0.5], groups=[0, 0])
    assert [r["advantage"] for r in records] == [0.5, -0.5]
    for rec in records:
        d = torch.tensor([t - s for _, t, s in rec["explanation_tokens"]])
        sol = torch.tensor([lp for _, lp in rec["solution_tokens"]])
        assert len(d) > 0 and len(sol) > 0
        assert rec["rkl"] == pytest.approx(float(3 * d.mean() + 0.03 * d.max()), abs=1e-4)
        assert rec["rss"] == pytest.approx(float(sol.mean() + 0.01 * sol.min()), abs=1e-4)
        assert rec["reward"] == pytest.approx(rec["rss"] - rec["rkl"] + rec["match"], abs=1e-4)
    assert "".join(t for t, _ in records[0]["solution_tokens"]) == "46"
    assert "".join(t for t, _, _ in records[0]["explanation_tokens"]).strip() == "2+4=06;1+3=04;"


def test_page_structure():
    records = [
        {
            "question": "1+2=?<b>",
            "reward": -1.5,
            "rss": -0.5,
            "rkl": 1.0,
            "match": 0.0,
            "advantage": 0.7,
            "group": 3,
            "explanation_tokens": [["1", -0.1, -2.1], ["+", -1.0, -0.5], ["\n", -0.2, -0.2]],
            "solution_tokens": [["3", -0.05], ["!", -7.0]],
        },
        {"question": "q", "reward": 0.0, "rss": 0.0, "rkl": 0.0, "advantage": -0.7, "group": 3},
    ]
    page = render_html(records)
    parser = Spans()
    parser.feed(page)
    tokens = [s for s in parser.spans if s["title"]]
    assert [s["class"] for s in tokens] == ["tok e"] * 3 + ["tok s"] * 2  # one span per token
    assert tokens[0]["title"].startswith("d = +2.000") and tokens[1]["title"].startswith("d = -0.500")
    assert "rgba(220,40,40,0.50)" in tokens[0]["style"] and "rgba(40,90,220,0.12)" in tokens[1]["style"]
    assert tokens[4]["style"] == f"background:{solution_colour(-7.0)}" and "1.00)" in tokens[4]["style"]
    assert "group 3 — advantages" in page and "[+0.70 -0.70]" in page
    for term in ("<th>reward</th><td>-1.500</td>", "<th>rSS</th><td>-0.500</td>", "<th>rKL</th><td>1.000</td>"):
        assert term in page
    assert "1+2=?&lt;b&gt;" in page  # escaped
    assert not parser.external and "style" in parser.tags  # self-contained
    assert rkl_colour(0.0).endswith("0.00)") and solution_colour(0.0).endswith("0.00)")


def test_teacher_rl_writes_the_page_next_to_its_logs(compact_dirs, tmp_path):
    """One RL step with sample tables every step: `inspect/step_*.{jsonl,html}` in the TensorBoard log dir,
    records carrying the batch's advantages; `python -m rlt_pl.inspect RUN_DIR` renders the newest."""
    L.seed_everything(0)
    module = TeacherRLModule(
        ModelConfig(str(compact_dirs["teacher"]), dtype="float32"),
        format=CompactFormat(),
        num_generations=4,
        micro_batch_size=16,
        lr=1e-3,
        sampling=SamplingConfig(max_new_tokens=16, temperature=0.7),
        sample_table_every_n_steps=1,
    )
    student = StudentRewardCallback(ModelConfig(str(compact_dirs["student"]), dtype="float32"))
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path / "tb", name="rl")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[student],
    )
    trainer.fit(module, AdditionDataModule(num_train=16, num_heldout=4, batch_size=2))
    pages = sorted((Path(logger.log_dir) / "inspect").glob("step_*.html"))
    assert [p.name for p in pages] == ["step_000001.html"]  # named by the global step after the update
    records = read_records(pages[-1].with_suffix(".jsonl"))
    assert len(records) == 8 and sorted({r["group"] for r in records}) == [0, 1]
    for group in (0, 1):
        advs = [r["advantage"] for r in records if r["group"] == group]
        assert len(advs) == 4 and abs(sum(advs)) < 1e-4  # group-normalised advantages sum to zero
    assert all(r["explanation_tokens"] or not r["explanation"] for r in records)
    out = tmp_path / "report.html"
    assert main([str(tmp_path / "tb"), "--out", str(out)]) == 0
    assert out.read_text() == pages[-1].read_text().replace("step 1", "step_000001.jsonl")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_chromium_screenshots_the_page(compact_dirs, tmp_path):
    """A real browser renders the page: the screenshot is a PNG with both token colours in it."""
    res, tok, qs = _scored(compact_dirs)
    page = tmp_path / "page.html"
    page.write_text(render_html(sample_records(res, tok, qs, advantages=[1.0, -1.0], groups=[0, 0])))
    png = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1000,700",
    ]
    subprocess.run([_chromium(), *flags, page.as_uri()], check=True, capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert re.search(rb"IDAT", data)


def test_score_per_token_feeds_the_inspector(tiny_dirs, tmp_path):
    """`python -m rlt_pl.score --per-token` rows carry the per-token terms; `rlt_pl.inspect` renders them."""
    import json

    from rlt_pl import score

    src, dst = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    row = {"question": "what is 2 + 3?", "solution": "\n\n5\n\n", "completion": "add 2 and 3\n\n<|end_of_explanation|>"}
    src.write_text(json.dumps(row) + "\n")
    argv = ["--teacher", str(tiny_dirs["teacher"]), "--student", str(tiny_dirs["student"]), "--input", str(src)]
    assert score.main([*argv, "--output", str(dst), "--per-token"]) == 0
    (rec,) = read_records(dst)
    d = torch.tensor([t - s for _, t, s in rec["explanation_tokens"]])
    assert rec["rkl"] == pytest.approx(float(3 * d.mean() + 0.03 * d.max()), abs=1e-4)
    assert "add 2 and 3" in "".join(t for t, _, _ in rec["explanation_tokens"])
    out = tmp_path / "page.html"
    assert main([str(dst), "--out", str(out)]) == 0
    parser = Spans()
    parser.feed(out.read_text())
    assert len([s for s in parser.spans if s["title"]]) == len(rec["explanation_tokens"]) + len(rec["solution_tokens"])
