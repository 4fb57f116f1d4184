"""Scoring allocations the same way for every method: losses, the uniform reference and the gap closed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from strato_env.costs import uniform_rank_for_budget
from strato_env.env import RankAllocationEnv


def uniform_allocation(env: RankAllocationEnv) -> dict[str, int]:
    """Uniform LoRA at the budget: the largest integer rank that every module can get (any integer, not only
    ladder ranks)."""
    rank = uniform_rank_for_budget(env.modules, env.budget - env.extra_params)
    return {m.name: rank for m in env.modules}


def uniform_loss(env: RankAllocationEnv, seed: int = 0) -> float:
    """Final loss of uniform LoRA at the env's budget, trained for one episode (remembered per instance)."""
    return env.static_loss(uniform_allocation(env), seed=seed)


def gap_closed(loss: float, uniform: float | None, oracle: float | None) -> float:
    """(L_uniform - L_method) / (L_uniform - L_oracle): 0 for uniform LoRA, 1 for the oracle; NaN when a
    reference is missing, the loss is not finite or the references are equal."""
    if uniform is None or oracle is None or not np.isfinite(loss) or uniform == oracle:
        return float("nan")
    return (uniform - loss) / (uniform - oracle)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval over the finite values (NaN half-width
    with fewer than 2 of them)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    if len(finite) < 2:
        return float(finite[0]), math.nan
    return float(np.mean(finite)), float(stats.t.ppf(0.975, len(finite) - 1) * stats.sem(finite))


def calibration_ratio(env: RankAllocationEnv, seed: int = 0, split: str = "eval") -> float:
    """L_oracle / L_uniform of a planted instance at the env's budget, both trained statically for one episode
    from `seed` (together, on the batched engine): how much a right allocation is worth on it."""
    if env.oracle_allocation is None:
        raise ValueError(f"{env.config.label} has no oracle: calibration needs a planted instance")
    oracle, uniform = env.evaluate_allocations([env.oracle_allocation, uniform_allocation(env)], [seed, seed], split)
    return oracle / uniform


def paired_bootstrap(
    differences: dict[Any, Sequence[float]], samples: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean paired difference, by a bootstrap that resamples instances
    and, within each drawn instance, its seeds. `differences` maps each instance to its per-seed differences
    (non-finite ones must be counted by the caller: they are left out here). The mean weights instances
    alike. NaNs when no instance has a finite difference; a single value gives a zero-width interval."""
    groups = [np.asarray([d for d in v if math.isfinite(d)], dtype=float) for v in differences.values()]
    groups = [g for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for b in range(samples):
        picks = rng.integers(len(groups), size=len(groups))
        means[b] = np.mean([groups[i][rng.integers(len(groups[i]), size=len(groups[i]))].mean() for i in picks])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.mean([g.mean() for g in groups])), float(low), float(high)
