"""Scoring allocations the same way for every method: losses, the uniform reference and the gap closed."""

from __future__ import annotations

import numpy as np
from sb3_contrib import MaskablePPO

from strato_env.costs import uniform_rank_for_budget
from strato_env.env import RankAllocationEnv

_UNIFORM_CACHE: dict[tuple[str, int, int], float] = {}


def uniform_allocation(env: RankAllocationEnv) -> dict[str, int]:
    """Uniform LoRA at the budget: the largest integer rank that every module can get."""
    rank = uniform_rank_for_budget(env.modules, env.budget - env.lora.extra_params)
    return {m.name: rank for m in env.modules}


def uniform_loss(env: RankAllocationEnv, seed: int = 0) -> float:
    """Final loss of uniform LoRA at the env's budget, trained for one episode (cached per protocol)."""
    key = (env._protocol_key(), env.budget, seed)
    if key not in _UNIFORM_CACHE:
        _UNIFORM_CACHE[key] = env.evaluate_allocation(uniform_allocation(env), seed=seed)
    return _UNIFORM_CACHE[key]


def gap_closed(loss: float, uniform: float, oracle: float | None) -> float:
    """(L_uniform - L_method) / (L_uniform - L_oracle): 0 for uniform LoRA, 1 for the oracle."""
    if oracle is None or not np.isfinite(loss) or uniform == oracle:
        return float("nan")
    return (uniform - loss) / (uniform - oracle)


def run_policy_episode(model, env: RankAllocationEnv, seed: int, deterministic: bool = True) -> dict:
    """One episode of an SB3 policy (masked for MaskablePPO): its loss, allocation, actions and decisions."""
    observation, info = env.reset(seed=seed)
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
