"""Multi-process plumbing on top of torch.distributed and Lightning's strategies (DDP, FSDP2).

Design (why GRPO shards with FSDP2): GRPO optimises manually and calls `manual_backward` inside `training_step`.
Lightning's `FSDPStrategy` (FSDP1) wraps the whole LightningModule, so `training_step` runs inside the root FSDP
forward and a backward there trips FSDP's state machine (Lightning-AI/pytorch-lightning #19626, #19685).
`FSDP2Strategy` below is Lightning's `ModelParallelStrategy` with every rank on the sharding axis: Lightning does not
wrap the LightningModule, `configure_model` applies `fully_shard` to each decoder layer and to the model root
(`shard_model`), so the training step, generation and any number of backward passes run on a plain module whose
layers all-gather their parameters in their own forward/backward hooks. The model keeps its class, so HF
`generate`, `save_pretrained` and peft work unchanged.

Every sharded forward is a collective: ranks must issue the same number of forward calls. `agree_max` and
`pad_forward_calls` make data-dependent counts (generation steps, chunked scoring, text-path re-scoring) equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2, `fully_shard`) over all ranks of all nodes.

    `ModelParallelStrategy` with `data_parallel_size = world size` and `tensor_parallel_size = 1`: the module shards
    itself in `configure_model` (`rlt_pl.distributed.shard_model`), checkpoints are sharded (torch distributed
    checkpoint directories) unless `save_distributed_checkpoint: false`.

    Args:
        save_distributed_checkpoint: write sharded checkpoint directories (False: one full file from rank 0).
        process_group_backend: `nccl` on GPUs, `gloo` on CPU (None: picked from the device).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether `model` has FSDP2-sharded parameters (its forward is then a collective)."""
    if model is None or not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """`fully_shard` every decoder layer (the HF model's `_no_split_modules` classes), then the HF model itself.

    For a peft model the root unit is the wrapped HF model, not the `PeftModel`: peft's `generate` calls the HF
    model directly, whose forward must all-gather the root parameters (embeddings, final norm, LM head). Frozen and
    trainable (LoRA) parameters may share a unit in FSDP2.

    Args:
        model: a `PreTrainedModel` or `peft.PeftModel`.
        mesh: the 1-D data-parallel device mesh (`LightningModule.device_mesh["data_parallel"]`).
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_names = set(base._no_split_modules or ())
    if not layer_names:
        raise ValueError(f"{type(base).__name__} declares no _no_split_modules: cannot find its decoder layers")
    for module in model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, mesh=mesh)
    fully_shard(base, mesh=mesh)
    return model


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_max(value: int) -> int:
    """The maximum of `value` over all ranks (identity without a process group)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_ranks_true(flag: bool) -> bool:
    """True only if `flag` holds on every rank (so all ranks take the same branch)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def pad_forward_calls(model: torch.nn.Module, calls: int) -> None:
    """Under sharding, agree on the busiest rank's number of forward calls and run the difference as 1-token
    dummy forwards now, before this rank's `calls` real ones (a forward is itself a collective, so the count has
    to be agreed before any of them). No-op for unsharded models.

    Every rank must call this at the same point (it all-reduces the count).

    Args:
        model: the model about to be run.
        calls: forward calls this rank is about to make.
    """
    if not is_sharded(model):
        return
    device = next(model.parameters()).device
    target = agree_max(calls)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        for _ in range(target - calls):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)


def all_gather_tensor(x: Tensor) -> Tensor:
    """Concatenate `x` [n, ...] from all ranks in rank order (each rank's n may differ)."""
    if world()[1] == 1:
        return x
    device = _comm_device()
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world()[1])]
    dist.all_gather(sizes, n)
    width = max(int(s) for s in sizes)
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)]).to(x.device)


def all_gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (a list of one without a process group)."""
    if world()[1] == 1:
        return [obj]
    out: list = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a list of floats."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """The full (unsharded) state dict on CPU, gathered with every rank taking part; None on ranks other than 0.

    Unsharded models return their own state dict on every rank.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


__all__ = [
    "FSDP2Strategy",
    "agree_max",
    "all_gather_objects",
    "all_gather_tensor",
    "all_ranks_true",
    "all_reduce_sum",
    "full_state_dict",
    "is_sharded",
    "pad_forward_calls",
    "shard_model",
    "world",
]
