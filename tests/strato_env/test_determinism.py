import numpy as np

from strato_env.env import RankAllocationEnv
from tests.conftest import SMALL


def _rollout(env: RankAllocationEnv, seed: int, actions: list[np.ndarray]):
    observation, info = env.reset(seed=seed)
    trace = [(observation, 0.0, info)]
    for action in actions:
        observation, reward, _, _, info = env.step(action)
        trace.append((observation, reward, info))
    return trace


def _assert_same(trace_a, trace_b):
    assert len(trace_a) == len(trace_b)
    for (obs_a, reward_a, info_a), (obs_b, reward_b, info_b) in zip(trace_a, trace_b, strict=True):
        for key in obs_a:
            np.testing.assert_array_equal(obs_a[key], obs_b[key])
        assert reward_a == reward_b
        assert info_a == info_b


def _actions(env, seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 3, env.action_space.shape) for _ in range(n)]


def test_same_seed_same_actions_give_identical_episodes():
    env_a, env_b = RankAllocationEnv(**SMALL), RankAllocationEnv(**SMALL)
    actions = _actions(env_a, 0, SMALL["decisions"])
    _assert_same(_rollout(env_a, 7, actions), _rollout(env_b, 7, actions))
    # a different seed changes the data order and initialisation, hence the losses
    other = _rollout(env_b, 8, actions)
    assert [info["loss"] for *_, info in other] != [info["loss"] for *_, info in _rollout(env_a, 7, actions)]


def test_set_state_after_get_state_replays_identically():
    env = RankAllocationEnv(**{**SMALL, "decisions": 4})
    actions = _actions(env, 1, 4)
    env.reset(seed=3)
    env.step(actions[0])
    state = env.get_state()
    first = [env.step(a) for a in actions[1:]]
    env.reset(seed=99)  # wander off: another episode entirely
    env.step(actions[3])
    env.set_state(state)
    second = [env.step(a) for a in actions[1:]]
    for (obs_a, r_a, term_a, trunc_a, info_a), (obs_b, r_b, term_b, trunc_b, info_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(obs_a["modules"], obs_b["modules"])
        np.testing.assert_array_equal(obs_a["global"], obs_b["global"])
        assert (r_a, term_a, trunc_a, info_a) == (r_b, term_b, trunc_b, info_b)


def test_evaluate_allocation_leaves_the_episode_untouched():
    env = RankAllocationEnv(**SMALL)
    actions = _actions(env, 2, SMALL["decisions"])
    reference = _rollout(env, 5, actions)
    env.reset(seed=5)
    env.step(actions[0])
    env.evaluate_allocation({m.name: 2 for m in env.modules}, seed=1)
    resumed = [env.step(a) for a in actions[1:]]
    assert [r for _, r, *_ in resumed] == [r for _, r, _ in reference[2:]]
