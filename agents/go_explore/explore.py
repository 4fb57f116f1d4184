"""Go-Explore over rank schedules: select a cell, return to it by set_state, explore, keep the best per cell."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from agents.baselines import greedy, greedy_gain, iterative_greedy_action
from agents.go_explore.archive import Archive, CellEntry
from agents.go_explore.cells import CellFunction, DepthProfileCell
from agents.go_explore.config import GoExploreConfig
from agents.result import SearchResult
from strato_env.env import GROW, KEEP, SHRINK, check_action
from strato_env.episodes import EpisodeBatch
from strato_env.observation import BUDGET_USED, DEPTH, GROW_COST, IMPORTANCE, KINDS, PRESENT, module_table


class Policy(Protocol):
    """Anything that acts like an SB3 (Maskable)PPO model."""

    def predict(self, observation: Any, *, action_masks: np.ndarray, deterministic: bool) -> tuple[Any, Any]: ...


def random_action(
    masks: np.ndarray, rng: np.random.Generator, keep_probability: float, importance: np.ndarray | None = None
) -> np.ndarray:
    """Per module slot: keep with `keep_probability`, else an allowed shrink or grow (keep if neither).

    Without `importance` shrink and grow are equally likely; with it (one value in [0, 1] per slot, the
    observation's importance feature) a slot grows with probability `importance` and shrinks otherwise, so
    exploration moves rank toward the modules the env rates as still able to gain.
    """
    allowed = masks.reshape(-1, 3)
    action = np.full(len(allowed), KEEP, dtype=np.int64)
    for slot, row in enumerate(allowed):
        if rng.random() < keep_probability or not (row[SHRINK] or row[GROW]):
            continue
        grow = 0.5 if importance is None else float(importance[slot])
        wanted = GROW if rng.random() < grow else SHRINK
        action[slot] = wanted if row[wanted] else (GROW if wanted == SHRINK else SHRINK)
    return action


Move = tuple[np.ndarray, int]
"""A group move: the module slots of one group and the way they all move (SHRINK or GROW)."""


def draw_group_moves(
    modules: np.ndarray, rng: np.random.Generator, groups: int = 1, importance_guided: bool = True
) -> list[Move]:
    """Draw `groups` random group moves: a layer, a module kind or one module, each moved one way.

    `modules` is the observation's module table (`module_table`); groups are read from its relative
    depth and kind columns, so they exist on any model. Guided, a group is drawn from its family with
    probability proportional to its mean importance, and grows with probability equal to that mean (shrinks
    otherwise); unguided, groups and ways are drawn uniformly.
    """
    present = np.flatnonzero(modules[:, PRESENT] > 0)
    depth, kind = modules[present, DEPTH], modules[present, KINDS].argmax(axis=1)
    families = [[present[depth == d] for d in np.unique(depth)], [present[kind == k] for k in np.unique(kind)]]
    families.append([np.array([slot]) for slot in present])
    moves = []
    for _ in range(groups):
        family = families[int(rng.integers(len(families)))]
        importance = np.array([modules[members, IMPORTANCE].mean() for members in family])
        weights = importance + 1e-3 if importance_guided else np.ones(len(family))
        chosen = int(rng.choice(len(family), p=weights / weights.sum()))
        grow = float(importance[chosen]) if importance_guided else 0.5
        moves.append((family[chosen], GROW if rng.random() < grow else SHRINK))
    return moves


def group_action(masks: np.ndarray, moves: list[Move]) -> np.ndarray:
    """The action that applies `moves` wherever the masks allow them; every other slot keeps."""
    allowed = masks.reshape(-1, 3)
    action = np.full(len(allowed), KEEP, dtype=np.int64)
    for members, way in moves:
        action[members[allowed[members, way]]] = way
    return action


class GoExplore:
    """Go-Explore (Ecoffet et al., 2021) on RankAllocationEnv.

    The search starts from `env.reset(seed=seed)`; every archived trajectory replays exactly from that reset.
    It drives `env.unwrapped` directly, since wrappers (e.g. TimeLimit) would not follow `set_state`.
    `cell` maps states to cells (default: a `DepthProfileCell` with the config's settings); `policy`, if
    given, explores through `policy.predict(obs, action_masks=..., deterministic=False)` instead of random
    valid actions.
    After `run`, `self.archive` holds the archive.
    """

    def __init__(
        self,
        config: GoExploreConfig | None = None,
        cell: CellFunction | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config if config is not None else GoExploreConfig()
        self.cell = cell if cell is not None else DepthProfileCell(self.config.budget_buckets, self.config.depth_bins)
        self.policy = policy
        self.archive: Archive | None = None

    def run(
        self,
        env: gym.Env,
        seed: int,
        progress: Callable[[int, float], None] | None = None,
    ) -> SearchResult:
        """Search until the next env step would exceed `max_optimizer_steps`, or no cell is left to explore.

        With `parallel` > 1, that many explorations (at most one per whole episode the budget pays for) run
        together as the env's `sub_episodes`, one forward pass per optimizer step for all of them; an explorer
        whose exploration ends selects its next cell at once, and results enter the archive in explorer order,
        so a seed gives one result."""
        base: Any = env.unwrapped
        rng = np.random.default_rng(seed)
        cost = base.config.inner_steps
        if self.config.max_optimizer_steps < cost:
            raise ValueError(
                f"max_optimizer_steps={self.config.max_optimizer_steps} is invalid: one env step costs inner_steps="
                f"{cost} optimizer steps; allowed: max_optimizer_steps >= {cost}"
            )
        metadata = {"seed": seed, "config": asdict(self.config), "cell": repr(self.cell)}
        self.archive = archive = Archive(self.config.improvement_bonus, metadata)
        observation, info = base.reset(seed=seed)
        archive.add(self._entry(base, observation, info, [], finished=False))
        greedy_start = self._greedy_start(base, seed) if self.config.greedy_episode else None
        # no more explorers than whole episodes the budget pays for, so that explorations can reach the end
        width = min(self.config.parallel, self.config.max_optimizer_steps // (cost * base.config.decisions))
        if width <= 1:
            explorers: list[Any] = [base]
        else:
            batch = base.sub_episodes(width)
            explorers = [SubEpisodeView(batch, i) for i in range(batch.size)]
        spent = 0
        history: list[tuple[int, float]] = []
        limit = self.config.explore_steps if self.config.explore_steps is not None else math.inf
        runs: dict[int, _Exploration] = {}  # explorer index -> its exploration in progress
        exhausted = False  # no cell left to select
        explorations = 0
        while True:
            room = (self.config.max_optimizer_steps - spent) // cost
            for i, explorer in enumerate(explorers):  # an idle explorer starts from a selected cell
                if i in runs or exhausted or len(runs) >= room:
                    continue
                if greedy_start is not None and explorations == 1:  # greedy's allocation, kept for one episode
                    explorer.set_state(greedy_start.snapshot)
                    runs[i] = _Exploration(explorer, greedy_start, greedy_start.observation, [], fixed=True)
                    explorations += 1
                    continue
                source = archive.select(rng, self._explorable)
                if source is None:
                    exhausted = True
                    continue
                source.times_chosen += 1
                explorer.set_state(source.snapshot)
                runs[i] = _Exploration(explorer, source, source.observation, list(source.trajectory))
                if self.config.moves == "prior":  # the first exploration follows the rule itself
                    noise = rng.normal(0.0, self.config.prior_noise, base.config.max_modules)
                    runs[i].noise = noise if explorations else np.zeros_like(noise)
                explorations += 1
            active = [runs[i] for i in sorted(runs)][:room]
            if not active:
                break
            actions = [self._action(r, rng) for r in active]
            steps = _step_together([r.explorer for r in active], actions)
            for run, action, (observation, info, finished) in zip(active, actions, steps, strict=True):
                run.observation, run.taken, run.done = observation, run.taken + 1, finished
                run.trajectory.append([int(a) for a in action])
                cell, score = self.cell(run.explorer), _score(info["loss"])
                if (finished or not run.fixed) and archive.accepts(cell, score, info["optimizer_steps"]):
                    start = run.source.start
                    run.found |= archive.add(
                        self._entry(run.explorer, observation, info, run.trajectory, finished, cell, start)
                    )
            spent += cost * len(active)
            out_of_budget = spent + cost > self.config.max_optimizer_steps
            for i in sorted(runs):
                run = runs[i]
                if run.done or run.taken >= limit and not run.fixed or out_of_budget:
                    if run.found and not run.fixed:  # look the cell up again: a cell function may replace `source`
                        archive[run.source.cell].times_improved += 1
                    history.append((spent, archive.best().loss))
                    if progress is not None:
                        progress(*history[-1])
                    del runs[i]
        best = archive.best()
        return SearchResult(
            method="go_explore",
            allocation=dict(best.allocation),
            optimizer_steps=spent,
            loss=best.loss,
            history=history,
            trajectory=[list(a) for a in best.trajectory],
            start=dict(best.start),
        )

    def _explorable(self, entry: CellEntry) -> bool:
        """Whether exploring from `entry` can lead anywhere new. With moves='prior' (and no policy) an exploration
        only grows modules, so from a state where no grow fits the budget it would replay the same episode."""
        if self.config.moves != "prior" or self.policy is not None or entry.observation is None:
            return True
        modules, global_ = module_table(entry.observation["modules"]), entry.observation["global"]
        costs = modules[:, GROW_COST]
        return bool(np.any((costs > 0) & (global_[BUDGET_USED] + costs <= 1 + 1e-6)))

    def _greedy_start(self, base: Any, seed: int) -> CellEntry:
        """The state `reset(seed)` gives with the allocation of `greedy_rule`, outside the archive."""
        rule = greedy_gain if self.config.greedy_rule == "greedy_gain" else greedy
        allocation = rule(base, seed=seed).allocation
        observation, info = base.reset(seed=seed, options={"allocation": allocation})
        return self._entry(base, observation, info, [], finished=False, start=allocation)

    def _action(self, run: _Exploration, rng: np.random.Generator) -> np.ndarray:
        """The policy's action, or a random one; group moves are kept in `run.moves` to be repeated."""
        masks = run.explorer.action_masks()
        if run.fixed:
            return np.full(masks.size // 3, KEEP, dtype=np.int64)
        if self.policy is not None:
            action, _ = self.policy.predict(run.observation, action_masks=masks, deterministic=False)
            return np.asarray(action, dtype=np.int64).reshape(-1)
        modules = module_table(run.observation["modules"])
        if self.config.moves == "prior":
            noisy = modules.copy()
            noisy[:, IMPORTANCE] += run.noise
            return iterative_greedy_action(noisy, run.observation["global"])
        if self.config.moves == "modules":
            importance = modules[:, IMPORTANCE] if self.config.importance_guided else None
            return random_action(masks, rng, self.config.keep_probability, importance)
        if not run.moves or rng.random() >= self.config.repeat_probability:
            run.moves[:] = draw_group_moves(modules, rng, self.config.groups_per_step, self.config.importance_guided)
        return group_action(masks, run.moves)

    def _entry(
        self,
        base: Any,
        observation: dict[str, np.ndarray],
        info: dict[str, Any],
        trajectory: list[list[int]],
        finished: bool,
        cell: tuple[int, ...] | None = None,
        start: dict[str, int] | None = None,
    ) -> CellEntry:
        return CellEntry(
            cell=cell if cell is not None else self.cell(base),
            score=_score(info["loss"]),
            loss=float(info["loss"]),
            optimizer_steps=int(info["optimizer_steps"]),
            trajectory=list(trajectory),
            allocation=dict(info["allocation"]),
            finished=finished,
            snapshot=None if finished else base.get_state(),
            observation=None if finished else {k: v.copy() for k, v in observation.items()},
            start=dict(start or {}),
        )


@dataclass
class _Exploration:
    """One exploration in progress: from `source`, by `explorer` (the env, or one sub-episode)."""

    explorer: Any
    source: CellEntry
    observation: dict[str, np.ndarray]
    trajectory: list[list[int]]
    moves: list[Move] = field(default_factory=list)
    """This exploration's group moves (moves='groups')."""
    noise: np.ndarray | None = None
    """This exploration's noise on the importance (moves='prior')."""
    fixed: bool = False
    """Keeps every rank to the episode's end (the greedy episode, `greedy_episode`, whatever `explore_steps`); only its
    final state enters the archive."""
    taken: int = 0
    done: bool = False
    found: bool = False


class SubEpisodeView:
    """One sub-episode of an `EpisodeBatch`, with what Go-Explore and its cell functions read of an env."""

    def __init__(self, batch: EpisodeBatch, index: int) -> None:
        self.batch, self.index = batch, index
        self.modules, self.ladder = batch.modules, batch.ladder
        self.budget = batch.subs[index].budget

    @property
    def unwrapped(self) -> SubEpisodeView:
        return self

    @property
    def ranks(self) -> dict[str, int]:
        return self.batch.ranks(self.index)

    @property
    def decisions_made(self) -> int:
        return self.batch.subs[self.index].episode.decision

    def params_of(self, allocation: dict[str, int]) -> int:
        return self.batch.params_of(allocation)

    def action_masks(self) -> np.ndarray:
        return self.batch.action_masks(self.index)

    def get_state(self) -> dict[str, Any]:
        return self.batch.get_state(self.index)

    def set_state(self, state: dict[str, Any]) -> None:
        self.batch.set_state(self.index, state)


def _step_together(explorers: list[Any], actions: list[np.ndarray]) -> list[tuple[dict, dict, bool]]:
    """(observation, info, finished) of one step of each explorer: the env itself, or sub-episodes of one batch
    stepped together."""
    if not isinstance(explorers[0], SubEpisodeView):
        observation, _, terminated, truncated, info = explorers[0].step(actions[0])
        return [(observation, info, bool(terminated or truncated))]
    batch = explorers[0].batch
    moves = {e.index: check_action(a, (batch.config.max_modules,)) for e, a in zip(explorers, actions, strict=True)}
    results = batch.step(moves)
    return [
        (batch.observation(e.index), results[e.index][3], results[e.index][1] or results[e.index][2]) for e in explorers
    ]


def _score(loss: float) -> float:
    """-(loss); -inf when training diverged, so NaN never enters a comparison."""
    return -float(loss) if math.isfinite(loss) else -math.inf
