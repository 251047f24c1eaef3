"""bitsandbytes 8-bit AdamW variants (`rlt_pl.optim.AdamW8bit` in YAML resolves here).

A departure that saves 6 B/param of optimizer state; both refuse to start on a machine without CUDA unless
`allow_cpu` is set. Kept apart from `rlt_pl.optim` so bitsandbytes is imported only by runs that use it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # CPU kernel-hub notice at import
import bitsandbytes as bnb  # noqa: E402

__all__ = ["AdamW8bit", "PagedAdamW8bit"]


def _check_cuda(name: str, allow_cpu: bool) -> None:
    if not allow_cpu and not torch.cuda.is_available():
        raise RuntimeError(
            f"optimizer {name} needs CUDA; set init_args.allow_cpu: true to run bitsandbytes' CPU path "
            "or use torch.optim.AdamW"
        )


class AdamW8bit(bnb.optim.AdamW8bit):
    """bitsandbytes 8-bit AdamW that fails fast without CUDA.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper RL: 1e-6).
        betas: Adam moment decay rates.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay (paper RL: 0).
        min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes default 4096).
        allow_cpu: permit construction without CUDA (bitsandbytes' slow CPU path; for tests and debugging).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        allow_cpu: bool = False,
    ) -> None:
        _check_cuda(type(self).__name__, allow_cpu)
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
        )


class PagedAdamW8bit(bnb.optim.PagedAdamW8bit):
    """bitsandbytes paged 8-bit AdamW (state pages to host memory under pressure); fails fast without CUDA.

    With `allow_cpu` and no CUDA it warns and runs un-paged, i.e. as `AdamW8bit`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper RL: 1e-6).
        betas: Adam moment decay rates.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay (paper RL: 0).
        min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes default 4096).
        allow_cpu: permit construction without CUDA (falls back to un-paged AdamW8bit).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        allow_cpu: bool = False,
    ) -> None:
        _check_cuda(type(self).__name__, allow_cpu)
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
        )
        if not torch.cuda.is_available():
            warnings.warn("PagedAdamW8bit: no CUDA, paging is off (runs as AdamW8bit on CPU)", stacklevel=2)
            self.is_paged = False
