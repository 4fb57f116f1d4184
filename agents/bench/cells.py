"""The cells of a benchmark grid and what one cell (or one policy training) does.

Protocol, the same for every method:

- Budget: each cell's env has the instance's parameter budget (times the cell's budget scale).
- Search cost: the optimizer steps the method ran to find its allocation, at most `search_steps`. For methods
  that train inside the env this is measured by the env (`total_optimizer_steps`; returning to a state costs
  none); a method that trains its own model (AdaLoRA) reports its steps. Methods that read the env's
  importance feature are charged the instance's importance probe as well. A learned policy is trained on the
  train instances and applied once to the held-out instance: its cost is both together.
- Final quality: the allocation trained statically for one episode from the cell's seed (the same optimizer
  steps for every method), so a method is judged by what it found, not by how its own search went. The
  allocations of one instance, scale and seed are trained together on the batched engine.
- References: uniform LoRA on every instance, the planted oracle on planted instances; gap closed =
  (L_uniform - L) / (L_uniform - L_oracle) at the same instance, seed and budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agents.bench.config import BenchConfig
from agents.evaluation import run_policy_episode
from agents.methods import METHODS
from agents.ppo.train import build_algorithm, load_policy, policy_bytes
from agents.ppo.vec_env import BatchedVecEnv
from strato_env.config import from_dict
from strato_env.env import RankAllocationEnv


@dataclass(frozen=True)
class Cell:
    method: str
    instance: int
    """Index into `test_instances`."""
    seed: int
    scale: float

    @property
    def key(self) -> str:
        return f"{self.method}-i{self.instance}-s{self.seed}-x{self.scale:g}"

    @property
    def policy_key(self) -> str:
        return f"{self.method}-s{self.seed}"


def grid(config: BenchConfig) -> list[Cell]:
    """Every cell: each method (and reference) x held-out instance x seed x budget scale."""
    cells = []
    for index, instance in enumerate(config.test_instances):
        methods = config.compared(planted=config.env_config(instance).task.name == "planted")
        cells += [Cell(m.name, index, s, float(x)) for m in methods for s in config.seeds for x in config.budget_scales]
    return cells


def probe_steps(config: BenchConfig, instance: dict[str, Any]) -> int:
    """Optimizer steps of the instance's importance probe (see RankAllocationEnv.probe_optimizer_steps)."""
    from strato_env.instance import get_instance

    env_config = config.env_config(instance)
    return env_config.probe_steps * len(get_instance(env_config).modules)


def policy_timesteps(config: BenchConfig, n_steps: int) -> int:
    """Env steps of policy training: whole rollouts (`n_steps` on each train instance's sub-episode) within
    `search_steps`, less the importance probes of the train instances and of the costliest held-out instance,
    and less the held-out episode."""
    inner_steps = config.env_config({}).inner_steps
    probes = sum(probe_steps(config, i) for i in config.train_instances)
    probes += max(probe_steps(config, i) for i in config.test_instances)
    decisions = (config.search_steps - config.episode_steps - probes) // inner_steps
    rollout = n_steps * len(config.train_instances)
    timesteps = decisions // rollout * rollout
    if timesteps < 1:
        raise ValueError(
            f"search_steps={config.search_steps} leaves {decisions} training decisions after the importance probes "
            f"({probes} steps) and the held-out episode, fewer than one rollout (n_steps={n_steps} on each of "
            f"{len(config.train_instances)} train instances); allowed: raise search_steps or lower n_steps"
        )
    return timesteps


def train_policy(config: BenchConfig, method: str, seed: int) -> dict[str, Any]:
    """Train learned method `method` on the train instances within the step cap; the policy's bytes and cost."""
    options = config.method_options(method)
    timesteps = policy_timesteps(config, options.n_steps)
    # one sub-episode per train instance, trained together by the batched engine
    n_envs = len(config.train_instances)
    settings = from_dict(type(options), vars(options) | {"total_timesteps": timesteps, "n_envs": n_envs})
    envs = [config.make_env(instance) for instance in config.train_instances]
    vec_env = BatchedVecEnv([env.config for env in envs], n_envs)
    model = build_algorithm(method, settings, vec_env, seed)
    model.learn(timesteps)
    steps = vec_env.total_optimizer_steps + sum(env.probe_optimizer_steps for env in envs)
    return {"optimizer_steps": steps, "policy": policy_bytes(model)}


def _search(
    config: BenchConfig, cell: Cell, env: RankAllocationEnv, policy: dict[str, Any] | None
) -> tuple[dict[str, int], int, list[tuple[int, float]]]:
    """(allocation, optimizer steps spent, best-so-far history) of `cell.method` on `env`."""
    method = METHODS[cell.method]
    options = config.method_options(cell.method)
    before, probe = env.total_optimizer_steps, env.probe_optimizer_steps
    if method.learned:
        episode = run_policy_episode(load_policy(policy["policy"]), env, seed=cell.seed)
        steps = policy["optimizer_steps"] + probe + env.total_optimizer_steps - before
        return episode["allocation"], steps, [(steps, episode["loss"])]
    if method.reference:
        return method.search(env, cell.seed, None, options).allocation, 0, []
    probe = probe if method.reads_importance(options) else 0
    cap = config.search_steps - probe
    if cap < 0:
        raise ValueError(
            f"search_steps={config.search_steps} leaves {cap} optimizer steps to {cell.method} after the importance "
            f"probe ({probe} steps); allowed: raise search_steps"
        )
    result = method.search(env, cell.seed, cap, options)
    steps = result.optimizer_steps if method.own_model else env.total_optimizer_steps - before
    return result.allocation, steps + probe, [(s + probe, loss) for s, loss in result.history]


def run_cells(config: BenchConfig, cells: list[Cell], policies: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Search (or act) for each cell of one held-out instance, budget scale and seed, then train every
    allocation found for one episode from its cell's seed, all together on the batched engine. One result per
    cell, in order; a cell's error comes back recorded and the others go on."""
    results: list[dict[str, Any]] = []
    found: dict[int, dict[str, int]] = {}  # result index -> allocation found
    retrain: RankAllocationEnv | None = None  # the first cell's env trains every allocation
    for cell in cells:
        start = time.perf_counter()
        policy = policies.get(cell.policy_key)
        try:
            env = config.make_env(config.test_instances[cell.instance], cell.scale)
            allocation, steps, history = _search(config, cell, env, policy)
        except Exception as error:  # recorded; the other cells go on
            results.append(_error(error, start))
            continue
        wall = time.perf_counter() - start + (policy["wall_s"] if policy else 0.0)
        found[len(results)] = allocation
        retrain = retrain or env
        results.append({
            "status": "ok",
            "params": env.params_of(allocation),
            "budget": env.budget,
            "optimizer_steps": steps,
            "wall_s": wall,
            "allocation": {name: int(rank) for name, rank in allocation.items()},
            "history": [[int(s), float(loss)] for s, loss in history],
        })  # fmt: skip
    if retrain is None:
        return results
    start = time.perf_counter()
    before = retrain.total_optimizer_steps
    try:
        losses = retrain.evaluate_allocations(list(found.values()), [cells[i].seed for i in found])
    except Exception as error:  # the final retrain failed: every cell that reached it is recorded failed
        for i in found:
            results[i] = _error(error, start)
        return results
    share = (time.perf_counter() - start) / len(found)
    for i, loss in zip(found, losses, strict=True):
        result = results[i]
        result["final_loss"] = loss
        result["final_steps"] = (retrain.total_optimizer_steps - before) // len(found)
        result["wall_s"] += share
        if not result["history"]:  # a method without its own evaluations: its final quality is its only point
            result["history"] = [[result["optimizer_steps"], float(loss)]]
    return results


def _error(error: Exception, start: float) -> dict[str, Any]:
    return {"status": "error", "error": f"{type(error).__name__}: {error}", "wall_s": time.perf_counter() - start}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task (a policy training, or the cells of one instance, scale and seed) in any process; never
    raises: errors come back recorded."""
    if task.get("threads"):
        import torch

        torch.set_num_threads(task["threads"])
    start = time.perf_counter()
    try:
        config = from_dict(BenchConfig, task["config"])
        if task["kind"] == "policy":
            result = train_policy(config, task["method"], task["seed"])
        else:
            result = {"results": run_cells(config, [Cell(**c) for c in task["cells"]], task.get("policies", {}))}
    except Exception as error:  # recorded; the grid goes on
        return _error(error, start)
    return {"status": "ok", "wall_s": time.perf_counter() - start} | result
