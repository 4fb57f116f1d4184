import io
import json
import zipfile

import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.config import load_train_config
from agents.ppo.policy import SlotActionHead
from agents.ppo.train import (
    A2CConfig,
    PPOConfig,
    RunEndIsTerminal,
    TRPOConfig,
    build_algorithm,
    load_policy,
    policy_bytes,
    run_policy_episode,
    save_policy,
)
from agents.ppo.vec_env import BatchedVecEnv
from strato_env.env import GROW, SHRINK, RankAllocationEnv
from strato_env.observation import DECISIONS_LEFT, MODULE_FEATURES, OBSERVATION_VERSION, PRESENT, module_table

TINY = {"decisions": 3, "inner_steps": 1, "probe_steps": 2, "task": {"eval_examples": 16}}
TINY_PPO = {"n_steps": 30, "batch_size": 15, "n_epochs": 2}
TINY_TRPO = {"n_steps": 30, "batch_size": 15, "n_critic_updates": 2}


@pytest.fixture(scope="module")
def gpt2_env():
    return RankAllocationEnv(**TINY)


def tiny_config(algorithm: str, n_steps: int, batch_size: int, n_epochs: int = 2):
    """The algorithm's settings class with a tiny rollout."""
    if algorithm == "a2c":
        return A2CConfig(n_steps=n_steps)
    if algorithm == "trpo":
        return TRPOConfig(n_steps=n_steps, batch_size=batch_size, n_critic_updates=n_epochs)  # its default: mean
    return PPOConfig(n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs)


ALL = ["ppo", "maskable_ppo", "a2c", "trpo"]


@pytest.mark.parametrize("algorithm", ALL)
def test_training_changes_the_slot_head_and_the_policy_round_trips(algorithm, gpt2_env, tmp_path):
    config = tiny_config(algorithm, 5 if algorithm == "a2c" else 30, 15)
    model = build_algorithm(algorithm, config, gpt2_env, seed=0)
    assert isinstance(model.policy.action_net, SlotActionHead)
    head_before = [p.detach().clone() for p in model.policy.action_net.parameters()]
    model.learn(60)
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
    model = build_algorithm("maskable_ppo", PPOConfig(**TINY_PPO), gpt2_env, seed=1)
    for seed in range(3):
        observation, _ = gpt2_env.reset(seed=seed)
        for _ in range(TINY["decisions"]):
            mask = gpt2_env.action_masks().reshape(-1, 3)
            action, _ = model.predict(observation, action_masks=mask.reshape(-1), deterministic=False)
            assert mask[np.arange(len(action)), action].all()
            observation, *_ = gpt2_env.step(action)


def test_a_gpt2_policy_runs_unchanged_on_llama_and_bert(gpt2_env):
    model = build_algorithm("maskable_ppo", PPOConfig(**TINY_PPO), gpt2_env, seed=0)
    model.learn(30)
    for name, modules in (("llama-tiny", 28), ("bert-tiny", 24)):
        env = RankAllocationEnv(model=name, **TINY)
        assert len(env.modules) == modules != len(gpt2_env.modules)
        episode = run_policy_episode(model, env, seed=0, deterministic=False)
        assert len(episode["actions"]) == TINY["decisions"]
        assert episode["params"] <= env.budget and set(episode["allocation"]) == {m.name for m in env.modules}
        # sampled moves: the shared head acts on real slots and only keeps on padding
        assert all(a == 1 for step in episode["actions"] for a in step[modules:])
        assert any(a in (SHRINK, GROW) for step in episode["actions"] for a in step[:modules])


def test_the_batched_vec_env_spreads_instances_and_resets_in_the_same_step():
    """Sub-episode i plays instance i % 2; the two gpt2 sub-episodes share one batch (one base model)."""
    configs = [RankAllocationEnv(**TINY).config, RankAllocationEnv(model="llama-tiny", **TINY).config]
    vec = BatchedVecEnv(configs, n_envs=3)
    assert sorted(len(members) for _, members in vec.groups) == [1, 2]
    vec.seed(0)
    observation = vec.reset()
    present = module_table(observation["modules"])[:, :, PRESENT].sum(axis=1)
    assert present.tolist() == [16, 28, 16]
    masks = np.stack(vec.env_method("action_masks"))
    assert masks.shape == (3, 3 * configs[0].max_modules)
    for _ in range(TINY["decisions"]):
        observation, _, dones, infos = vec.step(np.ones((3, configs[0].max_modules), dtype=np.int64))
    # the run's end is terminal (nothing follows it), and SB3 gets the next episode's first observation at once
    assert dones.all() and not any(info["TimeLimit.truncated"] for info in infos)
    assert all(info["terminal_observation"]["global"][DECISIONS_LEFT] == 0 for info in infos)
    assert np.all(observation["global"][:, DECISIONS_LEFT] == 1)
    with pytest.raises(ValueError, match=r"^n_envs=1 is smaller than the 2 training instances.*allowed: n_envs >= 2"):
        BatchedVecEnv(configs, n_envs=1)


@pytest.mark.parametrize("algorithm", ALL)
def test_learners_train_on_the_batched_vec_env_reproducibly(algorithm):
    """A few updates on 4 sub-episodes change the policy; the same seed gives the same policy, bit for bit."""
    config = tiny_config(algorithm, 3, 6)
    trained = []
    for _ in range(2):
        vec = BatchedVecEnv([RankAllocationEnv(**TINY).config], n_envs=4)
        model = build_algorithm(algorithm, config, vec, seed=3)
        before = [p.detach().clone() for p in model.policy.parameters()]
        model.learn(24)
        assert model.num_timesteps == 24
        after = [p.detach().clone() for p in model.policy.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        trained.append(after)
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


def test_bad_ppo_config_names_the_field():
    with pytest.raises(ValueError, match=r"a2c takes a A2CConfig, not a PPOConfig"):
        build_algorithm("a2c", PPOConfig(), RankAllocationEnv(**TINY), seed=0)
    with pytest.raises(ValueError, match=r"^gamma=1.5 is invalid"):
        PPOConfig(gamma=1.5)
    with pytest.raises(ValueError, match=r"^n_envs=0 is invalid"):
        PPOConfig(n_envs=0)
    with pytest.raises(ValueError, match=r"^architecture='lstm' is invalid: allowed: \['attention', 'mean'\]"):
        PPOConfig(architecture="lstm")
    with pytest.raises(ValueError, match=r"^hidden=30 is invalid: architecture='attention' has 4 heads"):
        PPOConfig(hidden=30)
    with pytest.raises(ValueError, match=r"^start='full' is invalid: allowed: \['empty', 'greedy', 'greedy_gain'\]"):
        PPOConfig(start="full")
    allowed = r"allowed: \['greedy_iterative', 'greedy', 'go_explore', 'none'\]"
    with pytest.raises(ValueError, match=rf"^warm_start='bc' is invalid: {allowed}"):
        TRPOConfig(warm_start="bc")
    with pytest.raises(ValueError, match=r"^target_kl=0 is invalid"):
        TRPOConfig(target_kl=0)
    with pytest.raises(ValueError, match=r"^ppo.gamma=1.5 is invalid"):  # in a config, the key is named in full
        load_train_config(None, ["ppo.gamma=1.5"])


@pytest.mark.parametrize("architecture", ["attention", "mean"])
def test_padding_slots_change_nothing_in_the_action_distribution(architecture, gpt2_env):
    """The same weights on the same 16-module model, once with 16 slots (no padding) and once with 64: the real
    slots' move probabilities, the log-probability of an action and the entropy are the same; padding slots
    keep with probability 1 and add nothing to either."""
    config = PPOConfig(architecture=architecture, **TINY_PPO)
    padded = build_algorithm("ppo", config, gpt2_env, seed=0).policy
    unpadded_env = RankAllocationEnv(**TINY, max_modules=len(gpt2_env.modules))
    unpadded = build_algorithm("ppo", config, unpadded_env, seed=1).policy
    unpadded.load_state_dict(padded.state_dict())
    n = len(gpt2_env.modules)
    gpt2_env.reset(seed=0)
    observation, *_ = gpt2_env.step(np.full(gpt2_env.config.max_modules, GROW))  # ranks above 0, loss below L_0
    short = {"modules": observation["modules"][: n * MODULE_FEATURES], "global": observation["global"]}
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 3, size=n)
    results = []
    for policy, obs, slots in ((padded, observation, 64), (unpadded, short, n)):
        obs_tensor, _ = policy.obs_to_tensor(obs)
        action = torch.as_tensor(np.concatenate([actions, np.ones(slots - n, dtype=np.int64)]))[None]
        distribution = policy.get_distribution(obs_tensor)
        probs = torch.stack([d.probs[0] for d in distribution.distribution])
        _, log_prob, entropy = policy.evaluate_actions(obs_tensor, action)
        results.append((probs, log_prob, entropy))
    (probs_64, log_prob_64, entropy_64), (probs_n, log_prob_n, entropy_n) = results
    torch.testing.assert_close(probs_64[:n], probs_n, rtol=1e-5, atol=1e-6)
    assert torch.equal(probs_64[n:], torch.tensor([[0.0, 1.0, 0.0]]).expand(64 - n, 3))
    torch.testing.assert_close(log_prob_64, log_prob_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_64, entropy_n, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(probs_n[:, 1], probs_n[:1, 1].expand(n))  # the slots do differ


def test_the_attention_policy_is_twice_differentiable(gpt2_env):
    """TRPO takes Hessian-vector products of the policy's KL divergence: a second derivative through attention."""
    policy = build_algorithm("trpo", TRPOConfig(architecture="attention", **TINY_TRPO), gpt2_env, seed=0).policy
    observation, _ = gpt2_env.reset(seed=0)
    obs_tensor, _ = policy.obs_to_tensor(observation)
    log_prob = policy.get_distribution(obs_tensor).log_prob(torch.full((1, 64), GROW)).sum()
    parameters = [p for p in policy.mlp_extractor.mixer.parameters()]
    gradients = torch.autograd.grad(log_prob, parameters, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in gradients), parameters, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in second)


class StepRewards(BaseCallback):
    """The rewards the env returned, copied before SB3 may add a bootstrapped value to them."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[float] = []

    def _on_step(self) -> bool:
        self.rewards.append(float(self.locals["rewards"][0]))
        return True


@pytest.mark.parametrize("algorithm", ["maskable_ppo", "a2c", "trpo"])
def test_the_learner_does_not_bootstrap_past_the_last_decision(algorithm, gpt2_env):
    steps = 2 * TINY["decisions"]  # one rollout of two whole episodes
    config = tiny_config(algorithm, steps, steps, n_epochs=1)
    model = build_algorithm(algorithm, config, gpt2_env, seed=0)
    rewards = StepRewards()
    model.learn(steps, callback=rewards)
    # SB3 adds gamma * V(final observation) to the last reward of a truncated episode; the run ends there
    np.testing.assert_allclose(model.rollout_buffer.rewards[:, 0], rewards.rewards, rtol=0, atol=1e-7)

    gpt2_env.reset(seed=0)
    wrapped = RunEndIsTerminal(gpt2_env)
    ends = [wrapped.step(np.ones(gpt2_env.config.max_modules, dtype=np.int64))[2:4] for _ in range(TINY["decisions"])]
    assert ends == [(False, False)] * (TINY["decisions"] - 1) + [(True, False)]


@pytest.mark.slow
def test_training_beats_the_untrained_policy():
    """Where every parameter costs more than it can gain (cost_weight 1), the untrained policy (of this seed)
    pays for the ranks it grows; a few hundred decisions of MaskablePPO learn to hold them back. Deterministic
    episodes over five seeds, before and after: learning wins back at least 80% of what the untrained policy
    paid, by several times the spread over those seeds."""
    env = RankAllocationEnv(**TINY, cost_weight=1.0)
    settings = PPOConfig(n_steps=24, batch_size=24, n_epochs=4, learning_rate=3e-3, ent_coef=0.01)
    model = build_algorithm("maskable_ppo", settings, env, seed=0)

    def returns() -> np.ndarray:
        return np.array([run_policy_episode(model, env, seed=s)["return"] for s in range(5)])

    untrained = returns()
    assert untrained.mean() < -0.3  # it grows, and pays
    model.learn(288)
    trained = returns()
    margin = trained.mean() - untrained.mean()
    assert margin > 0.8 * -untrained.mean() and margin > 4 * max(untrained.std(), trained.std()), (untrained, trained)


def test_a_policy_saved_under_another_observation_layout_is_refused(gpt2_env, tmp_path):
    model = build_algorithm("maskable_ppo", PPOConfig(**TINY_PPO), gpt2_env, seed=0)
    assert type(load_policy(policy_bytes(model))) is type(model)
    old = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(policy_bytes(model))) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.namelist():
            data = source.read(item)
            target.writestr(item, json.dumps({"algorithm": "maskable_ppo"}) if item == "strato.json" else data)
    (tmp_path / "v0.zip").write_bytes(old.getvalue())  # written before the layout had a version: v0
    with pytest.raises(ValueError, match=r"v0.zip was trained on observation layout v0; this strato_env writes v3"):
        load_policy(tmp_path / "v0.zip")
    old = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(policy_bytes(model))) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.namelist():
            meta = {"algorithm": "maskable_ppo", "observation_version": OBSERVATION_VERSION}  # before policy versions
            target.writestr(item, json.dumps(meta) if item == "strato.json" else source.read(item))
    with pytest.raises(ValueError, match=r"^the policy bytes holds a v1 slot policy; this strato builds v3"):
        load_policy(old.getvalue())
