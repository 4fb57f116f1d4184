"""Training policy learners (SB3 PPO, A2C, sb3-contrib MaskablePPO) with the slot-shared policy."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecEnv

from agents.ppo.policy import MaskableSlotPolicy, SlotPolicy
from strato_env.files import write_atomic
from strato_env.observation import OBSERVATION_VERSION
from strato_env.validation import check_int, check_number


@dataclass
class PolicyConfig:
    """Settings of every policy learner (SB3 PPO, A2C and sb3-contrib MaskablePPO); all of A2C's."""

    total_timesteps: int = 2304
    """Env steps (rank decisions, over all sub-episodes) to train for: 288 default episodes in 18 rollouts of
    the default 16 sub-episodes, so that `strato train` with no arguments ends within 5 minutes on 2 CPU cores."""
    n_envs: int = 16
    """Sub-episodes trained together by the batched engine, one forward pass of the base per optimizer step
    (`agents.ppo.vec_env.BatchedVecEnv`); sub-episode i plays train instance i % len(train_instances), so at
    least one per instance."""
    n_steps: int = 8
    """Env steps per sub-episode and rollout before each update (one default episode)."""
    learning_rate: float = 3e-3
    """Adam learning rate of the policy."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    ent_coef: float = 0.01
    """Entropy bonus."""
    hidden: int = 64
    """Width of the slot encoder and heads."""
    grow_bias: float = 1.0
    """Initial logit of grow above shrink and keep (0: all three equally likely). At 1 the untrained policy
    grows a rank-0 module with probability 0.73, so its episodes fill the budget and show what rank buys."""

    def __post_init__(self) -> None:
        for name in ("total_timesteps", "n_envs", "n_steps", "hidden"):
            check_int(name, getattr(self, name), 1)
        for name in ("learning_rate", "gamma", "gae_lambda"):
            check_number(name, getattr(self, name), 0, 1, low_open=True)
        check_number("grow_bias", self.grow_bias)
        check_number("ent_coef", self.ent_coef, 0)

    def algorithm_kwargs(self) -> dict[str, Any]:
        """The SB3 constructor arguments these settings give."""
        names = ("learning_rate", "n_steps", "gamma", "gae_lambda", "ent_coef")
        return {name: getattr(self, name) for name in names}


@dataclass
class PPOConfig(PolicyConfig):
    """Settings of PPO and MaskablePPO: those of every learner plus the clipped, minibatched update's."""

    batch_size: int = 16
    """Minibatch size of the PPO update."""
    n_epochs: int = 10
    """Passes over each rollout."""
    clip_range: float = 0.2
    """PPO clipping coefficient."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("batch_size", self.batch_size, 1)
        check_int("n_epochs", self.n_epochs, 1)
        check_number("clip_range", self.clip_range, 0, 1, low_open=True)

    def algorithm_kwargs(self) -> dict[str, Any]:
        ppo_only = {"batch_size": self.batch_size, "n_epochs": self.n_epochs, "clip_range": self.clip_range}
        return super().algorithm_kwargs() | ppo_only


class RunEndIsTerminal(gym.Wrapper):
    """What a learner sees: the last decision ends the fine-tuning run, so nothing follows it.

    The env reports that end as truncation (it is a fixed episode length), and SB3 treats truncation as a
    time limit outside the task: it adds gamma * V(final observation) to the last reward. A critic that
    has learned "high loss now, much to gain later" then pays the policy for ending a run untrained. Reporting
    the end as termination makes the last reward final, as it is.
    """

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward, terminated or truncated, False, info


class EpisodeLog(BaseCallback):
    """Collects one row per finished episode and hands it to `on_episode`."""

    def __init__(self, on_episode: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self.on_episode = on_episode
        self.returns: dict[int, float] = {}

    def _on_step(self) -> bool:
        for i, (reward, done, info) in enumerate(
            zip(self.locals["rewards"], self.locals["dones"], self.locals["infos"], strict=True)
        ):
            self.returns[i] = self.returns.get(i, 0.0) + float(reward)
            if done:
                row = {
                    "timesteps": self.num_timesteps,
                    "return": self.returns.pop(i),
                    "loss": info["loss"],
                    "params": info["params"],
                    "budget": info["budget"],
                }
                for key, value in row.items():
                    if key != "timesteps":
                        self.logger.record_mean(f"episode/{key}", value)
                self.on_episode(row)
        return True


ALGORITHMS: dict[str, tuple[type[BaseAlgorithm], type[ActorCriticPolicy]]] = {
    "ppo": (PPO, SlotPolicy),
    "maskable_ppo": (MaskablePPO, MaskableSlotPolicy),
    "a2c": (A2C, SlotPolicy),
}
"""Learner name -> (SB3 algorithm class, slot policy class)."""


def build_algorithm(
    algorithm: str, config: PolicyConfig, env: gym.Env | VecEnv, seed: int, tensorboard_log: str | None = None
) -> BaseAlgorithm:
    """The SB3 / sb3-contrib `algorithm` with the slot policy, learning on `env`: a `BatchedVecEnv` (which
    reports a run's end as terminal itself) or one gym env (wrapped in `RunEndIsTerminal`). `config` is a
    PPOConfig for PPO and MaskablePPO and a PolicyConfig for A2C."""
    cls, policy = ALGORITHMS[algorithm]
    expected = PolicyConfig if cls is A2C else PPOConfig
    if type(config) is not expected:
        raise ValueError(f"{algorithm} takes a {expected.__name__}, not a {type(config).__name__}")
    if not isinstance(env, VecEnv):
        env = RunEndIsTerminal(env)
    return cls(
        policy,
        env,
        **config.algorithm_kwargs(),
        seed=seed,
        verbose=0,
        tensorboard_log=tensorboard_log,
        device="cpu",
        policy_kwargs={"hidden": config.hidden, "grow_bias": config.grow_bias},
    )


def algorithm_name(model: BaseAlgorithm) -> str:
    return next(name for name, (cls, _) in ALGORITHMS.items() if type(model) is cls)


def policy_bytes(model: BaseAlgorithm) -> bytes:
    """SB3's `.zip` of `model`, plus a small `strato.json` entry naming the algorithm and the observation
    layout's version, so that `load_policy` needs no hint and refuses a policy trained on another layout."""
    buffer = io.BytesIO()
    model.save(buffer)
    with zipfile.ZipFile(buffer, "a") as archive:
        meta = {"algorithm": algorithm_name(model), "observation_version": OBSERVATION_VERSION}
        archive.writestr("strato.json", json.dumps(meta))
    return buffer.getvalue()


def save_policy(model: BaseAlgorithm, path: str | os.PathLike) -> None:
    """`policy_bytes(model)`, written atomically to `path`."""
    write_atomic(path, policy_bytes(model))


def load_policy(source: str | os.PathLike | bytes, env: gym.Env | None = None) -> BaseAlgorithm:
    """Load a policy written by `save_policy` (a path) or `policy_bytes` (the bytes): PPO, A2C or MaskablePPO."""
    name = "the policy bytes" if isinstance(source, bytes) else os.fspath(source)
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    with zipfile.ZipFile(file) as archive:
        if "strato.json" not in archive.namelist():
            raise ValueError(f"{name} was not written by strato (no strato.json entry naming its algorithm)")
        meta = json.loads(archive.read("strato.json"))
    version = meta.get("observation_version", 0)
    if version != OBSERVATION_VERSION:
        raise ValueError(
            f"{name} was trained on observation layout v{version}; this strato_env writes v{OBSERVATION_VERSION}, "
            "which the policy would misread. Retrain it with this version."
        )
    if isinstance(file, io.BytesIO):
        file.seek(0)
    return ALGORITHMS[meta["algorithm"]][0].load(file, env=env, device="cpu")
