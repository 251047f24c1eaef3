"""Reward-hacking diagnostics for teacher explanations.

The RLT reward can be gamed by an explanation that simply restates the solution (high rSS); rKL is meant to stop
that. `solution_overlap` measures how much of the solution appears verbatim inside the explanation (character
n-grams), so a falling copy rate during RL is visible in TensorBoard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _ngrams(text: str, n: int) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def solution_overlap(explanation: str, solution: str, n: int = 8) -> float:
    """Fraction of the solution's character n-grams (n ≤ its length) found in the explanation; 0 for empty input."""
    sol = solution.strip()
    if not sol or not explanation:
        return 0.0
    n = min(n, len(sol))
    grams = _ngrams(sol, n)
    return sum(g in explanation for g in grams) / len(grams)


def copy_stats(explanations: Sequence[str], solutions: Sequence[str], threshold: float = 0.5) -> dict[str, Tensor]:
    """Per-completion overlap and copy flag (overlap ≥ threshold): `solution_overlap`, `solution_copy`."""
    overlap = torch.tensor([solution_overlap(e, s) for e, s in zip(explanations, solutions)], dtype=torch.float32)
    return {"solution_overlap": overlap, "solution_copy": (overlap >= threshold).float()}
