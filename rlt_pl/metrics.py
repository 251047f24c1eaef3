"""pass@k: the unbiased estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1) as a
pure function and as a torchmetrics ``Metric`` that averages it over questions (sum/count states, DDP-safe).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question: ``1 - C(n - c, k) / C(n, k)``.

    Computed in the numerically stable product form ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``.

    Args:
        n: Samples drawn for the question.
        c: Correct samples among them.
        k: The k of pass@k; must satisfy ``1 <= k <= n``.

    Returns:
        The probability that at least one of ``k`` samples drawn without replacement is correct.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


class PassAtK(Metric):
    """Mean unbiased pass@k over questions.

    Args:
        k: The k of pass@k.
        **kwargs: Forwarded to ``torchmetrics.Metric``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, k: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"PassAtK k must be >= 1, got {k}")
        self.k = k
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, n: Sequence[int] | torch.Tensor, c: Sequence[int] | torch.Tensor) -> None:
        """Add questions with ``n[i]`` samples of which ``c[i]`` were correct.

        Args:
            n: Samples per question, shape ``[Q]``.
            c: Correct samples per question, shape ``[Q]``.
        """
        n_list = n.tolist() if isinstance(n, torch.Tensor) else list(n)
        c_list = c.tolist() if isinstance(c, torch.Tensor) else list(c)
        if len(n_list) != len(c_list):
            raise ValueError(f"PassAtK.update: n has {len(n_list)} entries but c has {len(c_list)}")
        batch_total = sum(pass_at_k(int(ni), int(ci), self.k) for ni, ci in zip(n_list, c_list))
        self.total += batch_total
        self.count += len(n_list)

    def compute(self) -> torch.Tensor:
        """Mean pass@k (0.0 with a warning when no question was added)."""
        if self.count == 0:
            rank_zero_warn(f"PassAtK(k={self.k}).compute() called before any update; returning 0.0")
            return torch.tensor(0.0, dtype=torch.float64)
        return self.total / self.count
