import dataclasses

import numpy as np
import pytest

from agents import baselines
from agents.ppo.meta import (
    greedy_targets,
    meta_train,
    replay,
    search_trajectories,
    teacher_actions,
    validation_return,
)
from agents.ppo.train import PPOConfig, load_policy, policy_bytes, run_policy_episode
from agents.ppo.vec_env import BatchedVecEnv
from strato_env.config import EnvConfig, from_dict
from strato_env.env import GROW, KEEP, SHRINK, RankAllocationEnv
from strato_env.observation import MODULE_FEATURES, RANK

PROTOCOL = {"decisions": 3, "inner_steps": 2, "probe_steps": 2, "rank_ladder": [0, 4, 8, 16]}
TASK = {"name": "planted", "profile": "generated", "train_examples": 64, "eval_examples": 16, "test_examples": 16}


def instance(model: str, seed: int) -> EnvConfig:
    return from_dict(EnvConfig, {"model": model, "task": TASK | {"data_seed": seed}, **PROTOCOL})


TRAIN = [instance("gpt2-tiny", 10), instance("llama-tiny", 10)]
VALIDATION = [instance("gpt2-tiny", 20)]


def test_the_teacher_moves_each_slot_toward_greedys_rank():
    modules = np.zeros((1, 3, MODULE_FEATURES), np.float32)
    modules[0, :, RANK] = [0.0, 0.25, 1.0]  # three slots at ranks 0, 4 and 16 of r_max 16
    modules = modules.reshape(1, -1)
    targets = np.array([[16, 4, 4]])
    assert teacher_actions(modules, targets, 16).tolist() == [[GROW, KEEP, SHRINK]]


@pytest.mark.parametrize("teacher", ["greedy", "greedy_iterative"])
def test_behaviour_cloning_reproduces_the_teachers_allocations_on_the_train_set(teacher):
    settings = PPOConfig(n_envs=2, total_timesteps=1, n_steps=1, batch_size=2, warm_start=teacher,
                         warm_start_epochs=600)  # fmt: skip
    meta = meta_train("ppo", settings, TRAIN, [], seed=0)
    assert meta.warm_start["decisions"] == 2 * PROTOCOL["decisions"] and meta.warm_start["agreement"] == 1.0
    for config in TRAIN:
        env = RankAllocationEnv(config)
        expected = getattr(baselines, teacher)(env, seed=0).allocation
        assert len(set(expected.values())) > 1  # the teacher does not give every module the same rank here
        # the policy's own episode (deterministic) ends at the teacher's allocation
        assert run_policy_episode(meta.model, env, seed=0)["allocation"] == expected


@pytest.mark.parametrize(("start", "teacher"), [("greedy", "greedy"), ("greedy_gain", "greedy_iterative")])
def test_a_policy_started_from_a_rules_allocation_that_learned_to_keep_it_is_that_rule(start, teacher):
    """start='greedy' (or 'greedy_gain'): every episode (teacher's, learner's, validation's, applied) begins at that
    rule's allocation; a policy that keeps it trains exactly the rule's static adapter, and the saved policy keeps
    its start. (Iterative greedy keeps every module of a budget-filling allocation, so it teaches keeping too.)"""
    settings = PPOConfig(n_envs=2, total_timesteps=2, n_steps=1, batch_size=2, start=start, warm_start=teacher,
                         warm_start_epochs=200)  # fmt: skip
    meta = meta_train("ppo", settings, TRAIN, VALIDATION, seed=0)
    assert meta.warm_start["agreement"] == 1.0  # the teacher keeps every module where it starts
    policy = load_policy(policy_bytes(meta.model))
    assert policy.policy.start == start
    for config in TRAIN + VALIDATION:
        env = RankAllocationEnv(config)
        rule = getattr(baselines, start)(env, seed=3).allocation
        assert len(set(rule.values())) > 1
        episode = run_policy_episode(policy, env, seed=3)
        assert episode["allocation"] == rule
        assert all(action == [KEEP] * len(action) for action in episode["actions"])
        assert episode["loss"] == env.evaluate_allocation(rule, seed=3)  # the rule's own static run


def test_cloning_go_explores_best_episodes_reproduces_their_allocations_on_the_train_set():
    settings = PPOConfig(n_envs=2, total_timesteps=1, n_steps=1, batch_size=2, warm_start="go_explore",
                         warm_start_search_steps=24, warm_start_epochs=600)  # fmt: skip
    # the single probe: with it the searches find episodes other than the rule's on both instances
    train = [dataclasses.replace(config, probe="single") for config in TRAIN]
    meta = meta_train("ppo", settings, train, [], seed=0)
    trajectories, search_steps = search_trajectories(train, 24, seed=0)
    assert meta.warm_start["search_optimizer_steps"] == search_steps == 2 * 24  # four episodes per instance
    assert meta.warm_start["agreement"] == 1.0
    for config, moves in zip(train, trajectories, strict=True):
        env = RankAllocationEnv(config)
        env.reset(seed=0)
        for action in moves:
            *_, info = env.step(np.asarray(action))
        assert len(moves) == PROTOCOL["decisions"]  # a whole episode
        # the search's best episode is not the rule it explores around, so the clone learned the search's moves
        assert info["allocation"] != baselines.greedy_iterative(env, seed=0).allocation
        assert run_policy_episode(meta.model, env, seed=0)["allocation"] == info["allocation"]


def test_a_go_explore_teacher_whose_search_pays_for_no_episode_is_refused_before_any_work():
    settings = PPOConfig(n_envs=2, warm_start="go_explore", warm_start_search_steps=5)  # an episode is 6 steps
    with pytest.raises(ValueError, match=r"^warm_start_search_steps=5 is invalid: expected an integer >= 6"):
        meta_train("ppo", settings, TRAIN, [], seed=0)


def test_replay_plays_each_sub_episodes_moves_by_the_decision_it_reads():
    vec_env = BatchedVecEnv(TRAIN, 2)
    keep = [KEEP] * TRAIN[0].max_modules
    grow = [GROW] + keep[1:]  # grow the first module
    act = replay([[keep, grow], [grow]])  # sub-episode 1's trajectory ends after one decision
    observation = vec_env.reset()
    assert act(observation).tolist() == [keep, grow]
    observation, *_ = vec_env.step(act(observation))
    assert act(observation).tolist() == [grow, keep]  # sub-episode 0's second move; sub-episode 1 keeps


def test_with_the_prior_cloning_reproduces_iterative_greedy_on_instances_it_never_saw():
    """The policy's prior input is iterative greedy's move, so cloning it generalises exactly: to an unseen
    gpt2 instance and to an unseen family (bert)."""
    settings = PPOConfig(n_envs=2, total_timesteps=1, n_steps=1, batch_size=2, warm_start_epochs=100)
    assert settings.prior == settings.warm_start == "greedy_iterative"  # the defaults
    meta = meta_train("ppo", settings, TRAIN, [], seed=0)
    for config in [*VALIDATION, instance("bert-tiny", 21)]:
        env = RankAllocationEnv(config)
        expected = baselines.greedy_iterative(env, seed=0).allocation
        assert len(set(expected.values())) > 1
        assert run_policy_episode(meta.model, env, seed=0)["allocation"] == expected


def test_greedy_targets_are_greedys_allocations():
    for config, target in zip(TRAIN, greedy_targets(TRAIN), strict=True):
        env = RankAllocationEnv(config)
        greedy = baselines.greedy(env, seed=0).allocation
        assert [greedy[m.name] for m in env.modules] == target[: len(env.modules)].tolist()
        assert not target[len(env.modules) :].any()


def test_meta_training_learns_keeps_its_best_validation_policy_and_counts_every_step():
    """Where every parameter costs more than it gains (cost_weight 1), the untrained policy pays for the ranks it
    grows; meta-training from a random start learns to hold back on instances it never saw."""
    costly = [dataclasses.replace(c, cost_weight=1.0) for c in TRAIN + VALIDATION]
    settings = PPOConfig(n_envs=4, total_timesteps=96, n_steps=6, batch_size=24, n_epochs=4, eval_every=2,
                         learning_rate=3e-3, ent_coef=0.01, warm_start="none")  # fmt: skip
    meta = meta_train("maskable_ppo", settings, costly[:2], costly[2:], seed=0)
    # evaluated before learning, after every second rollout of 24 decisions, and after the last update
    assert [row["timesteps"] for row in meta.validation] == [0, 48, 96]
    scores = [row["return"] for row in meta.validation]
    assert scores[0] < -1  # the untrained policy of this seed grows ranks and pays for them
    rescored = validation_return(meta.model, BatchedVecEnv(costly[2:], 1))
    assert rescored == pytest.approx(max(scores), rel=1e-6)
    assert rescored > scores[0] + 0.5, scores  # better than before meta-training

    steps = PROTOCOL["inner_steps"] * PROTOCOL["decisions"]  # one episode
    probes = PROTOCOL["probe_steps"] * len(TRAIN + VALIDATION)  # the joint probe: its steps once per instance
    learning, validation = 96 * PROTOCOL["inner_steps"], len(meta.validation) * steps
    assert meta.optimizer_steps == learning + validation + probes


def test_meta_training_is_reproducible():
    settings = PPOConfig(n_envs=2, total_timesteps=6, n_steps=3, batch_size=6, n_epochs=1, warm_start_epochs=5)
    runs = [meta_train("ppo", settings, TRAIN, VALIDATION, seed=4) for _ in range(2)]
    assert runs[0].validation == runs[1].validation and runs[0].warm_start == runs[1].warm_start
    for a, b in zip(runs[0].model.policy.parameters(), runs[1].model.policy.parameters(), strict=True):
        assert np.array_equal(a.detach().numpy(), b.detach().numpy())
