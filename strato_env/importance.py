"""Layer sensitivity: what adapting each module can still gain.

Two measurements, combined by the env. Once per instance, a *probe* trains a LoRA update on each module
alone for a few steps and records the relative loss drop: how much that module can gain on its own.
While training, the norm of the loss gradient with respect to each module's weight, ||dL/dW||_F, is read
on one batch per decision (the weight gradients ride along that step's backward pass); its ratio to the
value at the start says how much of the module's sensitivity remains. Importance = probe gain x that ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from strato_env.adapters import DynamicLora
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


def gradient_norms(
    model: nn.Module,
    weights: Sequence[nn.Parameter],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    batch: Batch,
) -> np.ndarray:
    """||dL/dW||_F per module on one batch, without any optimizer step."""
    with WeightGradients(weights) as gradients:
        loss(model, batch).backward()
        norms = gradients.norms()
    for parameter in model.parameters():
        parameter.grad = None
    return norms


def probe_gains(
    lora: DynamicLora,
    rank: int,
    batches: Sequence[Batch],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    evaluate: Callable[[], float],
) -> np.ndarray:
    """Relative loss drop of a rank-`rank` update on each module alone after one step per batch."""
    initial = evaluate()
    gains = []
    for name in lora.layers:
        lora.reinitialize({name: rank}, torch.Generator(lora.device).manual_seed(0))
        for batch in batches:
            loss(lora.peft_model, batch).backward()
            lora.optimizer.step()
            lora.optimizer.zero_grad(set_to_none=True)
        drop = (initial - evaluate()) / initial if initial > 0 else 0.0
        gains.append(max(drop, 0.0) if np.isfinite(drop) else 0.0)
    lora.reinitialize({})
    return np.array(gains)


def normalized(values: np.ndarray) -> np.ndarray:
    """Scale-free importance in [0, 1]: min-max scaled over the modules (all 0 when they are equal)."""
    if len(values) == 0 or not np.all(np.isfinite(values)):
        return np.zeros_like(values)
    low, high = float(np.min(values)), float(np.max(values))
    return (values - low) / (high - low) if high > low else np.zeros_like(values)
