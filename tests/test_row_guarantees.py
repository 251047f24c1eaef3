"""Row-level input guarantees at the DataModule boundary and in the SFT encoder: every bad line is counted and
reported by id (never fatal, never a crash inside `training_step`), text is NFC-normalised (counted), trace ids
that are null or collide across types are reported instead of silently dropping distinct rows, and traces without
a `thought` are counted."""

from __future__ import annotations

import json
import unicodedata

import pytest

from rlt_pl.datamodules.traces import TracesDataModule
from rlt_pl.formats import StratosFormat
from rlt_pl.models import ModelConfig
from rlt_pl.modules.sft import StudentDistillModule

NFC_Q = "Café: what is 2 + 3?"
NFD_Q = unicodedata.normalize("NFD", NFC_Q)


def _trace(rid, question="What is 2 + 3?", thought="We add.") -> dict:
    return {"id": rid, "question": question, "solution": "5", "thought": thought, "answer": "5"}


def test_hostile_trace_lines_are_counted_by_id_and_the_rest_loads(tmp_path) -> None:
    lines = [
        json.dumps(_trace("a")).encode(),
        json.dumps(_trace("nfd", question=NFD_Q), ensure_ascii=False).encode(),
        b'{"id": "sur", "question": "\\ud800", "solution": "5", "thought": "t"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": "big", "question": "q", "solution": "5", "n": ' + b"9" * 5000 + b"}",
        b'{"id": "utf", "question": "\xff", "solution": "5"}',
        json.dumps(_trace(None)).encode(),
        json.dumps(_trace(1)).encode(),
        json.dumps(_trace("1")).encode(),
        json.dumps(_trace("no-thought", thought=None)).encode(),
    ]
    shards = tmp_path / "traces"
    shards.mkdir()
    (shards / "shard-00000.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    dm = TracesDataModule(data_path=str(shards), batch_size=2)
    with pytest.warns(UserWarning) as caught:
        dm.setup()
    messages = " ".join(str(w.message) for w in caught)
    assert [r["id"] for r in dm.rows] == ["a", "nfd", "1", "no-thought"]
    assert dm.rows[1]["question"] == NFC_Q and dm.nfc_normalized == 1
    reasons = dict(dm.invalid_rows)
    assert "lone surrogate" in reasons["sur"]
    assert "nested too deeply" in reasons["traces-3"]
    assert "digit" in reasons["traces-4"] or "limit" in reasons["traces-4"]
    assert "not valid UTF-8" in reasons["traces-5"]
    assert reasons["traces-6"] == "id is null"
    assert "collides with id '1' (int)" in reasons["traces-8"]
    assert "1 rows have no thought and train answer-only: no-thought" in messages
    stats = dm.data_stats()
    assert stats["data/traces/invalid_rows"] == 6.0 and stats["data/traces/nfc_normalized"] == 1.0
    assert stats["data/traces/missing_thought"] == 1.0


def test_distillation_encoder_takes_nfd_rows(tiny_dirs, tokenizer) -> None:
    module = StudentDistillModule(ModelConfig(str(tiny_dirs["student"])), format=StratosFormat())
    module.tokenizer = tokenizer
    nfc = {"id": "r", "question": NFC_Q, "solution": "5", "thought": "We add.", "answer": "5", "metadata": {}}
    nfd = dict(nfc, question=NFD_Q, thought=unicodedata.normalize("NFD", "Ça fait 5."))
    want = module.encode([dict(nfc, thought="Ça fait 5.")])
    got = module.encode([nfd])
    assert got.input_ids.tolist() == want.input_ids.tolist()
    assert got.masks["completion"].tolist() == want.masks["completion"].tolist()
    with pytest.raises(ValueError, match="row 'r': field 'question' holds a lone surrogate"):
        module.encode([dict(nfc, question="\ud800")])
