"""Layer sensitivity: the norm of the loss gradient with respect to each target module's weight.

||dL/dW||_F is the rate at which one unit of update in that module can lower the loss, whether or not the
module is adapted yet. The env measures it on one training batch per decision (the weight gradients
ride along that step's backward pass) and smooths it; at reset it uses a probe that depends only on the
base model, so it is computed once per instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from strato_env.tasks.base import Batch


class WeightGradients:
    """Switches on gradients of the given (frozen) weights for one backward pass and reads their norms."""

    def __init__(self, weights: Sequence[nn.Parameter]) -> None:
        self.weights = list(weights)

    def __enter__(self) -> WeightGradients:
        for weight in self.weights:
            weight.requires_grad_(True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for weight in self.weights:
            weight.requires_grad_(False)
            weight.grad = None

    def norms(self) -> np.ndarray:
        zero = torch.zeros((), device=self.weights[0].device)
        values = torch.stack([w.grad.norm() if w.grad is not None else zero for w in self.weights])
        return values.double().cpu().numpy()


def probe_importance(
    model: nn.Module,
    weights: Sequence[nn.Parameter],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    batch: Batch,
) -> np.ndarray:
    """Gradient norms per module on one batch, without any optimizer step."""
    with WeightGradients(weights) as gradients:
        loss(model, batch).backward()
        norms = gradients.norms()
    for parameter in model.parameters():
        parameter.grad = None
    return norms


def normalized(values: np.ndarray) -> np.ndarray:
    """Scale-free importance in [0, 1]: divided by the largest module's value."""
    top = float(np.max(values)) if len(values) else 0.0
    return values / top if top > 0 and np.isfinite(top) else np.zeros_like(values)
