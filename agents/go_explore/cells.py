"""Cell representations for Go-Explore: map the env's current state to a coarse, hashable cell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym

from strato_env.validation import check_int

Cell = tuple[int, ...]


class CellFunction(Protocol):
    """Maps the env's current state to a cell; states with the same cell count as equivalent."""

    def __call__(self, env: gym.Env) -> Cell: ...


@dataclass(frozen=True)
class DepthProfileCell:
    """Default cell: (decisions made, budget-used bucket, rounded mean ladder index per depth bin).

    A depth bin without modules reads -1.
    """

    budget_buckets: int = 4
    """Buckets of P_t / B: the used fraction is floored to a multiple of 1 / budget_buckets (full = budget_buckets)."""
    depth_bins: int = 4
    """Equal-width bins of relative depth (0 = first layer, 1 = last) over which ladder indices are averaged."""

    def __post_init__(self) -> None:
        check_int("budget_buckets", self.budget_buckets, 1)
        check_int("depth_bins", self.depth_bins, 1)

    def __call__(self, env: gym.Env) -> Cell:
        base: Any = env.unwrapped
        ranks = base.ranks
        used = base.params_of(ranks) / base.budget
        bucket = min(int(used * self.budget_buckets), self.budget_buckets)
        totals = [0] * self.depth_bins
        counts = [0] * self.depth_bins
        for module in base.modules:
            index = min(int(module.depth * self.depth_bins), self.depth_bins - 1)
            totals[index] += base.ladder.index(ranks[module.name])
            counts[index] += 1
        # Round half up explicitly: Python's round() rounds half to even.
        profile = [int(total / count + 0.5) if count else -1 for total, count in zip(totals, counts, strict=True)]
        return (base.decisions_made, bucket, *profile)


@dataclass(frozen=True)
class ExactAllocationCell:
    """Finest cell: (decisions made, ladder index of every module). Only sensible for small models."""

    def __call__(self, env: gym.Env) -> Cell:
        base: Any = env.unwrapped
        ranks = base.ranks
        return (base.decisions_made, *(base.ladder.index(ranks[m.name]) for m in base.modules))
