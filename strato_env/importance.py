"""Layer sensitivity: what adapting each module can still gain.

Two measurements, combined by the env. Once per instance, a *probe* trains a LoRA update on each module
alone for a few steps and records the relative loss drop: how much that module can gain on its own.
While training, the norm of the loss gradient with respect to each module's weight, ||dL/dW||_F, is read
on one batch per decision (the weight gradients ride along that step's backward pass); its ratio to the
value at the start says how much of the module's sensitivity remains. Importance = probe gain x that ratio.
Both are measured by the batched engine (`strato_env.episodes`): the probe trains every module's update at
once, one episode each, and the weight gradients are read per episode from the training step's backward.

The probe's trained updates also say how much rank each module needs: `energy_shares` is the share of a
module's update that its best rank-r approximation keeps, so importance x the share a ladder step adds
estimates that step's gain (the probe gain at more than one rank, read off one probe).
"""

from __future__ import annotations

import numpy as np
import torch


def normalized(values: np.ndarray) -> np.ndarray:
    """Scale-free importance in [0, 1]: min-max scaled over the modules (all 0 when they are equal)."""
    if len(values) == 0 or not np.all(np.isfinite(values)):
        return np.zeros_like(values)
    low, high = float(np.min(values)), float(np.max(values))
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


@torch.no_grad()
def energy_shares(B: torch.Tensor, A: torch.Tensor) -> np.ndarray:
    """Share of ||B @ A||_F^2 that the best rank-r approximation of the update B @ A keeps, for r = 0 .. r_max
    (B: out x r_max, A: r_max x in): the cumulative squared singular values over their sum. Computed on the thin
    QR factors of B and A^T (an r_max x r_max SVD, never out x in). A zero or non-finite update (no probe, or a
    diverged one) has no spectrum to read: its shares grow linearly with the rank, r / r_max."""
    r_max = A.shape[0]
    linear = np.arange(r_max + 1) / r_max
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        return linear
    _, R_b = torch.linalg.qr(B.double())
    _, R_a = torch.linalg.qr(A.T.double())
    energy = torch.linalg.svdvals(R_b @ R_a.T).square().cpu().numpy()
    total = energy.sum()
    if not np.isfinite(total) or total <= 0:
        return linear
    return np.concatenate([[0.0], np.cumsum(energy) / total]).clip(0.0, 1.0)
