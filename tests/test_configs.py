"""Every YAML under `configs/` parses and instantiates through the CLI (model, data, trainer, callbacks), offline and
without loading weights (`configure_model` is never called).

Fragments (data-only, trainer-only, eval-only files) are combined with the tiny teacher config. Local model paths
under `runs/` are made to exist by linking a tiny compact model there; GPU-only settings are swapped for CPU ones on
machines without CUDA, and `quantization` configs are validated as if CUDA were present (`ModelConfig.validate`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rlt_pl.cli import cli_main
from rlt_pl.formats import CompactFormat
from rlt_pl.models import ModelConfig
from rlt_pl.tiny import build_compact_assets

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
TINY = "configs/teacher/rlt_tiny.yaml"


@pytest.fixture(scope="module")
def config_cwd(tmp_path_factory) -> Path:
    """A working directory with `runs/tiny/{teacher,student}` and a link to the repo's `configs/`."""
    cwd = tmp_path_factory.mktemp("configs")
    build_compact_assets(cwd / "runs" / "tiny", CompactFormat().tag_tokens(), seed=0)
    (cwd / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    return cwd


def _model_paths(node) -> list[str]:
    """Every `name_or_path` value in a parsed YAML."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "name_or_path" and isinstance(v, str)]
        return found + [p for v in node.values() for p in _model_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _model_paths(v)]
    return []


def _link_local_models(cwd: Path, config: dict) -> None:
    """Stand the tiny teacher in for local checkpoints a pipeline would have produced (e.g. runs/demo/pretrain)."""
    for path in _model_paths(config):
        target = cwd / path
        if path.startswith("runs/") and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(cwd / "runs" / "tiny" / "teacher", target_is_directory=True)


def _cpu_overrides(config: dict) -> list[str]:
    """Flags that let a GPU config instantiate on a CPU-only machine (its GPU settings are still parsed)."""
    trainer = config.get("trainer") or {}
    if torch.cuda.is_available() or trainer.get("accelerator") != "gpu":
        return []
    return ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]


def _args(path: str, config: dict) -> list[str]:
    """CLI arguments instantiating `path`: alone when it names a model, else on top of the tiny teacher config."""
    base = [] if "class_path" in (config.get("model") or {}) else ["-c", TINY]  # an override file needs a stage
    # a fragment turning checkpointing off (the demo's) cannot sit on the tiny config's checkpoint callback
    no_ckpt = (
        ["--trainer.callbacks=[]"]
        if base and (config.get("trainer") or {}).get("enable_checkpointing") is False
        else []
    )
    return base + ["-c", path] + no_ckpt + _cpu_overrides(config)


def test_every_config_is_listed():
    """The glob finds the configs this test is about (guards against a moved configs/ directory)."""
    assert TINY in CONFIGS
    assert "configs/teacher/rlt_qwen7b.yaml" in CONFIGS and "configs/teacher/rlt_qwen7b_qlora_24gb.yaml" in CONFIGS
    assert any(c.startswith("configs/data/") for c in CONFIGS)
    assert any(c.startswith("configs/trainer/") for c in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_instantiates(path, config_cwd, monkeypatch):
    monkeypatch.chdir(config_cwd)
    config = yaml.safe_load((REPO / path).read_text()) or {}
    _link_local_models(config_cwd, config)
    text = (REPO / path).read_text()
    if "quantization: 4bit" in text or "quantization: 8bit" in text:
        validate = ModelConfig.validate  # bitsandbytes settings are checked as if on a CUDA machine
        monkeypatch.setattr(ModelConfig, "validate", lambda self, needs_cuda_ok=None: validate(self, True))
    cli = cli_main(_args(path, config), run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    assert cli.model.model is None, "weights were loaded at instantiation (configure_model must do it)"
    if "data" in config and "class_path" in config["data"]:
        assert type(cli.datamodule).__name__ == config["data"]["class_path"].rsplit(".", 1)[1]
    if "model" in config and "class_path" in config["model"]:
        assert type(cli.model).__name__ == config["model"]["class_path"].rsplit(".", 1)[1]


def test_paper_teacher_config_matches_the_spec(config_cwd, monkeypatch):
    """configs/teacher/rlt_qwen7b.yaml holds the paper's RL settings (arXiv 2506.08388)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rlt_pl.callbacks import ReferenceSyncCallback, StudentRewardCallback
    from rlt_pl.formats import StratosFormat

    monkeypatch.chdir(config_cwd)
    path = "configs/teacher/rlt_qwen7b.yaml"
    config = yaml.safe_load((REPO / path).read_text())
    cli = cli_main(["-c", path, *_cpu_overrides(config)], run=False)
    m = cli.model
    assert m.num_generations == 64 and cli.datamodule.batch_size == 16
    assert m.sampling.temperature == 0.7 and m.sampling.max_new_tokens == 16384 and m.sampling.top_p == 1.0
    assert m.lr == 1e-6 and m.lr_schedule == "constant" and m.betas == (0.9, 0.999) and m.weight_decay == 0.0
    assert m.loss_config.beta == 0.04 and m.loss_config.kl_estimator == "k3" and m.num_iterations == 1
    assert m.max_grad_norm == 1.0 and m.reference == "copy" and isinstance(m.format, StratosFormat)
    assert m.model_config.gradient_checkpointing and m.model_config.dtype == "float32"  # fp32 master weights
    assert (
        cli.trainer.max_steps == 125 and config["seed_everything"] == 42 and config["trainer"]["accelerator"] == "gpu"
    )
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    student = callbacks[StudentRewardCallback]
    assert student.student_config.name_or_path == "bespokelabs/Bespoke-Stratos-7B"
    sync = callbacks[ReferenceSyncCallback]
    assert (sync.alpha, sync.every_n_steps) == (0.9, 32)
    ckpt = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint) and c._every_n_train_steps == 25]
    assert ckpt, "no ModelCheckpoint every 25 steps"
    assert type(cli.datamodule).__name__ == "BespokeStratosDataModule"


def test_qlora_config_refuses_cpu_clearly(config_cwd, monkeypatch):
    """Without CUDA and without a CPU-capable bitsandbytes the 24 GB QLoRA config fails at instantiation, naming
    `model.quantization`."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the config is valid here")
    monkeypatch.setattr("rlt_pl.models.bitsandbytes_runs_on_cpu", lambda: False)
    monkeypatch.chdir(config_cwd)
    path = "configs/teacher/rlt_qwen7b_qlora_24gb.yaml"
    config = yaml.safe_load((REPO / path).read_text())
    with pytest.raises(ValueError, match="quantization"):
        cli_main(["-c", path, *_cpu_overrides(config)], run=False)


def test_merge_on_export_of_an_8bit_base_fails_at_construction():
    """An 8-bit base cannot be merged: refused when the module is built, naming the flag, not after the last
    training step. A 4-bit base is accepted (dequantised and merged on export)."""
    from rlt_pl.models import LoraConfig, ModelConfig
    from rlt_pl.modules.grpo import GRPOModule

    config = ModelConfig("Qwen/Qwen2.5-7B-Instruct", quantization="8bit", lora=LoraConfig())
    with pytest.raises(ValueError, match="model.init_args.merge_lora_on_export"):
        GRPOModule(config, merge_lora_on_export=True)
    four_bit = ModelConfig("Qwen/Qwen2.5-7B-Instruct", quantization="4bit", lora=LoraConfig())
    GRPOModule(four_bit, merge_lora_on_export=True)


def test_paper_chain_paths_line_up():
    """Each 7B stage reads exactly what the previous one writes."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"

    def load(p):
        return yaml.safe_load((root / p).read_text())

    sft, rl = load("teacher/sft_qwen7b.yaml"), load("teacher/rlt_qwen7b.yaml")
    traces, distill = load("experiment/traces_qwen7b.yaml"), load("student/distill_qwen7b.yaml")
    assert sft["model"]["init_args"]["export_dir"] == "runs/teacher_sft/export"
    assert traces["model"]["init_args"]["model"]["name_or_path"] == rl["model"]["init_args"]["export_dir"]
    writer = next(c for c in traces["trainer"]["callbacks"] if c["class_path"].endswith("TraceWriter"))
    assert distill["data"]["init_args"]["data_path"] == writer["init_args"]["output_dir"]
