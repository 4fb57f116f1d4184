"""Go-Explore: budget and cost accounting, exact returns and replays, count-based selection, determinism, JSON."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from agents.baselines import greedy, greedy_gain, greedy_iterative
from agents.go_explore import (
    Archive,
    CellEntry,
    DepthProfileCell,
    ExactAllocationCell,
    GoExplore,
    GoExploreConfig,
    draw_group_moves,
    group_action,
    random_action,
)
from strato_env.env import GROW, KEEP, SHRINK, RankAllocationEnv
from strato_env.observation import module_table

SEED = 3
BUDGET = 8  # optimizer steps: 4 env steps of inner_steps=2


@pytest.fixture(scope="module")
def env() -> RankAllocationEnv:
    return RankAllocationEnv(decisions=4, inner_steps=2)


def _run(env: RankAllocationEnv, config: GoExploreConfig, policy: Any = None) -> tuple[GoExplore, Any, int]:
    """Run a search, counting the env steps it really takes (one exploration at a time: `parallel=1`)."""
    calls = []
    original = env.step

    def counting_step(action: np.ndarray) -> Any:
        calls.append(1)
        return original(action)

    env.step = counting_step  # type: ignore[method-assign]
    try:
        agent = GoExplore(config, policy=policy)
        progress: list[tuple[int, float]] = []
        result = agent.run(env, seed=SEED, progress=lambda steps, loss: progress.append((steps, loss)))
    finally:
        del env.step
    assert progress == result.history
    return agent, result, len(calls)


@pytest.fixture(scope="module")
def searched(env: RankAllocationEnv) -> tuple[GoExplore, Any, int]:
    return _run(env, GoExploreConfig(max_optimizer_steps=BUDGET, explore_steps=2, parallel=1))


def test_run_stays_within_budget_and_on_the_ladder(env: RankAllocationEnv, searched: Any) -> None:
    agent, result, steps_taken = searched
    assert result.method == "go_explore"
    # The root cell is never finished, so the search runs until the budget is exactly used up.
    assert result.optimizer_steps == steps_taken * env.config.inner_steps == BUDGET
    assert set(result.allocation) == {m.name for m in env.modules}
    assert all(rank in env.ladder for rank in result.allocation.values())
    assert env.params_of(result.allocation) <= env.budget
    spent = [steps for steps, _ in result.history]
    assert spent == sorted(spent) and spent[-1] == BUDGET
    assert result.loss == result.history[-1][1]
    assert len(agent.archive) >= 2 and sum(e.times_chosen for e in agent.archive) == len(result.history)


def test_returning_and_replaying_reproduce_recorded_losses(env: RankAllocationEnv, searched: Any) -> None:
    agent, result, _ = searched
    returnable = [e for e in agent.archive if e.snapshot is not None and e.trajectory]
    assert returnable, "the search should archive at least one explorable cell after the root"
    for entry in returnable:
        env.set_state(entry.snapshot)
        assert env.evaluate_loss() == entry.loss == -entry.score
        assert agent.cell(env) == entry.cell
        assert env.ranks == entry.allocation
    best = agent.archive.best()
    assert best.trajectory == result.trajectory and best.loss == result.loss


def test_every_archived_trajectory_replays_from_reset(env: RankAllocationEnv) -> None:
    """Each archived trajectory, played from reset with no return, ends at its recorded loss and allocation;
    among them are trajectories found by exploring from a restored (set_state) cell other than the root."""
    agent, result, _ = _run(env, GoExploreConfig(max_optimizer_steps=24, explore_steps=1, parallel=1))
    restored = [e for e in agent.archive if len(e.trajectory) > 1]  # explore_steps=1: reached after a return
    assert restored, "no exploration started from a restored cell"
    for entry in agent.archive:
        _, info = env.reset(seed=SEED)
        for action in entry.trajectory:
            _, _, _, _, info = env.step(np.array(action))
        assert (info["loss"], info["allocation"]) == (entry.loss, entry.allocation), entry.cell
        assert info["optimizer_steps"] == entry.optimizer_steps == len(entry.trajectory) * env.config.inner_steps
    assert agent.archive.best().loss == result.loss


def _entry(cell: tuple[int, ...], score: float, steps: int = 0, finished: bool = False, chosen: int = 0) -> CellEntry:
    return CellEntry(cell, score, -score, steps, [], {}, finished, times_chosen=chosen)


def test_selection_prefers_rarely_chosen_cells() -> None:
    archive = Archive(improvement_bonus=0.0)
    archive.add(_entry((0,), -1.0, chosen=0))
    archive.add(_entry((1,), -1.0, chosen=100))
    archive.add(_entry((2,), -0.5, finished=True))  # finished: never explored from
    rng = np.random.default_rng(0)
    draws = [archive.select(rng).cell for _ in range(2000)]
    assert draws.count((2,)) == 0
    # Weights 1 and 1/sqrt(101): the fresh cell should take about 91% of the draws.
    assert draws.count((0,)) > 5 * draws.count((1,)) > 0
    archive[(1,)].times_chosen = 0
    draws = [archive.select(rng).cell for _ in range(2000)]
    assert 800 < draws.count((0,)) < 1200


def test_archive_keeps_best_trajectory_per_cell_and_prefers_finished_results() -> None:
    archive = Archive()
    assert archive.add(_entry((1,), -2.0, steps=4))
    archive[(1,)].times_chosen = 7
    assert not archive.add(_entry((1,), -3.0, steps=2))  # worse score
    assert not archive.add(_entry((1,), -2.0, steps=6))  # same score, more steps
    assert archive.add(_entry((1,), -2.0, steps=2))  # same score, fewer steps
    assert archive[(1,)].optimizer_steps == 2 and archive[(1,)].times_chosen == 7
    assert archive.best().cell == (1,)
    archive.add(_entry((2,), -9.0, finished=True))
    archive.add(_entry((3,), -float("inf"), finished=True))  # diverged
    assert archive.best().cell == (2,)


def test_same_seed_same_result_and_json_round_trip(env: RankAllocationEnv, searched: Any, tmp_path: Any) -> None:
    agent, result, _ = searched
    again = GoExplore(GoExploreConfig(max_optimizer_steps=BUDGET, explore_steps=2, parallel=1)).run(env, seed=SEED)
    assert again == result
    path = tmp_path / "archive.json"
    agent.archive.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["archive.json"]  # no temporary file left behind
    loaded = Archive.load(path)
    assert list(loaded.entries) == list(agent.archive.entries)
    assert list(loaded) == list(agent.archive)  # snapshots are not compared (and not saved)
    assert all(e.snapshot is None for e in loaded)
    assert loaded.metadata["seed"] == SEED and loaded.best().trajectory == result.trajectory
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a Go-Explore archive"):
        Archive.load(path)


class KeepPolicy:
    """A duck-typed policy that always keeps and records the masks it was given."""

    def __init__(self) -> None:
        self.masks: list[np.ndarray] = []

    def predict(self, observation: Any, action_masks: np.ndarray, deterministic: bool = True) -> tuple[Any, None]:
        self.masks.append(action_masks)
        return np.full(len(action_masks) // 3, KEEP), None


def test_policy_drives_exploration(env: RankAllocationEnv) -> None:
    policy = KeepPolicy()
    _, result, steps_taken = _run(env, GoExploreConfig(max_optimizer_steps=3, explore_steps=None, parallel=1), policy)
    assert len(policy.masks) == steps_taken == 1
    assert all(set(action) == {KEEP} for action in result.trajectory)
    assert set(result.allocation.values()) == {env.config.initial_rank}


def test_a_swapped_cell_function_keys_the_archive(env: RankAllocationEnv) -> None:
    agent = GoExplore(
        GoExploreConfig(max_optimizer_steps=BUDGET, explore_steps=2, parallel=1), cell=ExactAllocationCell()
    )
    agent.run(env, seed=SEED)
    for entry in agent.archive:
        ranks = tuple(env.ladder.index(entry.allocation[m.name]) for m in env.modules)
        assert entry.cell == (len(entry.trajectory), *ranks)  # decisions made, then every module's ladder index
    assert len(agent.archive) > 1


def test_random_action_respects_masks() -> None:
    masks = np.array([[True, True, True], [False, True, True], [True, True, False], [False, True, False]])
    rng = np.random.default_rng(0)
    actions = np.array([random_action(masks.reshape(-1), rng, keep_probability=0.3) for _ in range(200)])
    assert all(masks[slot, move] for row in actions for slot, move in enumerate(row))
    assert set(actions[:, 0]) == {0, 1, 2} and set(actions[:, 3]) == {KEEP}


def test_importance_guided_action_grows_important_and_shrinks_unimportant_slots() -> None:
    masks = np.ones((3, 3), dtype=bool)
    masks[2, SHRINK] = False  # slot 2 cannot shrink: a slot that moves grows, whatever its importance
    rng = np.random.default_rng(0)
    importance = np.array([1.0, 0.0, 0.0])
    actions = np.array([random_action(masks.reshape(-1), rng, 0.5, importance) for _ in range(300)])
    assert set(actions[:, 0]) == {KEEP, GROW} and set(actions[:, 1]) == {KEEP, SHRINK}
    assert set(actions[:, 2]) == {KEEP, GROW}
    assert 100 < np.sum(actions[:, 0] == KEEP) < 200  # keep_probability 0.5


def _module_table(env: RankAllocationEnv, importance: float | None = None) -> np.ndarray:
    observation, _ = env.reset(seed=SEED)
    table = module_table(observation["modules"]).copy()
    if importance is not None:
        table[: len(env.modules), 0] = importance
    return table


def test_group_moves_are_layers_kinds_or_single_modules(env: RankAllocationEnv) -> None:
    slots = range(len(env.modules))
    layers = {frozenset(i for i in slots if env.modules[i].depth == d) for d in {m.depth for m in env.modules}}
    kinds = {frozenset(i for i in slots if env.modules[i].kind == k) for k in {m.kind for m in env.modules}}
    singles = {frozenset([i]) for i in slots}
    assert len(layers) == len(kinds) == 4  # gpt2-tiny: 4 layers of 4 module kinds
    rng = np.random.default_rng(0)
    table = _module_table(env)
    drawn = [frozenset(members.tolist()) for _ in range(300) for members, _ in draw_group_moves(table, rng)]
    assert set(drawn) <= layers | kinds | singles  # never a padding slot, never a mixed group
    assert set(drawn) & layers and set(drawn) & kinds and set(drawn) & singles
    assert len(draw_group_moves(_module_table(env), rng, groups=3)) == 3


def test_guided_group_moves_grow_important_groups_and_shrink_the_others(env: RankAllocationEnv) -> None:
    rng = np.random.default_rng(0)
    assert {way for _ in range(50) for _, way in draw_group_moves(_module_table(env, 1.0), rng)} == {GROW}
    assert {way for _ in range(50) for _, way in draw_group_moves(_module_table(env, 0.0), rng)} == {SHRINK}
    unguided = [way for _ in range(50) for _, way in draw_group_moves(_module_table(env, 1.0), rng, 1, False)]
    assert set(unguided) == {GROW, SHRINK}


def test_group_action_moves_only_where_masks_allow() -> None:
    masks = np.ones((4, 3), dtype=bool)
    masks[1, GROW] = False
    action = group_action(masks.reshape(-1), [(np.array([0, 1, 2]), GROW), (np.array([3]), SHRINK)])
    assert action.tolist() == [GROW, KEEP, GROW, SHRINK]
    assert group_action(masks.reshape(-1), []).tolist() == [KEEP] * 4


def test_per_module_exploration_is_seeded_and_within_budget(env: RankAllocationEnv) -> None:
    config = GoExploreConfig(max_optimizer_steps=BUDGET, explore_steps=2, moves="modules", parallel=1)
    first, second = (GoExplore(config).run(env, seed=SEED) for _ in range(2))
    assert first == second and first.optimizer_steps == BUDGET
    assert env.params_of(first.allocation) <= env.budget


def test_group_exploration_repeats_its_moves_to_the_episode_end(env: RankAllocationEnv) -> None:
    # One exploration from the root fills the whole budget: 4 decisions, repeating one group move throughout.
    config = GoExploreConfig(
        max_optimizer_steps=BUDGET, explore_steps=None, moves="groups", repeat_probability=1.0, parallel=1
    )
    grew = 0
    for seed in range(4):
        result = GoExplore(config).run(env, seed=seed)
        moved = {(slot, move) for action in result.trajectory for slot, move in enumerate(action) if move != KEEP}
        assert len(result.trajectory) == env.config.decisions
        assert len({move for _, move in moved}) <= 1  # one way for every moved slot, at every step
        if moved:
            grown = {slot for slot, _ in moved}
            same_layer = len({env.modules[slot].depth for slot in grown}) == 1
            same_kind = len({env.modules[slot].kind for slot in grown}) == 1
            assert same_layer or same_kind  # one group: a layer, a kind or a single module
            assert all(result.allocation[env.modules[slot].name] > 0 for slot in grown)
            assert all(result.allocation[m.name] == 0 for i, m in enumerate(env.modules) if i not in grown)
            grew += 1
    assert grew > 0


def test_prior_exploration_starts_with_iterative_greedys_episode_and_explores_around_it() -> None:
    """The first exploration (from the root, to the episode's end) is the rule itself; later ones follow it on
    noisy importances, so they reach other allocations, every one within budget and on the ladder. Eight
    decisions, as in the bench: with 4 (or 6) this instance's budget fills every module alike, whatever the
    importances."""
    env = RankAllocationEnv(decisions=8, inner_steps=1)
    rule = greedy_iterative(env, seed=SEED)
    episode = env.config.decisions * env.config.inner_steps
    first = GoExplore(GoExploreConfig(max_optimizer_steps=episode, moves="prior", parallel=1)).run(env, seed=SEED)
    assert first.allocation == rule.allocation and first.optimizer_steps == episode
    agent = GoExplore(GoExploreConfig(max_optimizer_steps=6 * episode, moves="prior", prior_noise=0.3, parallel=1))
    result = agent.run(env, seed=SEED)
    finished = [entry for entry in agent.archive if entry.finished]
    assert len({tuple(sorted(entry.allocation.items())) for entry in finished}) > 1
    for entry in finished:
        assert env.params_of(entry.allocation) <= env.budget
        assert all(rank in env.ladder for rank in entry.allocation.values())
    assert result.loss <= min(entry.loss for entry in finished)
    assert GoExplore(agent.config).run(env, seed=SEED) == result


def test_prior_exploration_never_returns_to_a_state_where_no_grow_fits() -> None:
    """moves='prior' only grows, so exploring from a state whose budget has no room for any grow would replay
    its episode: such cells stay in the archive but are never selected."""
    sources: list[dict[str, int]] = []

    class Recording(GoExplore):
        def _action(self, run: Any, rng: np.random.Generator) -> np.ndarray:
            if run.taken == 0:
                sources.append(run.source.allocation)
            return super()._action(run, rng)

    env = RankAllocationEnv(decisions=8, inner_steps=1)
    episode = env.config.decisions * env.config.inner_steps
    agent = Recording(GoExploreConfig(max_optimizer_steps=8 * episode, moves="prior", prior_noise=0.3, parallel=1))
    agent.run(env, seed=SEED)

    def room_to_grow(allocation: dict[str, int]) -> bool:
        return any(
            rank < env.ladder[-1]
            and env.params_of(allocation | {name: env.ladder[env.ladder.index(rank) + 1]}) <= env.budget
            for name, rank in allocation.items()
        )

    assert any(not room_to_grow(entry.allocation) for entry in agent.archive if not entry.finished)
    assert len(sources) > 1 and all(room_to_grow(allocation) for allocation in sources)


@pytest.mark.parametrize(
    ("parallel", "explore_steps", "rule"),
    [(1, None, greedy), (2, None, greedy), (1, 2, greedy), (1, None, greedy_gain)],
)
def test_greedy_episode_is_a_candidate_that_replays_from_its_start(parallel, explore_steps, rule) -> None:
    """With `greedy_episode`, the second exploration keeps the allocation of `greedy_rule` for a whole episode
    from reset (whatever `explore_steps`): its result enters the archive (finished, starting from that
    allocation), replays on the lone env, and the search returns the better of it and iterative greedy's own
    episode."""
    env = RankAllocationEnv(decisions=8, inner_steps=1)
    episode = env.config.decisions * env.config.inner_steps
    config = GoExploreConfig(
        max_optimizer_steps=2 * episode, explore_steps=explore_steps, moves="prior", greedy_episode=True,
        greedy_rule=rule.__name__, parallel=parallel,
    )  # fmt: skip
    agent = GoExplore(config)
    result = agent.run(env, seed=SEED)
    allocation = rule(env, seed=SEED).allocation
    assert allocation != greedy_iterative(env, seed=SEED).allocation  # two different candidates on this instance
    assert rule is greedy or allocation != greedy(env, seed=SEED).allocation  # greedy_rule is honoured
    [entry] = [e for e in agent.archive if e.start]
    assert entry.finished and entry.start == entry.allocation == allocation
    assert entry.trajectory == [[KEEP] * env.config.max_modules] * env.config.decisions
    _, info = env.reset(seed=SEED, options={"allocation": entry.start})
    for action in entry.trajectory:
        _, _, _, _, info = env.step(np.array(action))
    assert info["loss"] == pytest.approx(entry.loss, rel=1e-5) and info["allocation"] == allocation
    finished = [e.loss for e in agent.archive if e.finished]
    assert result.loss == min(finished) and result.optimizer_steps == 2 * episode
    assert len(finished) == 2 or explore_steps is not None  # the rule's episode and greedy's
    assert result.start == (allocation if result.loss == entry.loss else {})


def test_a_version_1_archive_loads_with_no_start(tmp_path: Any) -> None:
    path = tmp_path / "archive.json"
    entry = _entry((0,), -1.0).to_dict()
    del entry["start"]
    path.write_text(json.dumps({"format": "strato-go-explore-archive", "version": 1, "improvement_bonus": 0.1,
                                "metadata": {}, "cells": [entry]}))  # fmt: skip
    assert Archive.load(path)[(0,)].start == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_optimizer_steps", 0),
        ("greedy_episode", 1),
        ("greedy_rule", "gain"),
        ("prior_noise", -0.1),
        ("explore_steps", 0),
        ("keep_probability", 1.5),
        ("importance_guided", "yes"),
        ("improvement_bonus", -1.0),
        ("moves", "layers"),
        ("groups_per_step", 0),
        ("repeat_probability", 1.5),
        ("budget_buckets", 0),
        ("depth_bins", 0),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{field}={value!r} is invalid"):
        GoExploreConfig(**{field: value})
    with pytest.raises(ValueError, match="depth_bins=0 is invalid"):
        DepthProfileCell(depth_bins=0)


def test_a_budget_that_fits_no_env_step_is_refused(env: RankAllocationEnv) -> None:
    with pytest.raises(ValueError, match=r"max_optimizer_steps=1 is invalid: one env step costs inner_steps=2"):
        GoExplore(GoExploreConfig(max_optimizer_steps=1)).run(env, seed=0)


def test_parallel_explorations_are_seeded_within_budget_and_replay_on_the_single_env(env: RankAllocationEnv) -> None:
    """Four explorations at a time on the batched engine: the budget is used exactly, a seed gives one result,
    and every archived trajectory replays on the lone env to its recorded allocation and (up to float
    summation order) loss."""
    config = GoExploreConfig(max_optimizer_steps=40, explore_steps=2, parallel=4)
    runs = [GoExplore(config).run(env, seed=SEED) for _ in range(2)]
    assert runs[0].optimizer_steps == 40 and runs[0].history == runs[1].history
    assert runs[0].allocation == runs[1].allocation
    agent = GoExplore(config)
    result = agent.run(env, seed=SEED)
    assert len(result.history) == sum(e.times_chosen for e in agent.archive) > 4
    assert [steps for steps, _ in result.history] == sorted(steps for steps, _ in result.history)
    for entry in agent.archive:
        _, info = env.reset(seed=SEED)
        for action in entry.trajectory:
            _, _, _, _, info = env.step(np.array(action))
        assert info["allocation"] == entry.allocation
        assert info["loss"] == pytest.approx(entry.loss, rel=1e-5)
    assert env.params_of(result.allocation) <= env.budget


def test_parallel_explorations_are_charged_to_the_env() -> None:
    """The env counts the optimizer steps of its sub-episodes, so the bench charges a parallel search fully."""
    env = RankAllocationEnv(decisions=2, inner_steps=2, probe_steps=0)
    before = env.total_optimizer_steps
    result = GoExplore(GoExploreConfig(max_optimizer_steps=16, parallel=4)).run(env, seed=0)
    assert result.optimizer_steps == 16 == env.total_optimizer_steps - before
