"""RNG state for exact resume: every generator sampling and shuffling may draw from, stored in checkpoint-safe types."""

from __future__ import annotations

import random

import numpy as np
import torch


def collect_rng_states() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states: everything sampling and shuffling may draw from."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as tensors/ints, so checkpoints still load with torch.load(weights_only=True)
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    numpy_state |= {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of `collect_rng_states` (CUDA states only when the device count matches).

    Args:
        states: output of `collect_rng_states` (older checkpoints may lack numpy/cuda).
    """
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        n = states["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
