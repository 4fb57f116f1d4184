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
            ranks = env.ranks
            for slot, m in enumerate(env.modules):
                index = env.ladder.index(ranks[m.name])
                assert mask[slot, SHRINK] == (index > 0)
                if index == len(env.ladder) - 1:
                    assert not mask[slot, GROW]
            action = np.array([rng.choice(np.flatnonzero(row)) for row in mask])
            grows_seen += int((action[:n] == GROW).sum())
            *_, info = env.step(action)
            assert set(info["allocation"].values()) <= ladder
            assert info["params"] <= info["budget"]
    assert grows_seen > 50  # the budget was really tested against many joint grows


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
