"""TR-DPO reference sync (SakanaAI/RLT): every τ optimizer steps, θ_ref ← α θ + (1 − α) θ_ref (paper: α 0.9, τ 32)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback


@runtime_checkable
class HasReference(Protocol):
    """What the sync needs of a module (GRPOModule provides it); callbacks depend on this, not on `rlt_pl.modules`."""

    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    reference: str
    ref_synced: bool


def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """TR-DPO soft update θ_ref ← α θ + (1 − α) θ_ref (SakanaAI/RLT)."""
    with torch.no_grad():
        for p_ref, p in zip(reference.parameters(), policy.parameters()):
            p_ref.lerp_(p.detach().to(p_ref.dtype), alpha)


class ReferenceSyncCallback(Callback):
    """Soft-update the GRPO reference model towards the policy.

    Args:
        alpha: mix-up weight of the policy (paper `ref_model_mixup_alpha` 0.9).
        every_n_steps: τ, optimizer steps between syncs (paper `ref_model_sync_steps` 32); steps skipped for a
            non-finite loss are not optimizer steps and do not count.
    """

    def __init__(self, alpha: float = 0.9, every_n_steps: int = 32) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"ReferenceSyncCallback.alpha must be in (0, 1], got {alpha}")
        if every_n_steps < 1:
            raise ValueError("ReferenceSyncCallback.every_n_steps must be >= 1")
        self.alpha = alpha
        self.every_n_steps = every_n_steps
        self.syncs = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, HasReference) or pl_module.reference != "copy":
            raise ValueError("ReferenceSyncCallback needs model.init_args.reference: copy (a separate reference model)")
        pl_module.ref_synced = True  # the reference will diverge from its source: keep it in checkpoints

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # `global_step` counts optimizer steps taken: a skipped (non-finite) step leaves it where it was, and μ > 1
        # moves it by μ per batch. Sync once each time it passes a multiple of τ, never twice at the same multiple.
        due = trainer.global_step // self.every_n_steps
        if due > self.syncs and pl_module.ref_model is not None:
            sync_reference(pl_module.model, pl_module.ref_model, self.alpha)
            self.syncs = due
            pl_module.log("train/ref_syncs", float(self.syncs))

    def state_dict(self) -> dict:
        return {"syncs": self.syncs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.syncs = state_dict["syncs"]
