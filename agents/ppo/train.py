"""Policy learners (SB3 PPO and A2C, sb3-contrib MaskablePPO and TRPO) with the slot-shared policy: settings,
construction, saving and loading."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from sb3_contrib import TRPO, MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecEnv

from agents import baselines
from agents.ppo.policy import ARCHITECTURES, HEADS, PRIORS, STARTS, MaskableSlotPolicy, SlotPolicy
from strato_env.env import RankAllocationEnv
from strato_env.files import write_atomic
from strato_env.observation import OBSERVATION_VERSION
from strato_env.validation import check_choice, check_int, check_number

WARM_STARTS = ("greedy_iterative", "greedy", "go_explore", "none")
POLICY_VERSION = 3
"""v3: an optional `prior` input (iterative greedy's move per slot); v2: `architecture` (attention or mean over
slots), padding slots masked out of the log-probability, no `grow_bias`; v1 (no `policy_version` entry) had a
mean over slots and a grow bias."""


@dataclass
class PolicyConfig:
    """Settings every policy learner shares (SB3 PPO and A2C, sb3-contrib MaskablePPO and TRPO)."""

    total_timesteps: int = 1280
    """Env steps (rank decisions, over all sub-episodes) of reinforcement learning after the warm start: 160
    default episodes in 10 rollouts of the default 16 sub-episodes (so that the default `strato train` runs in
    under 5 minutes on 2 CPU cores)."""
    n_envs: int = 16
    """Sub-episodes trained together by the batched engine, one forward pass of the base per optimizer step
    (`agents.ppo.vec_env.BatchedVecEnv`); sub-episode i plays train instance i % len(train_instances), so at
    least one per instance."""
    n_steps: int = 8
    """Env steps per sub-episode and rollout before each update (one default episode)."""
    learning_rate: float = 3e-4
    """Adam learning rate of reinforcement learning (the warm start has its own): a fine-tuning rate, since the
    policy starts from the warm start (3e-3 with an entropy bonus undid it on the bench's validation set)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    hidden: int = 64
    """Width of the slot encoder, the attention layers and the heads (a multiple of 4 for `attention`)."""
    architecture: str = "attention"
    """How module slots see each other: 'attention' (a transformer encoder over slot tokens and a global token)
    or 'mean' (a masked mean of the slot encodings)."""
    prior: str = "greedy_iterative"
    """A heuristic every slot reads as an input: 'greedy_iterative' (whether iterative greedy would grow the
    module now, computed from the observation), so the policy learns where to depart from that rule instead of
    relearning it; 'none'."""
    start: str = "empty"
    """Where the policy's episodes start: 'empty' (the env's `initial_rank`, 0 by default: the policy grows every
    rank), 'greedy' (greedy-by-importance's allocation, read from the instance's probe at no optimizer step:
    the policy refines it, and an episode that keeps every module is greedy's own static run) or 'greedy_gain'
    (likewise greedy by estimated gain's, `agents.baselines.greedy_gain`). The saved policy carries it
    (`run_policy_episode` starts there)."""
    warm_start: str = "greedy_iterative"
    """Behaviour cloning of a teacher before reinforcement learning (the critic learns the teacher's returns):
    'greedy_iterative' (the iterative greedy baseline's moves, which read only the observation: each decision
    fills a further 1 / (FILL_SHARE * decisions) of the budget by the importance observed then), 'greedy'
    (grow each module toward greedy-by-importance's allocation, one ladder step per decision), 'go_explore' (the
    best episode a Go-Explore search around iterative greedy's rule found on each train instance, replayed) or
    'none' (a random start)."""
    warm_start_search_steps: int = 1600
    """warm_start='go_explore': optimizer steps of the search on each train instance (`moves='prior'`, eight
    explorations at once on the batched engine)."""
    warm_start_episodes: int = 1
    """Episodes of the teacher per sub-episode that the warm start clones."""
    warm_start_epochs: int = 30
    """Passes of the warm start over the teacher's decisions (each DAgger round makes as many updates, in fewer
    passes over more decisions). On the bench_planted train instances (seed 0) 30 passes clone iterative greedy
    as well as 300 did (agreement 1.0, the same validation return 0.8436); the warm start, its teacher's
    episode included, took 28 s instead of 71 s."""
    warm_start_rounds: int = 0
    """DAgger rounds after the first cloning: the policy plays `warm_start_episodes` episodes per sub-episode,
    the teacher labels the states it visited, and the policy is cloned again on every decision so far, so it
    learns the teacher's move where its own mistakes lead (0: clone the teacher's own episodes only)."""
    eval_every: int = 4
    """Updates between evaluations on the validation instances (the best evaluated policy is kept)."""

    def __post_init__(self) -> None:
        learning = ("total_timesteps", "n_envs", "n_steps", "hidden", "eval_every")
        for name in (*learning, "warm_start_episodes", "warm_start_search_steps"):
            check_int(name, getattr(self, name), 1)
        check_int("warm_start_epochs", self.warm_start_epochs, 0)
        check_int("warm_start_rounds", self.warm_start_rounds, 0)
        for name in ("learning_rate", "gamma", "gae_lambda"):
            check_number(name, getattr(self, name), 0, 1, low_open=True)
        check_choice("architecture", self.architecture, ARCHITECTURES)
        check_choice("prior", self.prior, PRIORS)
        check_choice("start", self.start, STARTS)
        check_choice("warm_start", self.warm_start, WARM_STARTS)
        if self.architecture == "attention" and self.hidden % HEADS:
            raise ValueError(
                f"hidden={self.hidden} is invalid: architecture='attention' has {HEADS} heads, so hidden must be "
                f"a multiple of {HEADS}"
            )

    def algorithm_kwargs(self) -> dict[str, Any]:
        """The SB3 constructor arguments these settings give."""
        return {name: getattr(self, name) for name in ("learning_rate", "n_steps", "gamma", "gae_lambda")}


@dataclass
class A2CConfig(PolicyConfig):
    """Settings of A2C: those of every learner plus an entropy bonus."""

    ent_coef: float = 0.0
    """Entropy bonus (none by default: the warm start gives the policy its moves)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("ent_coef", self.ent_coef, 0)

    def algorithm_kwargs(self) -> dict[str, Any]:
        return super().algorithm_kwargs() | {"ent_coef": self.ent_coef}


@dataclass
class PPOConfig(A2CConfig):
    """Settings of PPO and MaskablePPO: A2C's plus the clipped, minibatched update's."""

    batch_size: int = 64
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


@dataclass
class TRPOConfig(PolicyConfig):
    """Settings of TRPO: those of every learner plus the trust region's (no entropy bonus)."""

    architecture: str = "mean"
    """As for every learner, but 'mean' by default: sb3-contrib's TRPO takes Hessian-vector products through one
    KL gradient per parameter tensor, which through the attention layers costs about 5x the mean network's."""
    batch_size: int = 16
    """Minibatch size of the critic's updates."""
    target_kl: float = 0.01
    """Largest mean KL divergence of one policy update (the trust region)."""
    n_critic_updates: int = 10
    """Critic updates per rollout."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("batch_size", self.batch_size, 1)
        check_int("n_critic_updates", self.n_critic_updates, 1)
        check_number("target_kl", self.target_kl, 0, low_open=True)

    def algorithm_kwargs(self) -> dict[str, Any]:
        names = ("batch_size", "target_kl", "n_critic_updates")
        return super().algorithm_kwargs() | {name: getattr(self, name) for name in names}


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


ALGORITHMS: dict[str, tuple[type[BaseAlgorithm], type[ActorCriticPolicy], type[PolicyConfig]]] = {
    "ppo": (PPO, SlotPolicy, PPOConfig),
    "maskable_ppo": (MaskablePPO, MaskableSlotPolicy, PPOConfig),
    "a2c": (A2C, SlotPolicy, A2CConfig),
    "trpo": (TRPO, SlotPolicy, TRPOConfig),
}
"""Learner name -> (SB3 / sb3-contrib algorithm class, slot policy class, settings class). Every on-policy
algorithm of the two libraries that accepts a `MultiDiscrete` action space and a custom actor-critic is here;
RecurrentPPO is not (its LSTM sits before the policy network and would mix the module slots)."""


def build_algorithm(
    algorithm: str, config: PolicyConfig, env: gym.Env | VecEnv, seed: int, tensorboard_log: str | None = None
) -> BaseAlgorithm:
    """The SB3 / sb3-contrib `algorithm` with the slot policy, learning on `env`: a `BatchedVecEnv` (which
    reports a run's end as terminal itself) or one gym env (wrapped in `RunEndIsTerminal`). `config` is the
    algorithm's settings class in `ALGORITHMS`."""
    cls, policy, expected = ALGORITHMS[algorithm]
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
        policy_kwargs={
            "hidden": config.hidden,
            "architecture": config.architecture,
            "prior": config.prior,
            "start": config.start,
        },
    )


def algorithm_name(model: BaseAlgorithm) -> str:
    return next(name for name, (cls, *_) in ALGORITHMS.items() if type(model) is cls)


def policy_bytes(model: BaseAlgorithm) -> bytes:
    """SB3's `.zip` of `model`, plus a small `strato.json` entry naming the algorithm and the observation
    layout's and the policy network's versions, so that `load_policy` needs no hint and refuses a policy it would
    misread."""
    buffer = io.BytesIO()
    model.save(buffer)
    with zipfile.ZipFile(buffer, "a") as archive:
        meta = {
            "algorithm": algorithm_name(model),
            "observation_version": OBSERVATION_VERSION,
            "policy_version": POLICY_VERSION,
        }
        archive.writestr("strato.json", json.dumps(meta))
    return buffer.getvalue()


def save_policy(model: BaseAlgorithm, path: str | os.PathLike) -> None:
    """`policy_bytes(model)`, written atomically to `path`."""
    write_atomic(path, policy_bytes(model))


def load_policy(source: str | os.PathLike | bytes, env: gym.Env | None = None) -> BaseAlgorithm:
    """Load a policy written by `save_policy` (a path) or `policy_bytes` (the bytes), of any algorithm in
    `ALGORITHMS`."""
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
    policy_version = meta.get("policy_version", 1)
    if policy_version != POLICY_VERSION:
        raise ValueError(
            f"{name} holds a v{policy_version} slot policy; this strato builds v{POLICY_VERSION} (attention or "
            "mean over slots, padding masked out of the log-probability). Retrain it with this version."
        )
    if isinstance(file, io.BytesIO):
        file.seek(0)
    return ALGORITHMS[meta["algorithm"]][0].load(file, env=env, device="cpu")


def start_allocation(start: str, env: RankAllocationEnv, seed: int = 0) -> dict[str, int] | None:
    """The allocation a policy with `start` (`PolicyConfig.start`) begins its episodes on `env` from (None: the
    env's initial rank)."""
    rules = {"greedy": baselines.greedy, "greedy_gain": baselines.greedy_gain}
    return rules[start](env, seed=seed).allocation if start in rules else None


def run_policy_episode(model: BaseAlgorithm, env: RankAllocationEnv, seed: int, deterministic: bool = True) -> dict:
    """One episode of an SB3 policy (masked for MaskablePPO), started where the policy starts: its loss,
    allocation, actions and decisions."""
    start = start_allocation(getattr(model.policy, "start", "empty"), env, seed)
    observation, info = env.reset(seed=seed, options=None if start is None else {"allocation": start})
    actions, decisions, total_reward, done = [], [], 0.0, False
    while not done:
        kwargs = {"action_masks": env.action_masks()} if isinstance(model, MaskablePPO) else {}
        action, _ = model.predict(observation, deterministic=deterministic, **kwargs)
        observation, reward, terminated, truncated, info = env.step(action)
        actions.append([int(a) for a in action])
        total_reward += reward
        done = terminated or truncated
        decisions.append(
            {
                "decision": len(actions),
                "optimizer_steps": info["optimizer_steps"],
                "loss": info["loss"],
                "params": info["params"],
                "reward": reward,
            }
        )
    return {
        "loss": info["loss"],
        "allocation": info["allocation"],
        "params": info["params"],
        "return": total_reward,
        "actions": actions,
        "decisions": decisions,
    }
