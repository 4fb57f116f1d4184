"""Typed, validated configuration of the Go-Explore search."""

from __future__ import annotations

from dataclasses import dataclass

from agents.go_explore.cells import DepthProfileCell
from strato_env.validation import check_bool, check_choice, check_int, check_number


@dataclass
class GoExploreConfig:
    """Budget and exploration settings of one Go-Explore search."""

    max_optimizer_steps: int = 400
    """Search budget: optimizer steps actually run (each env step costs env.config.inner_steps; returns are free)."""
    explore_steps: int | None = None
    """Env steps per exploration from a selected cell; None: until the episode ends."""
    moves: str = "groups"
    """Random exploration: 'groups' draws a group of modules (a layer, a module kind or one module) and moves
    all of it one way; 'modules' moves every module on its own; 'prior' follows iterative greedy's rule
    (`agents.baselines.iterative_greedy_grows`) on the observed importance plus noise drawn once per
    exploration (`prior_noise`), the search's first exploration without noise, so the archive starts from that
    rule's own episode and explores around it. That rule only grows, so 'prior' never returns to a state where no
    grow fits the budget (the exploration would replay its episode)."""
    greedy_episode: bool = False
    """Also train the allocation of `greedy_rule` (read from the same probe, no search) for one episode, as the
    search's second exploration, and keep its result as a candidate: the search then returns the better, on
    validation data, of it and what it found (with moves='prior', iterative greedy's own episode is the first
    exploration). Its trajectory starts from that allocation (`SearchResult.start`)."""
    greedy_rule: str = "greedy"
    """The rule of the greedy episode: 'greedy' (by importance, `agents.baselines.greedy`) or 'greedy_gain' (by
    estimated gain, `agents.baselines.greedy_gain`); both read the same probe."""
    prior_noise: float = 0.1
    """moves='prior': standard deviation of the Gaussian noise added to each module's importance (in [0, 1])."""
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
    parallel: int = 1
    """Explorations run together on the batched engine, one forward pass per optimizer step for all (an
    explorer whose exploration ends selects its next cell at once; at most one explorer per whole episode that
    `max_optimizer_steps` pays for); 1: one at a time on the env itself. Parallel explorations start from the
    archive as it is when they begin, so they pay off with budgets of many episodes (8 at 20 episodes' worth:
    faster and better on the default instance) and cost quality at a few (the bench's 4)."""
    budget_buckets: int = 4
    """Default cell (DepthProfileCell): buckets of the budget used."""
    depth_bins: int = 4
    """Default cell (DepthProfileCell): depth bins of the rank profile (1: the mean ladder index of all modules)."""

    def __post_init__(self) -> None:
        check_int("max_optimizer_steps", self.max_optimizer_steps, 1)
        if self.explore_steps is not None:
            check_int("explore_steps", self.explore_steps, 1)
        check_number("keep_probability", self.keep_probability, 0, 1)
        check_bool("importance_guided", self.importance_guided)
        check_bool("greedy_episode", self.greedy_episode)
        check_choice("greedy_rule", self.greedy_rule, ("greedy", "greedy_gain"))
        check_choice("moves", self.moves, ("modules", "groups", "prior"))
        check_number("prior_noise", self.prior_noise, 0)
        check_int("groups_per_step", self.groups_per_step, 1)
        check_int("parallel", self.parallel, 1)
        check_number("repeat_probability", self.repeat_probability, 0, 1)
        check_number("improvement_bonus", self.improvement_bonus, 0)
        DepthProfileCell(self.budget_buckets, self.depth_bins)  # validates both
