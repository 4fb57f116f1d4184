import math

import numpy as np
import pytest
import torch

from strato_env.config import EnvConfig
from strato_env.costs import uniform_rank_for_budget
from strato_env.env import GROW, RankAllocationEnv
from strato_env.instance import get_instance
from strato_env.tasks.base import layer_hidden_states
from strato_env.tasks.planted import planted_ranks


def test_oracle_at_most_half_the_uniform_loss_on_the_default_instance():
    env = RankAllocationEnv()  # the embedded default: planted, top-heavy, gpt2-tiny, 8 x 20 steps
    rank = uniform_rank_for_budget(env.modules, env.budget)
    uniform = {m.name: rank for m in env.modules}
    assert env.params_of(uniform) <= env.budget and env.params_of(env.data.oracle_ranks) <= env.budget
    uniform_loss = env.evaluate_allocation(uniform, seed=0)
    env.reset(seed=0)
    assert env.oracle_loss <= 0.5 * uniform_loss < 0.5 * env.evaluate_loss()


@pytest.mark.parametrize("profile", ["top-heavy", "bottom-heavy", "attention-only", "mlp-only", "random-sparse"])
def test_rank_profile_families(profile):
    env = RankAllocationEnv(task={"profile": profile}, decisions=1, inner_steps=1)
    ranks = planted_ranks(env.modules, profile, 16, seed=0)
    chosen = [m for m in env.modules if ranks[m.name]]
    assert chosen and set(ranks.values()) <= {0, 16}
    if profile == "top-heavy":
        assert {m.layer for m in chosen} == {3}
    elif profile == "bottom-heavy":
        assert {m.layer for m in chosen} == {0}
    elif profile == "attention-only":
        assert {m.kind for m in chosen} == {"attention_in", "attention_out"}
    elif profile == "mlp-only":
        assert {m.kind for m in chosen} == {"mlp_in", "mlp_out"}
    else:
        assert len(chosen) < len(env.modules)
        assert planted_ranks(env.modules, profile, 16, seed=1) != ranks


@pytest.mark.parametrize(("profile", "first"), [("top-heavy", 3), ("bottom-heavy", 0)])
def test_planted_encoders_match_every_layer_so_the_perturbed_layer_shows(profile, first):
    """bert-tiny (4 layers): the teacher's targets hold the hidden states after every layer, and the frozen
    base differs from them from the first perturbed layer on, not before."""
    instance = get_instance(EnvConfig(model="bert-tiny", task={"profile": profile}))
    rows = instance.data.eval
    with torch.no_grad():
        base = layer_hidden_states(instance.model, rows)
    assert rows["teacher_hidden"].shape == base.shape and base.shape[1] == 4
    error = (base - rows["teacher_hidden"]).square().mean(dim=(0, 2, 3))
    assert torch.all(error[:first] < 1e-10) and torch.all(error[first:] > 1e-4), error.tolist()


def test_divergence_terminates_cleanly_with_the_penalty():
    env = RankAllocationEnv(learning_rate=1e8, decisions=4, inner_steps=5, divergence_penalty=2.0)
    observation, _ = env.reset(seed=0)
    assert env.observation_space.contains(observation)  # the importance probe diverged too, and is read as no gain
    assert np.all(env.batch.subs[0].probe_gains == 0)
    for _ in range(4):
        observation, reward, terminated, truncated, info = env.step(np.full(env.action_space.shape, GROW))
        assert env.observation_space.contains(observation)
        if terminated:
            break
    assert terminated and not truncated
    assert reward == -2.0 and info["diverged"] and not math.isfinite(info["loss"])
    env.reset(seed=0)  # a new episode starts clean
    assert math.isfinite(env.evaluate_loss())
