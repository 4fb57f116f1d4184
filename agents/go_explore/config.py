"""Typed, validated configuration of the Go-Explore search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agents.go_explore.cells import DepthProfileCell


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field_name}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GoExploreConfig:
    """Budget and exploration settings of one Go-Explore search."""

    max_optimizer_steps: int = 400
    """Search budget: optimizer steps actually run (each env step costs env.config.inner_steps; returns are free)."""
    explore_steps: int | None = None
    """Env steps per exploration from a selected cell; None: until the episode ends."""
    moves: str = "groups"
    """Random exploration: 'groups' draws a group of modules (a layer, a module kind or one module) and moves
    all of it one way; 'modules' moves every module on its own."""
    importance_guided: bool = True
    """Random exploration reads the observed importance: a group is drawn in proportion to its mean importance
    and grows with probability equal to it (a module, with moves='modules', likewise); False: uniform draws."""
    groups_per_step: int = 1
    """moves='groups': groups moved at each env step."""
    repeat_probability: float = 1.0
    """moves='groups': chance that a step repeats the previous step's group moves (1: one draw per exploration)."""
    keep_probability: float = 0.5
    """moves='modules': chance that a module keeps its rank; otherwise an allowed shrink or grow."""
    improvement_bonus: float = 0.1
    """Extra selection weight per past exploration that found a new or better cell (0 = pure count-based)."""
    budget_buckets: int = 4
    """Default cell (DepthProfileCell): buckets of the budget used."""
    depth_bins: int = 4
    """Default cell (DepthProfileCell): depth bins of the rank profile (1: the mean ladder index of all modules)."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_optimizer_steps) or self.max_optimizer_steps < 1:
            _fail("max_optimizer_steps", self.max_optimizer_steps, "expected an integer >= 1")
        if self.explore_steps is not None and (not _is_int(self.explore_steps) or self.explore_steps < 1):
            _fail("explore_steps", self.explore_steps, "expected an integer >= 1, or None (until the episode ends)")
        if not _is_number(self.keep_probability) or not 0 <= self.keep_probability <= 1:
            _fail("keep_probability", self.keep_probability, "expected a number in [0, 1]")
        if not isinstance(self.importance_guided, bool):
            _fail("importance_guided", self.importance_guided, "expected true or false")
        if self.moves not in ("modules", "groups"):
            _fail("moves", self.moves, "expected 'modules' or 'groups'")
        if not _is_int(self.groups_per_step) or self.groups_per_step < 1:
            _fail("groups_per_step", self.groups_per_step, "expected an integer >= 1")
        if not _is_number(self.repeat_probability) or not 0 <= self.repeat_probability <= 1:
            _fail("repeat_probability", self.repeat_probability, "expected a number in [0, 1]")
        if not _is_number(self.improvement_bonus) or self.improvement_bonus < 0:
            _fail("improvement_bonus", self.improvement_bonus, "expected a finite number >= 0")
        DepthProfileCell(self.budget_buckets, self.depth_bins)  # validates both
