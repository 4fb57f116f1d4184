import time

import gymnasium as gym
import huggingface_hub
import numpy as np
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
    with pytest.raises(ValueError, match=rf"^{field}=0 is invalid: expected an integer (>= 1|in \[1, 256\])"):
        gym.make("strato_env/RankAllocation-v3", **{field: 0})


def test_unknown_task_key_and_values():
    with pytest.raises(ValueError, match=r"unknown key task.rank"):
        EnvConfig(task={"rank": 3})
    with pytest.raises(ValueError, match=r"task.profile='sideways'"):
        EnvConfig(task={"profile": "sideways"})
    with pytest.raises(ValueError, match=r"task.planted_rank=3 is invalid: expected a rank on rank_ladder"):
        RankAllocationEnv(task={"planted_rank": 3})


def test_reset_allocation_is_checked():
    env = RankAllocationEnv(decisions=1, inner_steps=1)
    with pytest.raises(ValueError, match="not on rank_ladder"):
        env.reset(options={"allocation": {env.modules[0].name: 3}})
    with pytest.raises(ValueError, match="over budget"):
        env.reset(options={"allocation": {m.name: 16 for m in env.modules}})


# ---- bad input a new user could give: each a ValueError naming the field, before any training ----------------
@pytest.fixture(scope="module")
def small_env() -> RankAllocationEnv:
    return RankAllocationEnv(decisions=2, inner_steps=1)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "the file is empty"), (b"   \n\n", "the file is empty"), (b"\x89PNG\r\n\x1a\n\x00" * 50, "it is not UTF-8")],
    ids=["empty", "blank", "binary"],
)
def test_causal_lm_file_that_is_empty_or_binary(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"task.data='.*corpus.txt' is invalid: {message}"):
        RankAllocationEnv(task={"name": "causal_lm", "data": str(path)})


def test_max_modules_below_the_model_count(small_env):
    # the instance is cached by then (small_env built it): the check must not depend on building it
    with pytest.raises(ValueError, match=r"max_modules=8 is invalid: gpt2-tiny has 16 target modules; allowed: "
                       r"max_modules >= 16"):  # fmt: skip
        RankAllocationEnv(decisions=2, inner_steps=1, max_modules=8)


@pytest.mark.parametrize("state", [{}, {"episode": 1}, {"lora": {}, "episode": {}, "np_random": 0, "generator": 0}, 3])
def test_set_state_with_something_else_than_a_state(small_env, state):
    small_env.reset(seed=0)
    with pytest.raises(ValueError, match=r"state=.* is invalid: expected a dict returned by get_state\(\)"):
        small_env.set_state(state)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (np.full(64, 7), r"action\[0\]=7 is invalid: allowed moves are 0 \(shrink\), 1 \(keep\) and 2 \(grow\)"),
        (np.r_[np.ones(10), -1, np.ones(53)].astype(int), r"action\[10\]=-1 is invalid"),
        (np.r_[np.nan, np.ones(63)], r"action\[0\]=nan is invalid"),
        (np.full(64, 1.5), r"action\[0\]=1.5 is invalid"),
        (np.ones(16, dtype=int), r"action has shape \(16,\), expected \(64,\): one move per module slot"),
        (np.ones((64, 1), dtype=int), r"action has shape \(64, 1\), expected \(64,\)"),
    ],
)
def test_action_outside_the_action_space(small_env, action, message):
    small_env.reset(seed=0)
    steps = small_env.total_optimizer_steps
    with pytest.raises(ValueError, match=message):
        small_env.step(action)
    assert small_env.total_optimizer_steps == steps and small_env.decisions_made == 0  # nothing trained


def test_float_actions_of_whole_moves_are_accepted(small_env):
    small_env.reset(seed=0)
    _, _, _, _, info = small_env.step(np.full(64, 2.0))
    assert info["params"] > 0


def test_classification_labels_that_are_not_integers(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"task.label_column='label' is invalid: row 0 holds the label 'neg'; "
                       r"expected integer class labels"):  # fmt: skip
        RankAllocationEnv(task={"name": "classification", "data": str(path), "train_examples": 8, "eval_examples": 4})


@pytest.mark.parametrize(("device", "message"), [("cuda:99", "this machine has"), ("gpu", "expected a torch device")])
def test_device_that_is_absent_or_unknown(device, message):
    with pytest.raises(ValueError, match=rf"device='{device}' is invalid: {message}"):
        EnvConfig(device=device)


def test_unknown_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed local port
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"model='no-such-org/no-such-model'.*hub cannot be reached \(127.0.0.1:9"):
        load_config("no-such-org/no-such-model")
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match=r"task.data='no-such-org/no-such-data'.*hub cannot be reached"):
        RankAllocationEnv(task={"name": "causal_lm", "data": "no-such-org/no-such-data"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"hub cannot be reached \(HF_HUB_OFFLINE is set\)"):
        load_config("no-such-org/no-such-model")


def test_unknown_probe_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"probe='pairs' is invalid.*'single'.*'joint'"):
        EnvConfig(probe="pairs")
