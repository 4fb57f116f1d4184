import numpy as np
import pytest

from strato_env.env import GROW, KEEP, SHRINK, RankAllocationEnv


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
def test_masked_random_rollouts_stay_on_the_ladder_and_within_budget(model):
    env = RankAllocationEnv(
        model=model, decisions=6, inner_steps=1, rank_ladder=(0, 1, 2, 4, 8), task={"planted_rank": 8}
    )
    ladder = set(env.ladder)
    rng = np.random.default_rng(0)
    n = len(env.modules)
    grows_seen = 0
    for episode in range(8):
        env.reset(seed=episode)
        for _ in range(env.config.decisions):
            mask = env.action_masks().reshape(-1, 3)
            assert mask[:, KEEP].all()
            assert not mask[n:, [SHRINK, GROW]].any(), "padding slots may only keep"
            assert_masks_match_the_budget(env, mask)
            action = np.array([rng.choice(np.flatnonzero(row)) for row in mask])
            grows_seen += int((action[:n] == GROW).sum())
            *_, info = env.step(action)
            assert set(info["allocation"].values()) <= ladder
            assert info["params"] <= info["budget"]
    assert grows_seen > 50  # the budget was really tested against many joint grows


def assert_masks_match_the_budget(env: RankAllocationEnv, mask: np.ndarray) -> None:
    """Shrink is allowed exactly above rank 0; grow exactly when the next ladder rank exists and fits the budget,
    computed here from the costs alone."""
    ranks = env.ranks
    for slot, m in enumerate(env.modules):
        index = env.ladder.index(ranks[m.name])
        assert mask[slot, SHRINK] == (index > 0), m.name
        fits = index + 1 < len(env.ladder) and env.params_of({**ranks, m.name: env.ladder[index + 1]}) <= env.budget
        assert mask[slot, GROW] == fits, m.name


@pytest.mark.parametrize("model", ["gpt2-tiny", "bert-tiny"])
def test_growing_wherever_the_mask_allows_fills_the_budget(model):
    env = RankAllocationEnv(model=model, decisions=12, inner_steps=1, probe_steps=0, budget=9000)
    env.reset(seed=0)
    for _ in range(env.config.decisions):
        mask = env.action_masks().reshape(-1, 3)
        assert_masks_match_the_budget(env, mask)
        if not mask[:, GROW].any():
            break
        env.step(np.where(mask[:, GROW], GROW, KEEP))  # joint grows may not all fit: the env drops the excess
    else:
        pytest.fail("the budget was never filled")
    params, ranks = env.params_of(env.ranks), env.ranks
    assert params <= env.budget
    for m in env.modules:  # no module could take one more ladder step
        index = env.ladder.index(ranks[m.name])
        if index + 1 < len(env.ladder):
            assert env.params_of({**ranks, m.name: env.ladder[index + 1]}) > env.budget


def test_unmasked_actions_are_clipped_to_the_ladder_and_budget():
    env = RankAllocationEnv(decisions=8, inner_steps=1, budget=6000)
    env.reset(seed=0)
    grow_all = np.full(env.action_space.shape, GROW)
    for _ in range(8):
        *_, info = env.step(grow_all)
        assert info["params"] <= 6000
        assert set(info["allocation"].values()) <= set(env.ladder)
    env.reset(seed=0)
    *_, info = env.step(np.full(env.action_space.shape, SHRINK))  # shrinking rank 0 keeps rank 0
    assert info["params"] == 0
