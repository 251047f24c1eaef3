"""DataModules on the fixture files (real public schemas, made-up problems): normalisation, malformed-row reports,
splits, loaders, multi-benchmark evaluation, and every configs/data YAML instantiated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule

from rlt_pl.datamodules import (
    AIME24DataModule,
    BespokeStratosDataModule,
    CountdownDataModule,
    GPQADiamondDataModule,
    MATH500DataModule,
    MultiBenchmarkDataModule,
)

FIX = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parent.parent / "configs" / "data"
KEYS = {"id", "question", "answer", "solution", "thought", "metadata"}


def _setup(dm):
    with pytest.warns(UserWarning, match="malformed"):
        dm.setup()
    return dm


def test_math500_rows_and_invalid_report():
    dm = _setup(MATH500DataModule(data_path=str(FIX / "math500.jsonl"), batch_size=3))
    assert [r["id"] for r in dm.rows] == [
        f"test/{s}.json" for s in ("prealgebra/1", "algebra/2", "algebra/3", "geometry/4")
    ]
    assert all(set(r) == KEYS and r["thought"] is None for r in dm.rows)
    assert dm.rows[0]["metadata"] == {"subject": "Prealgebra", "level": 1}
    reasons = dict(dm.invalid_rows)
    assert reasons["test/bad/missing_answer.json"] == "missing field 'answer'"
    assert "level" in reasons["test/bad/level_type.json"]
    assert "empty" in reasons["test/bad/empty_problem.json"]
    assert "not valid JSON" in reasons["math500-7"]
    assert dm.data_stats()["data/math500/invalid_rows"] == 4.0
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [3, 1] and isinstance(batches[0][0], dict)
    assert dm.task.is_correct("\\boxed{0.5}", dm.rows[0])
    with pytest.raises(ValueError, match="stage_splits"):
        dm.train_dataloader()


def test_aime24_ids_answers_and_limit():
    dm = _setup(AIME24DataModule(data_path=str(FIX / "aime24.jsonl")))
    assert [r["id"] for r in dm.rows] == ["aime24-60", "aime24-61", "aime24-62"]
    assert dm.rows[1]["answer"] == "009" and dm.task.is_correct("\\boxed{9}", dm.rows[1])
    assert [i for i, _ in dm.invalid_rows] == ["aime24-63", "aime24-4"]
    limited = AIME24DataModule(data_path=str(FIX / "aime24.jsonl"), limit=2)
    limited.setup()
    assert len(limited.rows) == 2 and limited.invalid_rows == []


def test_gpqa_rows_letters_and_determinism():
    dm = _setup(GPQADiamondDataModule(data_path=str(FIX / "gpqa_diamond.jsonl"), seed=7))
    again = _setup(GPQADiamondDataModule(data_path=str(FIX / "gpqa_diamond.jsonl"), seed=7))
    assert [r["answer"] for r in dm.rows] == [r["answer"] for r in again.rows]
    for row in dm.rows:
        options = row["metadata"]["options"]
        assert options["ABCD".index(row["answer"])] == row["metadata"]["correct_text"]
        prompt = dm.task.format_question(row)
        assert f"{row['answer']}) {row['metadata']['correct_text']}" in prompt
        assert dm.task.is_correct(f"The answer is ({row['answer']})", row)
    assert {i for i, _ in dm.invalid_rows} == {"recDDD444", "recEEE555", "recFFF666"}


def test_gpqa_auth_error_is_actionable(monkeypatch):
    import datasets

    def gated(*args, **kwargs):
        raise ConnectionError("401 Client Error: this dataset is gated")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        GPQADiamondDataModule().prepare_data()


def test_countdown_fixture_splits_and_reports():
    dm = _setup(CountdownDataModule(data_path=str(FIX / "countdown.jsonl"), val_size=1, test_size=2, batch_size=2))
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 3, "val": 1, "test": 2, "all": 6}
    ids = [r["id"] for s in ("train", "val", "test") for r in dm.splits[s]]
    assert sorted(ids) == sorted(r["id"] for r in dm.rows)  # disjoint and complete
    assert [i for i, _ in dm.invalid_rows] == ["countdown-6", "countdown-7", "countdown-8"]
    row = dm.rows[0]
    assert row["answer"] == "24" and row["metadata"]["nums"] == [4, 6, 1]
    assert dm.task.is_correct("<answer>4 * 6 * 1</answer>", row)
    assert sum(len(b) for b in dm.train_dataloader()) == 3


def test_countdown_synthetic_offline_and_deterministic():
    make = lambda seed: CountdownDataModule(synthetic=True, num_examples=50, val_size=5, test_size=10, seed=seed)
    a, b, c = make(1), make(1), make(2)
    for dm in (a, b, c):
        dm.prepare_data()  # must not touch the network
        dm.setup()
    assert a.invalid_rows == [] and len(a.splits["train"]) == 35
    assert [r["id"] for r in a.splits["test"]] == [r["id"] for r in b.splits["test"]]
    assert a.rows != c.rows
    assert all(a.task.is_correct(f"<answer>{r['solution']}</answer>", r) for r in a.rows)
    with pytest.raises(ValueError, match="leave no training rows"):
        CountdownDataModule(synthetic=True, num_examples=10, val_size=5, test_size=5).setup()


def test_bespoke_parsing_verbatim_and_malformed():
    dm = _setup(BespokeStratosDataModule(data_path=str(FIX / "bespoke_stratos.json")))
    first = dm.rows[0]
    assert first["question"] == "Return your final response within \\boxed{}. What is $1+1$?"
    assert first["thought"] == "\n\nOne plus one.\n\nThat is two.\n\n"
    assert first["solution"] == "\n\nThe sum is $\\boxed{2}$.\n\n"
    assert first["answer"] == "2" and dm.rows[1]["answer"] == "\\frac{3}{4}"
    assert dm.rows[2]["answer"] == "def f():\n    return 3"  # no box: stripped solution
    reasons = dict(dm.invalid_rows)
    assert "end_of_solution" in reasons["bespoke_stratos-3"]
    assert "expected 'user'" in reasons["bespoke_stratos-4"]
    assert "list" in reasons["bespoke_stratos-5"]
    assert "begin_of_solution" in reasons["bespoke_stratos-6"]
    assert len(list(dm.train_dataloader())) == 1 and len(dm.rows_for("predict")) == 3


def test_no_val_split_means_no_validation_not_a_crash(tmp_path):
    """A training set with no val split (the paper configs' Bespoke data) runs Lightning's sanity check and
    validation as 'nothing to validate'; a val split, once carved, is used."""
    import torch
    from lightning.pytorch import LightningModule, Trainer

    class Probe(LightningModule):
        def __init__(self):
            super().__init__()
            self.w, self.val_rows = torch.nn.Parameter(torch.zeros(1)), 0

        def training_step(self, batch, batch_idx):
            return (self.w - len(batch)).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            self.val_rows += len(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_size, expected in ((0, 0), (1, 1)):
        dm = _setup(BespokeStratosDataModule(data_path=str(FIX / "bespoke_stratos.json"), val_size=val_size))
        probe = Probe()
        trainer = Trainer(
            max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path
        )
        trainer.fit(probe, datamodule=dm)  # default num_sanity_val_steps=2: asks for the val loader
        assert trainer.global_step == 1 and probe.val_rows == expected * 2  # sanity check + end-of-epoch val
    with pytest.raises(ValueError, match="no split feeds stage 'test'"):
        dm = BespokeStratosDataModule(data_path=str(FIX / "bespoke_stratos.json"))
        _setup(dm).test_dataloader()


def test_bespoke_custom_columns_are_padded():
    dm = _setup(BespokeStratosDataModule(data_path=str(FIX / "custom_reasoning.jsonl")))
    assert dm.rows[0]["thought"] == "\n\nTwo times three is six.\n\n"
    assert dm.rows[0]["solution"] == "\n\nIt is $\\boxed{6}$.\n\n" and dm.rows[0]["answer"] == "6"
    assert dm.rows[1]["question"] == "Name a prime above 10." and dm.rows[1]["thought"] == "\n\n11\n\n"
    assert [i for i, _ in dm.invalid_rows] == ["bespoke_stratos-2", "bespoke_stratos-3"]


def test_parquet_and_json_loading_and_bad_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "math500.jsonl").read_text().splitlines()[:2]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    dm = MATH500DataModule(data_path=str(tmp_path / "m.parquet"))
    dm.setup()
    assert len(dm.rows) == 2 and dm.invalid_rows == []
    (tmp_path / "m.json").write_text(json.dumps({"data": rows + [["not", "a", "dict"]]}))
    dm = _setup(MATH500DataModule(data_path=str(tmp_path / "m.json")))
    assert len(dm.rows) == 2 and "expected an object" in dm.invalid_rows[0][1]
    (tmp_path / "dup.jsonl").write_text("\n".join(json.dumps(r) for r in rows + rows[:1]))
    dm = _setup(MATH500DataModule(data_path=str(tmp_path / "dup.jsonl")))
    assert dm.invalid_rows == [(rows[0]["unique_id"], "duplicate id")]
    with pytest.raises(FileNotFoundError, match="data_path"):
        MATH500DataModule(data_path=str(tmp_path / "missing.jsonl")).setup()
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="suffix"):
        MATH500DataModule(data_path=str(tmp_path / "x.csv")).setup()
    with pytest.raises(ValueError, match="batch_size"):
        MATH500DataModule(batch_size=0)


def test_multi_benchmark_dataloaders_map_to_names():
    import warnings

    dms = [
        MATH500DataModule(data_path=str(FIX / "math500.jsonl"), batch_size=2),
        AIME24DataModule(data_path=str(FIX / "aime24.jsonl"), batch_size=2),
        GPQADiamondDataModule(data_path=str(FIX / "gpqa_diamond.jsonl"), batch_size=2),
    ]
    multi = MultiBenchmarkDataModule(dms)
    multi.prepare_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi.setup("test")
    loaders = multi.test_dataloader()
    assert [sum(len(b) for b in dl) for dl in loaders] == [4, 3, 3]
    assert [multi.name_for(i) for i in range(3)] == ["math500", "aime24", "gpqa_diamond"]
    assert multi.task_for(2).name == "gpqa_diamond"
    assert len(multi.val_dataloader()) == 3
    with pytest.raises(ValueError, match="distinct"):
        MultiBenchmarkDataModule([dms[0], MATH500DataModule()])


def test_log_data_stats_sends_to_logger(tmp_path):
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import CSVLogger

    class Recorder(CSVLogger):
        logged: dict = {}

        def log_metrics(self, metrics, step=None):
            Recorder.logged.update(metrics)

    dm = _setup(CountdownDataModule(data_path=str(FIX / "countdown.jsonl"), val_size=1, test_size=1))
    module = LightningModule()
    module.trainer = Trainer(logger=Recorder(str(tmp_path)), enable_progress_bar=False, enable_checkpointing=False)
    stats = dm.log_data_stats(module)
    assert stats["data/countdown/invalid_rows"] == 3.0 and Recorder.logged == stats


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_config_instantiates(config):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    cfg = parser.parse_path(str(config))
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, LightningDataModule)
    if isinstance(dm, MultiBenchmarkDataModule):
        assert dm.names == ["aime24", "math500", "gpqa_diamond"]
    else:
        assert dm.task.name == dm.name


def test_expected_configs_exist():
    expected = {"math500", "aime24", "gpqa_diamond", "countdown", "countdown_synthetic", "bespoke_stratos"}
    assert expected <= {p.stem for p in CONFIGS.glob("*.yaml")}
