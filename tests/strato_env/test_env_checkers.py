import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import strato_env  # noqa: F401  (registers the env id)
from tests.conftest import SMALL

ENV_ID = "strato_env/RankAllocation-v3"


def _check(env: gym.Env) -> None:
    """Both checkers pass and neither warns (deprecation notices between libraries aside)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=True)
    complaints = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning | FutureWarning)]
    assert complaints == []


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_checkers_pass_on_planted(model):
    _check(gym.make(ENV_ID, model=model, **SMALL))


@pytest.mark.parametrize("data", ["corpus", "shakespeare"])  # the tests' own text; the shared corpus as an extra
def test_checkers_pass_on_causal_lm(data, request):
    env = gym.make(ENV_ID, task={"name": "causal_lm", "data": request.getfixturevalue(data)}, **SMALL)
    _check(env)
    _, info = env.reset(seed=0)
    assert "oracle_loss" not in info
    assert 2.0 < info["loss"] < 7.0  # bytes over a 512-token vocabulary: near log(512) = 6.2 at start


def test_default_make_is_the_planted_gpt2_tiny_instance():
    env = gym.make(ENV_ID)
    assert env.unwrapped.config.model == "gpt2-tiny"
    assert env.unwrapped.config.task.name == "planted"
    _, info = env.reset(seed=0)
    assert info["oracle_loss"] < info["initial_loss"]
    assert info["params"] == 0 and info["budget"] == sum(
        r * (m.in_features + m.out_features) for m in env.unwrapped.modules for r in [info["oracle_allocation"][m.name]]
    )


def test_episode_truncates_after_decisions():
    env = gym.make(ENV_ID, **SMALL)
    env.reset(seed=1)
    ends = [env.step(env.action_space.sample())[2:4] for _ in range(SMALL["decisions"])]
    assert ends == [(False, False)] * (SMALL["decisions"] - 1) + [(False, True)]
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(env.action_space.sample())
