"""Meta-training a policy on a set of instances: a warm start cloned from a greedy teacher, reinforcement
learning on the batched engine, and the policy kept at its best score on held-out validation instances."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from torch.nn import functional as F

from agents import baselines
from agents.go_explore import GoExplore, GoExploreConfig
from agents.ppo.train import PolicyConfig, build_algorithm, load_policy, policy_bytes, start_allocation
from agents.ppo.vec_env import BatchedVecEnv
from strato_env.config import EnvConfig
from strato_env.env import GROW, KEEP, SHRINK, RankAllocationEnv
from strato_env.observation import DECISION_SHARE, DECISIONS_LEFT, PRESENT, RANK, module_table
from strato_env.validation import check_int

WARM_START_BATCH = 64
"""Minibatch size of the warm start's supervised updates."""
WARM_START_LEARNING_RATE = 3e-3
"""Initial Adam learning rate of the warm start, decayed linearly to 0 over its epochs so that the fit settles
(its own optimizer: the learner's is left as it was)."""
VALIDATION_SEED = 0
"""Seed of the validation episodes, the same at every evaluation so that scores compare."""


@dataclass
class MetaTraining:
    """A meta-trained policy and what it cost."""

    model: BaseAlgorithm
    """The policy with the best validation score (the last one when there are no validation instances)."""
    optimizer_steps: int
    """Every optimizer step spent: warm start episodes, learning episodes, validation episodes and the instances'
    importance probes."""
    validation: list[dict[str, Any]] = field(default_factory=list)
    """One row per evaluation: `timesteps` (of reinforcement learning, 0 after the warm start) and `return` (mean
    over validation instances of the return of the policy's deterministic episode, `validation_return`)."""
    warm_start: dict[str, Any] | None = None
    """The warm start's `teacher`, the `decisions` cloned, its final `loss` and `agreement` (share of real module
    slots where the policy's most likely move is the teacher's), the `search_optimizer_steps` of a Go-Explore
    teacher's searches (0 for the others), its DAgger `rounds` and, per round, the
    `agreement_on_own_states` before that round's cloning (on the states the policy's own episodes visited);
    None without a warm start."""


def greedy_targets(configs: Sequence[EnvConfig]) -> list[np.ndarray]:
    """Greedy-by-importance's allocation of each instance as one rank per module slot (0 on padding slots)."""
    targets = []
    for config in configs:
        env = RankAllocationEnv(config)
        allocation = baselines.greedy(env, seed=0).allocation
        ranks = np.zeros(config.max_modules)
        ranks[: len(env.modules)] = [allocation[m.name] for m in env.modules]
        targets.append(ranks)
    return targets


def teacher_actions(modules: np.ndarray, targets: np.ndarray, r_max: int | np.ndarray) -> np.ndarray:
    """The greedy teacher's moves on a batch of flat `modules` observations: grow a slot below its target rank,
    shrink one above it, keep the rest (padding slots have target 0 and rank 0, so they keep)."""
    ranks = np.rint(module_table(modules)[..., RANK] * r_max)
    return np.where(ranks < targets, GROW, np.where(ranks > targets, SHRINK, KEEP)).astype(np.int64)


Teacher = Callable[[dict[str, np.ndarray]], np.ndarray]
"""A batch of observations (one per sub-episode) -> the teacher's actions."""


def search_trajectories(configs: Sequence[EnvConfig], steps: int, seed: int) -> tuple[list[list[list[int]]], int]:
    """The moves of the best episode a Go-Explore search (`moves='prior'`, eight explorations at once, `steps`
    optimizer steps) finds on each instance, and the optimizer steps the searches ran."""
    search = GoExplore(GoExploreConfig(max_optimizer_steps=steps, moves="prior", parallel=8))
    results = [search.run(RankAllocationEnv(config), seed=seed) for config in configs]
    return [r.trajectory for r in results], sum(r.optimizer_steps for r in results)


def replay(trajectories: Sequence[Sequence[Sequence[int]]]) -> Teacher:
    """A teacher that plays, in sub-episode i, the moves of `trajectories[i]` in order (the decision is read from
    the observation), and keeps every module once a trajectory has run out."""

    def act(observation: dict[str, np.ndarray]) -> np.ndarray:
        global_ = observation["global"]
        decisions = np.rint((1 - global_[:, DECISIONS_LEFT]) / global_[:, DECISION_SHARE]).astype(int)
        slots = module_table(observation["modules"]).shape[1]
        return np.stack([
            np.asarray(moves[t]) if t < len(moves) else np.full(slots, KEEP)
            for moves, t in zip(trajectories, decisions, strict=True)
        ]).astype(np.int64)  # fmt: skip

    return act


def teacher(
    settings: PolicyConfig, vec_env: BatchedVecEnv, configs: Sequence[EnvConfig], seed: int
) -> tuple[Teacher, int]:
    """The warm start's teacher `settings.warm_start` on `vec_env` (sub-episode i plays `configs[i %
    len(configs)]`) and the optimizer steps spent building it: 'greedy' grows each slot toward greedy's
    allocation; 'greedy_iterative' moves as `baselines.iterative_greedy_action`; 'go_explore' replays the best
    episode that Go-Explore, from `seed`, found on the sub-episode's instance."""
    name = settings.warm_start
    played = [configs[i % len(configs)] for i in range(vec_env.num_envs)]
    if name == "go_explore":
        found, steps = search_trajectories(configs, settings.warm_start_search_steps, seed)
        return replay([found[i % len(configs)] for i in range(vec_env.num_envs)]), steps
    if name == "greedy":
        per_config = greedy_targets(configs)
        targets = np.stack([per_config[i % len(configs)] for i in range(vec_env.num_envs)])
        r_max = np.array([[max(config.rank_ladder)] for config in played])  # each sub-episode's own ladder
        return lambda observation: teacher_actions(observation["modules"], targets, r_max), 0

    def iterative(observation: dict[str, np.ndarray]) -> np.ndarray:
        return baselines.iterative_greedy_action(module_table(observation["modules"]), observation["global"])

    return iterative, 0


def teacher_decisions(
    vec_env: BatchedVecEnv, act: Teacher, episodes: int, gamma: float, seed: int, label: Teacher | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(observations, teacher actions, discounted returns) of `episodes` whole episodes per sub-episode of
    `vec_env` played by `act`; with `label`, the actions recorded are label's on the states `act` visits."""
    vec_env.seed(seed)
    observation = vec_env.reset()
    pending: list[list[tuple[dict[str, np.ndarray], np.ndarray, float]]] = [[] for _ in range(vec_env.num_envs)]
    done_episodes = np.zeros(vec_env.num_envs, dtype=int)
    kept: list[tuple[dict[str, np.ndarray], np.ndarray, float]] = []
    while (done_episodes < episodes).any():
        actions = act(observation)
        labels = actions if label is None else label(observation)
        next_observation, rewards, dones, _ = vec_env.step(actions)
        for i in range(vec_env.num_envs):
            pending[i].append(({k: v[i] for k, v in observation.items()}, labels[i], float(rewards[i])))
            if dones[i]:
                if done_episodes[i] < episodes:
                    future = 0.0
                    for obs_i, action_i, reward_i in reversed(pending[i]):
                        future = reward_i + gamma * future
                        kept.append((obs_i, action_i, future))
                done_episodes[i] += 1
                pending[i] = []
        observation = next_observation
    observations = {key: np.stack([o[key] for o, _, _ in kept]) for key in kept[0][0]}
    return observations, np.stack([a for _, a, _ in kept]), np.array([r for _, _, r in kept], np.float32)


def policy_actions(model: BaseAlgorithm, vec_env: BatchedVecEnv) -> Teacher:
    """The policy's deterministic moves on `vec_env` (masked for MaskablePPO)."""

    def act(observation: dict[str, np.ndarray]) -> np.ndarray:
        masks = {"action_masks": np.stack(vec_env.env_method("action_masks"))} if isinstance(model, MaskablePPO) else {}
        return model.predict(observation, deterministic=True, **masks)[0]

    return act


def _agreement(model: BaseAlgorithm, data: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]) -> float:
    """Share of real module slots of `data`'s decisions where the policy's most likely move is the recorded one."""
    observations = {key: torch.as_tensor(value) for key, value in data[0].items()}
    actions, policy = torch.as_tensor(data[1]), model.policy
    with torch.no_grad():
        logits = policy.action_net(policy.mlp_extractor.forward_actor(policy.extract_features(observations)))
    predicted = logits.reshape(*actions.shape, -1).argmax(-1)
    present = module_table(observations["modules"])[..., PRESENT] > 0.5
    return float((predicted == actions)[present].float().mean())


def _clone(model: BaseAlgorithm, data: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray], epochs: int,
           generator: torch.Generator) -> float:  # fmt: skip
    """`epochs` passes of supervised updates (the moves' log-probability and the critic's fit to the returns)
    with a fresh Adam whose learning rate decays linearly to 0; returns the last minibatch's loss."""
    policy = model.policy
    observations = {key: torch.as_tensor(value) for key, value in data[0].items()}
    actions, returns = torch.as_tensor(data[1]), torch.as_tensor(data[2])
    optimizer = torch.optim.Adam(policy.parameters(), lr=WARM_START_LEARNING_RATE)
    policy.set_training_mode(True)
    loss = torch.tensor(math.nan)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = WARM_START_LEARNING_RATE * (1 - epoch / epochs)
        for batch in torch.randperm(len(actions), generator=generator).split(WARM_START_BATCH):
            values, log_prob, _ = policy.evaluate_actions({k: v[batch] for k, v in observations.items()},
                                                          actions[batch])  # fmt: skip
            loss = -log_prob.mean() + F.mse_loss(values.flatten(), returns[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimizer.step()
    policy.set_training_mode(False)
    return loss.item()


def warm_start(
    model: BaseAlgorithm, vec_env: BatchedVecEnv, configs: Sequence[EnvConfig], settings: PolicyConfig, seed: int
) -> dict[str, Any]:
    """Behaviour cloning of the `settings.warm_start` teacher: maximise the policy's log-probability of the
    teacher's moves on its episodes and fit the critic to their returns; then `settings.warm_start_rounds`
    rounds of DAgger (the policy plays, the teacher labels, the policy is cloned again on all decisions so far).
    Returns the `MetaTraining.warm_start` record."""
    teach, search_steps = teacher(settings, vec_env, configs, seed)
    episodes, gamma = settings.warm_start_episodes, settings.gamma
    data = teacher_decisions(vec_env, teach, episodes, gamma, seed)
    generator = torch.Generator().manual_seed(seed)
    loss = _clone(model, data, settings.warm_start_epochs, generator)
    first, own_agreement = len(data[1]), []
    for round_ in range(1, settings.warm_start_rounds + 1):
        visited = teacher_decisions(vec_env, policy_actions(model, vec_env), episodes, gamma, seed + round_, teach)
        own_agreement.append(_agreement(model, visited))
        data = (
            {key: np.concatenate([data[0][key], visited[0][key]]) for key in data[0]},
            np.concatenate([data[1], visited[1]]),
            np.concatenate([data[2], visited[2]]),
        )
        # as many updates as the first cloning: fewer passes over more decisions
        loss = _clone(model, data, max(1, round(settings.warm_start_epochs * first / len(data[1]))), generator)
    return {
        "teacher": settings.warm_start,
        "decisions": len(data[1]),
        "loss": loss,
        "agreement": _agreement(model, data),
        "rounds": settings.warm_start_rounds,
        "agreement_on_own_states": own_agreement,
        "search_optimizer_steps": search_steps,
    }


def validation_return(model: BaseAlgorithm, vec_env: BatchedVecEnv) -> float:
    """Mean over `vec_env`'s sub-episodes of the return of one deterministic episode of the policy: the env's
    objective, (L_0 - L_T) / L_0 less the parameter cost (and any divergence penalty)."""
    vec_env.seed(VALIDATION_SEED)
    observation = vec_env.reset()
    returns = np.zeros(vec_env.num_envs)
    finished = np.zeros(vec_env.num_envs, dtype=bool)
    act = policy_actions(model, vec_env)
    while not finished.all():
        observation, rewards, dones, _ = vec_env.step(act(observation))
        returns += np.where(finished, 0.0, rewards)
        finished |= dones
    return float(returns.mean())


class ValidationCheckpoints(BaseCallback):
    """Scores the policy on the validation instances after every `every` updates (and at the end, by `evaluate`)
    and keeps the best one's bytes."""

    def __init__(self, vec_env: BatchedVecEnv | None, every: int) -> None:
        super().__init__()
        self.vec_env, self.every = vec_env, every
        self.rows: list[dict[str, Any]] = []
        self.best: bytes | None = None
        self.rollouts = 0

    def evaluate(self, model: BaseAlgorithm, timesteps: int) -> None:
        if self.vec_env is None or (self.rows and self.rows[-1]["timesteps"] == timesteps):
            return
        score = validation_return(model, self.vec_env)
        if not self.rows or score > max(row["return"] for row in self.rows):
            self.best = policy_bytes(model)
        self.rows.append({"timesteps": timesteps, "return": score})

    def _on_rollout_start(self) -> None:
        # every rollout but the first follows an update: score the policy that update left
        if self.rollouts and self.rollouts % self.every == 0:
            self.evaluate(self.model, self.num_timesteps)
        self.rollouts += 1

    def _on_step(self) -> bool:
        return True


def meta_train(
    algorithm: str,
    settings: PolicyConfig,
    train: Sequence[EnvConfig],
    validation: Sequence[EnvConfig],
    seed: int,
    callbacks: Sequence[BaseCallback] = (),
    tensorboard_log: str | None = None,
    progress_bar: bool = False,
) -> MetaTraining:
    """Meta-train `algorithm` on the `train` instances (sub-episode i of `settings.n_envs` plays train instance
    i modulo their number): the warm start, then `settings.total_timesteps` decisions of reinforcement learning,
    scored on the `validation` instances after the warm start, every `settings.eval_every` rollouts and at the
    end. The best-scoring policy is returned."""
    if settings.warm_start == "go_explore":  # a search must pay for one whole episode on every instance
        episode = max(config.decisions * config.inner_steps for config in train)
        check_int("warm_start_search_steps", settings.warm_start_search_steps, episode)

    def starts(configs: Sequence[EnvConfig]) -> list[dict[str, int] | None]:
        return [start_allocation(settings.start, RankAllocationEnv(config)) for config in configs]

    vec_env = BatchedVecEnv(train, settings.n_envs, starts(train))
    validation_env = BatchedVecEnv(validation, len(validation), starts(validation)) if validation else None
    model = build_algorithm(algorithm, settings, vec_env, seed, tensorboard_log=tensorboard_log)
    record = warm_start(model, vec_env, train, settings, seed) if settings.warm_start != "none" else None
    checkpoints = ValidationCheckpoints(validation_env, settings.eval_every)
    checkpoints.evaluate(model, 0)
    model.learn(
        settings.total_timesteps, callback=[*callbacks, checkpoints], progress_bar=progress_bar, tb_log_name=algorithm
    )
    checkpoints.evaluate(model, model.num_timesteps)
    best = model
    if checkpoints.rows and checkpoints.rows[-1]["return"] < max(row["return"] for row in checkpoints.rows):
        best = load_policy(checkpoints.best, env=vec_env)
    steps = vec_env.total_optimizer_steps + vec_env.probe_optimizer_steps
    if record is not None:
        steps += record["search_optimizer_steps"]
    if validation_env is not None:
        steps += validation_env.total_optimizer_steps + validation_env.probe_optimizer_steps
    return MetaTraining(best, steps, checkpoints.rows, record)
