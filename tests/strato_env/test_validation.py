import gymnasium as gym
import pytest

import strato_env  # noqa: F401
from strato_env.config import EnvConfig
from strato_env.env import RankAllocationEnv
from strato_env.models import load_config


def test_unknown_model_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model='no-such-org/no-such-model'.*local directory"):
        RankAllocationEnv(model="no-such-org/no-such-model")


def test_missing_local_model_directory():
    with pytest.raises(ValueError, match=r"model='./missing-model'.*no such local directory"):
        load_config("./missing-model")


def test_no_matching_target_modules():
    with pytest.raises(ValueError, match=r"no target modules matched target_modules=\['nonexistent_proj'\]"):
        RankAllocationEnv(target_modules=["nonexistent_proj"])


def test_budget_below_cheapest_nonempty_allocation():
    # cheapest: rank 1 on GPT-2 tiny's attn.c_proj (64 in + 64 out = 128 parameters)
    with pytest.raises(ValueError, match=r"budget=100 is smaller than the cheapest non-empty allocation \(128"):
        RankAllocationEnv(budget=100)


@pytest.mark.parametrize("ladder", [(0, 2, 1), (0, 1, 1, 4), (1, 2, 4), (0,)])
def test_rank_ladder_must_increase_from_zero(ladder):
    with pytest.raises(ValueError, match=r"rank_ladder=.*strictly increasing"):
        EnvConfig(rank_ladder=ladder)


def test_missing_data_file():
    with pytest.raises(ValueError, match=r"task.data='/nowhere/corpus.txt': no such local file"):
        RankAllocationEnv(task={"name": "causal_lm", "data": "/nowhere/corpus.txt"})


@pytest.mark.parametrize("field", ["inner_steps", "decisions", "batch_size"])
def test_counts_must_be_positive(field):
    with pytest.raises(ValueError, match=rf"^{field}=0 is invalid: expected an integer >= 1"):
        gym.make("strato_env/RankAllocation-v0", **{field: 0})


def test_unknown_task_key_and_values():
    with pytest.raises(ValueError, match=r"unknown key task.'rank'"):
        EnvConfig(task={"rank": 3})
    with pytest.raises(ValueError, match=r"task.profile='sideways'"):
        EnvConfig(task={"profile": "sideways"})
    with pytest.raises(ValueError, match=r"task.planted_rank=3 is invalid: is not on rank_ladder"):
        RankAllocationEnv(task={"planted_rank": 3})


def test_reset_allocation_is_checked():
    env = RankAllocationEnv(decisions=1, inner_steps=1)
    with pytest.raises(ValueError, match="not on rank_ladder"):
        env.reset(options={"allocation": {env.modules[0].name: 3}})
    with pytest.raises(ValueError, match="over budget"):
        env.reset(options={"allocation": {m.name: 16 for m in env.modules}})
