"""Tests for rlt_pl.optim (8-bit optimizers, schedules) and the shipped configs/trainer/*.yaml."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import requires_cuda
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from rlt_pl.optim import AdamW8bit, PagedAdamW8bit, WarmupSchedule, build_scheduler, schedule_factor

NO_CUDA = mock.patch("torch.cuda.is_available", return_value=False)
TRAINER_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "trainer").glob("*.yaml"))


def _linear_step(opt_cls: type, **kwargs) -> tuple[torch.nn.Linear, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)  # 8192 weights >= min_8bit_size: 8-bit state
    before = model.weight.detach().clone()
    opt = opt_cls(model.parameters(), lr=1e-2, **kwargs)
    model(torch.randn(4, 128)).pow(2).sum().backward()
    opt.step()
    return model, opt, before


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_8bit_needs_cuda_unless_allowed(cls):
    with NO_CUDA, pytest.raises(RuntimeError, match=f"optimizer {cls.__name__} needs CUDA; set init_args.allow_cpu"):
        cls(torch.nn.Linear(2, 2).parameters())


def test_adamw8bit_cpu_step_changes_params():
    with NO_CUDA:
        model, opt, before = _linear_step(AdamW8bit, allow_cpu=True)
    assert not torch.equal(model.weight, before)
    assert opt.state[model.weight]["state1"].dtype == torch.uint8
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_paged_falls_back_on_cpu_with_warning():
    with NO_CUDA, pytest.warns(UserWarning, match="paging is off"):
        model, opt, before = _linear_step(PagedAdamW8bit, allow_cpu=True)
    assert not opt.is_paged and not torch.equal(model.weight, before)


def test_optimizer_and_scheduler_from_yaml():
    parser = ArgumentParser()
    parser.add_argument("--optimizer", type=OptimizerCallable)
    parser.add_argument("--lr_scheduler", type=LRSchedulerCallable)
    cfg = parser.parse_object(
        {
            "optimizer": {"class_path": "rlt_pl.optim.AdamW8bit", "init_args": {"lr": 1e-5, "allow_cpu": True}},
            "lr_scheduler": {
                "class_path": "rlt_pl.optim.WarmupSchedule",
                "init_args": {"name": "cosine", "total_steps": 100, "warmup_ratio": 0.05},
            },
        }
    )
    init = parser.instantiate(cfg)
    with NO_CUDA:
        opt = init.optimizer(torch.nn.Linear(4, 4).parameters())
    sched = init.lr_scheduler(opt)
    assert isinstance(opt, AdamW8bit) and opt.param_groups[0]["lr"] == 0.0  # warmup starts at 0
    assert isinstance(sched, WarmupSchedule) and sched.warmup_steps == 5


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("cosine", 0, 0.0),
        ("cosine", 2, 0.4),  # warmup 5: 2 / 5
        ("cosine", 5, 1.0),
        ("cosine", 55, 0.5),  # progress (55-5)/(105-5) = 0.5 -> 0.5 * (1 + cos(pi/2))
        ("cosine", 80, 0.5 * (1 - 2**0.5 / 2)),  # progress 0.75: cos(3 pi / 4) = -sqrt(2) / 2
        ("cosine", 105, 0.0),
        ("linear", 55, 0.5),
        ("linear", 200, 0.0),
        ("constant", 3, 0.6),
        ("constant", 1000, 1.0),
    ],
)
def test_schedule_factor_golden(name, step, expected):
    assert schedule_factor(step, name, warmup_steps=5, total_steps=105) == pytest.approx(expected, abs=1e-9)


def test_build_scheduler_steps_lr():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-5)
    sched = build_scheduler(opt, "cosine", total_steps=100, warmup_ratio=0.05)  # paper teacher SFT
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-5) and lrs[-1] < 1e-8
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    const = build_scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-6))  # paper RL
    assert const.get_last_lr() == [1e-6]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cosine"}, "needs total_steps"),
        ({"name": "exp", "total_steps": 10}, "constant, cosine or linear"),
        ({"total_steps": 10, "warmup_steps": 1, "warmup_ratio": 0.1}, "not both"),
        ({"total_steps": 10, "warmup_ratio": 1.5}, "warmup_ratio"),
        ({"warmup_ratio": 0.1}, "needs total_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_build_scheduler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0), **kwargs)


def _parse_trainer_yaml(path: Path):
    parser = ArgumentParser()
    parser.add_class_arguments(Trainer, "trainer")
    return parser, parser.parse_path(str(path))


def _instantiate_strategy(strategy_cfg) -> Strategy:
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    return parser.instantiate(parser.parse_object({"strategy": strategy_cfg.as_dict()})).strategy


def test_trainer_configs_exist():
    assert {p.name for p in TRAINER_CONFIGS} >= {"cpu.yaml", "gpu_bf16.yaml", "fsdp.yaml", "ddp.yaml"}


@pytest.mark.parametrize("path", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_config_parses(path):
    _, cfg = _parse_trainer_yaml(path)
    assert cfg.trainer.log_every_n_steps == 1
    if not path.name.startswith("cpu") and not path.name.endswith("_cpu.yaml"):  # CPU variants run fp32
        assert (
            cfg.trainer.precision.startswith("bf16") and cfg.trainer.gradient_clip_val is None
        )  # clipping is per stage


def test_cpu_trainer_config_instantiates(tmp_path):
    parser, cfg = _parse_trainer_yaml(TRAINER_CONFIGS[[p.name for p in TRAINER_CONFIGS].index("cpu.yaml")])
    assert cfg.trainer.logger is None  # no logger of its own: the stage config's logger is kept when it is added
    cfg.trainer.default_root_dir = str(tmp_path)
    trainer = parser.instantiate(cfg).trainer
    assert isinstance(trainer, Trainer) and trainer.precision == "32-true"


def test_fsdp_config_strategy_instantiates():
    """fsdp.yaml is FSDP2 through Lightning's ModelParallelStrategy (sharded checkpoints), not FSDPStrategy, whose
    root-module forward breaks GRPO's manual backward."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlt_pl.distributed import FSDP2Strategy

    _, cfg = _parse_trainer_yaml(Path(TRAINER_CONFIGS[0]).parent / "fsdp.yaml")
    strategy = _instantiate_strategy(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert not isinstance(strategy, FSDPStrategy)
    assert strategy._save_distributed_checkpoint is True


def test_ddp_config_strategy_instantiates():
    _, cfg = _parse_trainer_yaml(Path(TRAINER_CONFIGS[0]).parent / "ddp.yaml")
    assert isinstance(_instantiate_strategy(cfg.trainer.strategy), DDPStrategy)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_8bit_step_gpu(cls):
    model = torch.nn.Linear(128, 64).cuda()
    before = model.weight.detach().clone()
    opt = cls(model.parameters(), lr=1e-2)
    model(torch.randn(4, 128, device="cuda")).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model.weight, before)
    assert opt.state[model.weight]["state1"].dtype == torch.uint8


def test_weight_decay_skips_biases_and_norms(tiny_dirs):
    """As the HF Trainer: biases and norm weights get no weight decay, matrices get the configured one."""
    from transformers import AutoModelForCausalLM

    from rlt_pl.models import ModelConfig
    from rlt_pl.modules.sft import TeacherSFTModule

    module = TeacherSFTModule(ModelConfig(str(tiny_dirs["teacher"]), dtype="float32"), weight_decay=0.1)
    module.model = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"])
    module.model.model.layers[0].self_attn.q_proj.bias.requires_grad_(True)  # Qwen2 q/k/v carry biases
    opt = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(module.model.named_parameters())
    assert len(decay_of) == len(names)
    for name, p in names.items():
        expected = 0.0 if name.endswith("bias") or "norm" in name else 0.1
        assert decay_of[id(p)] == expected, name
    assert any(decay_of[id(p)] == 0.0 for n, p in names.items() if "norm" in n)
    assert any(decay_of[id(p)] == 0.0 for n, p in names.items() if n.endswith("bias"))


def test_reference_sync_counts_optimizer_steps_not_batches():
    """TR-DPO: a skipped (non-finite) step repeats `global_step`; the reference is still synced once per τ steps."""
    from types import SimpleNamespace

    from rlt_pl.callbacks.ref_sync import ReferenceSyncCallback

    policy, ref = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        policy.weight.fill_(1.0)
        ref.weight.fill_(0.0)
    module = SimpleNamespace(model=policy, ref_model=ref, log=lambda *a, **k: None)
    cb = ReferenceSyncCallback(alpha=0.9, every_n_steps=2)
    for step in (1, 2, 2, 3, 4):  # the batch after step 2 was skipped: global_step stays 2
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
    assert cb.syncs == 2
    assert torch.allclose(ref.weight, torch.full((2, 2), 0.99))  # 0.9, then 0.9 + 0.1 * 0.9; not 0.999
