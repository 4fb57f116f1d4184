"""Layer sensitivity: what adapting each module can still gain.

Two measurements, combined by the env. Once per instance, a *probe* trains a LoRA update on each module
alone for a few steps and records the relative loss drop: how much that module can gain on its own.
While training, the norm of the loss gradient with respect to each module's weight, ||dL/dW||_F, is read
on one batch per decision (the weight gradients ride along that step's backward pass); its ratio to the
value at the start says how much of the module's sensitivity remains. Importance = probe gain x that ratio.
Both are measured by the batched engine (`strato_env.episodes`): the probe trains every module's update at
once, one episode each, and the weight gradients are read per episode from the training step's backward.
"""

from __future__ import annotations

import numpy as np


def normalized(values: np.ndarray) -> np.ndarray:
    """Scale-free importance in [0, 1]: min-max scaled over the modules (all 0 when they are equal)."""
    if len(values) == 0 or not np.all(np.isfinite(values)):
        return np.zeros_like(values)
    low, high = float(np.min(values)), float(np.max(values))
    return (values - low) / (high - low) if high > low else np.zeros_like(values)
