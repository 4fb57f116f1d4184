"""RankAllocationVecEnv: every sub-episode is the single env, trained together with the others."""

import gymnasium as gym
import numpy as np
import pytest
from peft import PeftModel

import strato_env  # noqa: F401  (registers the env ids)
from strato_env.config import EnvConfig
from strato_env.env import RankAllocationEnv
from strato_env.observation import DECISIONS_LEFT
from strato_env.vector import RankAllocationVecEnv

SETTINGS = {"decisions": 6, "inner_steps": 3, "probe_steps": 2}
LOSS_TOLERANCE = 1e-5
"""Relative: sub-episodes stacked in one batch and a lone env run the same kernels on other matrix sizes, so
float sums may round differently; over a whole episode the losses still agree to this."""


def _masked_random(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random allowed move per slot (shrinks and grows likely), from a (slots * 3) mask."""
    masks = masks.reshape(-1, 3)
    weights = masks * np.array([1.0, 0.5, 1.5])
    return np.array([rng.choice(3, p=w / w.sum()) for w in weights])


def _play(vec: RankAllocationVecEnv, singles: list[RankAllocationEnv], seed: int) -> None:
    """Drive the vector env and one single env per sub-episode with the same seeds and moves (a get_state at
    decision 2, a set_state back to it at decision 4), asserting the same allocations, masks and losses."""
    rng = np.random.default_rng(seed)
    _, infos = vec.reset(seed=seed)
    for i, env in enumerate(singles):
        _, info = env.reset(seed=seed + i)
        assert infos["loss"][i] == pytest.approx(info["loss"], rel=LOSS_TOLERANCE)
    saved = {}
    shrinks = 0
    for decision in range(SETTINGS["decisions"] + 2):
        if decision == 2:
            saved = {i: vec.get_state(i) for i in range(vec.num_envs)}
            saved_single = [env.get_state() for env in singles]
        if decision == 4:  # back to decision 2: the rest of the episode is replayed from there
            for i, env in enumerate(singles):
                vec.set_state(i, saved[i])
                env.set_state(saved_single[i])
        masks = vec.action_masks()
        actions = np.stack([_masked_random(masks[i], rng) for i in range(vec.num_envs)])
        _, rewards, _, truncations, infos = vec.step(actions)
        for i, env in enumerate(singles):
            np.testing.assert_array_equal(masks[i], env.action_masks())
            _, reward, _, truncated, info = env.step(actions[i])
            assert {k: int(v[i]) for k, v in infos["allocation"].items() if not k.startswith("_")} == info["allocation"]
            assert infos["loss"][i] == pytest.approx(info["loss"], rel=LOSS_TOLERANCE)
            assert rewards[i] == pytest.approx(reward, rel=1e-4, abs=1e-6)
            assert truncations[i] == truncated
        shrinks += int((actions == 0).sum())
    assert shrinks > 0 and truncations.all()


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_each_sub_episode_equals_the_single_env_with_the_same_seed_and_moves(model):
    config = EnvConfig(model=model, **SETTINGS)
    vec = RankAllocationVecEnv([config] * 3)
    _play(vec, [RankAllocationEnv(config) for _ in range(3)], seed=10)


def test_sub_episodes_of_different_tasks_on_one_base_equal_their_single_envs():
    """Two planted teachers and a budget below the oracle's count, on one gpt2-tiny base."""
    configs = [
        EnvConfig(**SETTINGS),
        EnvConfig(**SETTINGS, task={"data_seed": 1, "profile": "bottom-heavy"}),
        EnvConfig(**SETTINGS, task={"data_seed": 2, "profile": "mlp-only"}, budget=6000),
    ]
    vec = RankAllocationVecEnv(configs)
    assert [vec.batch.subs[i].budget for i in range(3)][2] == 6000
    _play(vec, [RankAllocationEnv(c) for c in configs], seed=3)


def test_masked_random_rollouts_never_break_a_budget_or_leave_the_ladder():
    budgets = [300, 1200, 5000, 20000]
    vec = RankAllocationVecEnv(
        [EnvConfig(decisions=8, inner_steps=1, probe_steps=0, budget=b, task={"eval_examples": 8}) for b in budgets]
    )
    rng = np.random.default_rng(0)
    vec.reset(seed=0)
    ladder = set(vec.batch.ladder)
    for _ in range(40):
        masks = vec.action_masks()
        actions = np.stack([_masked_random(m, rng) for m in masks])
        _, _, _, _, infos = vec.step(actions)
        ranks = np.stack([infos["allocation"][m.name] for m in vec.batch.modules], axis=1)
        assert set(np.unique(ranks)) <= ladder
        assert np.all(infos["params"] <= np.array(budgets))


def test_an_exported_sub_episode_reloads_with_peft_to_the_same_loss(tmp_path):
    vec = RankAllocationVecEnv([EnvConfig(**SETTINGS)] * 2)
    vec.reset(seed=0)
    for _ in range(3):
        masks = vec.action_masks().reshape(2, -1, 3)
        _, _, _, _, infos = vec.step(np.where(masks[:, :, 2], 2, 1))
    vec.export_adapter(1, str(tmp_path / "adapter"))
    single = RankAllocationEnv(EnvConfig(**SETTINGS))
    reloaded = PeftModel.from_pretrained(single.fresh_base_model(), tmp_path / "adapter")
    assert single.evaluate_loss(reloaded) == pytest.approx(infos["loss"][1], abs=1e-5)


def test_next_step_autoreset_and_make_vec():
    vec = gym.make_vec(
        "strato_env/RankAllocation-v3", num_envs=2, vectorization_mode="vector_entry_point", decisions=1, inner_steps=1
    )
    _, infos = vec.reset(seed=0)
    keep = np.ones(vec.action_space.shape, dtype=np.int64)
    _, _, terminations, truncations, _ = vec.step(keep)
    assert truncations.all() and not terminations.any()
    observations, rewards, terminations, truncations, after = vec.step(keep)  # the reset step: action ignored
    assert np.all(rewards == 0) and not (terminations | truncations).any()
    assert np.all(observations["global"][:, DECISIONS_LEFT] == 1)
    np.testing.assert_allclose(after["loss"], infos["loss"])  # a fresh episode starts at the base model's loss


def test_bad_input_is_refused_before_any_training():
    with pytest.raises(ValueError, match=r"^num_envs=0 is invalid: allowed: an integer >= 1"):
        RankAllocationVecEnv(num_envs=0)
    with pytest.raises(ValueError, match=r"configs\[1\].batch_size=4 differs from configs\[0\].batch_size=8"):
        RankAllocationVecEnv([EnvConfig(), EnvConfig(batch_size=4)])
    with pytest.raises(ValueError, match=r"configs\[1\].task .* cannot share a batch"):
        RankAllocationVecEnv([EnvConfig(), EnvConfig(task={"seq_len": 16})])
    vec = RankAllocationVecEnv(num_envs=2, decisions=1, inner_steps=1, probe_steps=0)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions has shape \(64,\), expected \(2, 64\)"):
        vec.step(np.ones(64, dtype=np.int64))
    with pytest.raises(ValueError, match=r"actions\[\[1, 3\]\]=7 is invalid: allowed moves are 0"):
        vec.step(np.where(np.arange(128).reshape(2, 64) == 67, 7, 1))


def test_disabled_autoreset_resets_only_the_masked_sub_episodes():
    vec = RankAllocationVecEnv(num_envs=2, autoreset_mode="Disabled", decisions=1, inner_steps=1, probe_steps=0)
    vec.reset(seed=0)
    keep = np.ones(vec.action_space.shape, dtype=np.int64)
    vec.step(keep)
    with pytest.raises(RuntimeError, match=r"sub-episodes \[0, 1\] have ended; reset them"):
        vec.step(keep)
    observations, _ = vec.reset(options={"reset_mask": np.array([False, True])})
    assert observations["global"][:, DECISIONS_LEFT].tolist() == [0, 1]
    with pytest.raises(RuntimeError, match=r"sub-episodes \[0\] have ended"):
        vec.step(keep)


def test_a_width_that_cannot_fit_fails_before_any_allocation():
    with pytest.raises(
        ValueError, match=r"^num_envs=2000000 is too wide for cpu: about .* GiB .* allowed: num_envs <= \d+"
    ):
        RankAllocationVecEnv(num_envs=2_000_000)


def test_sub_episodes_with_trained_heads_equal_their_single_envs(tmp_path):
    """Classification: every sub-episode trains its own head as well as its LoRA factors."""
    rng = np.random.default_rng(0)
    words = {0: ["dull", "bad", "awful"], 1: ["great", "fine", "lovely"]}
    rows = ["text,label"] + [f"{' '.join(rng.choice(words[i % 2], 4))},{i % 2}" for i in range(128)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    task = {"name": "classification", "data": str(tmp_path / "labels.csv"), "train_examples": 64, "eval_examples": 16}
    config = EnvConfig(model="bert-tiny", task=task, budget=20000, **SETTINGS)
    vec = RankAllocationVecEnv([config] * 2)
    assert vec.batch.extra_params > 0
    _play(vec, [RankAllocationEnv(config) for _ in range(2)], seed=5)
