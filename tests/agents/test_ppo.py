import numpy as np
import pytest
import torch
from stable_baselines3.common.env_checker import check_env

from agents.evaluation import run_policy_episode
from agents.ppo.policy import SlotActionHead
from agents.ppo.train import PPOConfig, RoundRobinEnv, build_algorithm, load_policy, save_policy
from strato_env.env import GROW, SHRINK, RankAllocationEnv

TINY = {"decisions": 3, "inner_steps": 1, "probe_steps": 2, "task": {"eval_examples": 16}}
TINY_PPO = {"n_steps": 30, "batch_size": 15, "n_epochs": 2}


@pytest.fixture(scope="module")
def gpt2_env():
    return RankAllocationEnv(**TINY)


@pytest.mark.parametrize("algorithm", ["ppo", "maskable_ppo", "a2c"])
def test_training_updates_the_slot_head_and_round_trips(algorithm, gpt2_env, tmp_path):
    config = PPOConfig(algorithm=algorithm, **(TINY_PPO if algorithm != "a2c" else {"n_steps": 5}))
    model = build_algorithm(config, gpt2_env, seed=0)
    assert isinstance(model.policy.action_net, SlotActionHead)
    head_before = [p.detach().clone() for p in model.policy.action_net.parameters()]
    model.learn(210 if algorithm != "a2c" else 60)
    assert model.num_timesteps >= 60
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.policy.action_net.parameters(), strict=True))

    save_policy(model, str(tmp_path / "policy.zip"))
    loaded = load_policy(str(tmp_path / "policy.zip"))
    assert type(loaded) is type(model)
    observation, _ = gpt2_env.reset(seed=4)
    masks = {"action_masks": gpt2_env.action_masks()} if algorithm == "maskable_ppo" else {}
    for deterministic in (True, False):
        model.set_random_seed(7)  # sampling draws from torch's global generator
        action_a, _ = model.predict(observation, deterministic=deterministic, **masks)
        loaded.set_random_seed(7)
        action_b, _ = loaded.predict(observation, deterministic=deterministic, **masks)
        np.testing.assert_array_equal(action_a, action_b)


def test_maskable_policy_never_takes_a_masked_move(gpt2_env):
    model = build_algorithm(PPOConfig(**TINY_PPO), gpt2_env, seed=1)
    for seed in range(3):
        observation, _ = gpt2_env.reset(seed=seed)
        for _ in range(TINY["decisions"]):
            mask = gpt2_env.action_masks().reshape(-1, 3)
            action, _ = model.predict(observation, action_masks=mask.reshape(-1), deterministic=False)
            assert mask[np.arange(len(action)), action].all()
            observation, *_ = gpt2_env.step(action)


def test_a_gpt2_policy_runs_unchanged_on_llama_and_bert(gpt2_env):
    model = build_algorithm(PPOConfig(**TINY_PPO), gpt2_env, seed=0)
    model.learn(30)
    for name, modules in (("llama-tiny", 28), ("bert-tiny", 24)):
        env = RankAllocationEnv(model=name, **TINY)
        assert len(env.modules) == modules != len(gpt2_env.modules)
        episode = run_policy_episode(model, env, seed=0)
        assert len(episode["actions"]) == TINY["decisions"]
        assert episode["params"] <= env.budget and set(episode["allocation"]) == {m.name for m in env.modules}
        # the shared head acts on every real slot and only keeps on padding
        assert all(a == 1 for step in episode["actions"] for a in step[modules:])
        assert any(a in (SHRINK, GROW) for step in episode["actions"] for a in step[:modules])


def test_round_robin_cycles_instances_and_passes_the_checker():
    envs = [RankAllocationEnv(**TINY), RankAllocationEnv(model="llama-tiny", **TINY)]
    cycle = RoundRobinEnv(envs)
    check_env(cycle, warn=False)
    seen = []
    for _ in range(4):
        cycle.reset()
        seen.append(cycle.current.config.model)
    assert seen == ["gpt2-tiny", "llama-tiny", "gpt2-tiny", "llama-tiny"]


def test_bad_ppo_config_names_the_field():
    with pytest.raises(ValueError, match=r"ppo.algorithm='sac' is invalid"):
        PPOConfig(algorithm="sac")
    with pytest.raises(ValueError, match=r"ppo.gamma=1.5 is invalid"):
        PPOConfig(gamma=1.5)
