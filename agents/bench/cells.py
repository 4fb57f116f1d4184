"""The cells of a benchmark grid and what one cell (or one policy's meta-training) does.

Protocol, the same for every method:

- Budget: each cell's env has the instance's parameter budget (times the cell's budget scale).
- Data: searches and policies see the instance's training pool and select on its validation set (the env's
  loss); the final number is the loss on the held-out test set, which nothing else reads.
- Seeds: a search runs from the cell's seed; the final-quality run starts from FINAL_SEED + the cell's seed,
  a seed no search uses.
- Search track: a search method (random, tpe, go_explore) runs once per cap of `search_steps`, charged the
  optimizer steps it ran (measured by the env: `total_optimizer_steps`; returning to a state costs none; a
  method that trains its own model, AdaLoRA, reports its steps) plus the instance's importance probe if it reads
  the importance feature. Its allocation is then trained statically for one episode, so a method is judged by
  what it found, not by how its own search went.
- Amortized track: a policy is meta-trained once per seed on the train instances, under its own budget
  (`options.<policy>.total_timesteps`), reported apart; on each test instance it costs the probe plus one
  episode, and its final loss is the test loss of the adapter that episode trained (the static retrain of its
  final allocation is kept too). Uniform LoRA, greedy (probe + one episode) and AdaLoRA (one run) are its
  one-shot comparisons.
- References: uniform LoRA on every instance, the planted oracle on planted instances at budget scale 1.
- All final retrains of one instance, scale and seed train together on the batched engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agents.bench.config import BenchConfig
from agents.methods import METHODS
from agents.ppo.meta import meta_train
from agents.ppo.train import load_policy, policy_bytes, run_policy_episode
from strato_env.config import from_dict
from strato_env.env import RankAllocationEnv

FINAL_SEED = 1_000_000
"""Final-quality runs start from FINAL_SEED + the cell's seed: apart from every seed a search or policy uses."""


@dataclass(frozen=True)
class Cell:
    method: str
    instance: int
    """Index into `test_instances`."""
    seed: int
    scale: float
    steps: int = 0
    """Search track: this cell's cap on the search's optimizer steps; 0 for methods without a cap."""

    @property
    def key(self) -> str:
        return f"{self.method}-i{self.instance}-s{self.seed}-x{self.scale:g}" + (
            f"-b{self.steps}" if self.steps else ""
        )

    @property
    def policy_key(self) -> str:
        return f"{self.method}-s{self.seed}"


def grid(config: BenchConfig) -> list[Cell]:
    """Every cell: each method (and reference) x test instance x seed x budget scale (x step cap for searches)."""
    cells = []
    for index, instance in enumerate(config.test_instances):
        for method in config.compared(planted=config.env_config(instance).task.name == "planted"):
            caps = config.search_steps if method.anytime else [0]
            scales = [1.0] if method.name == "oracle" else config.budget_scales  # the oracle fits scale 1 only
            cells += [Cell(method.name, index, s, float(x), c) for s in config.seeds for x in scales for c in caps]
    return cells


def train_policy(config: BenchConfig, method: str, seed: int) -> dict[str, Any]:
    """Meta-train learned method `method` on the train instances under its own budget (its `total_timesteps`),
    checkpointed on the validation instances; the policy's bytes and its cost in optimizer steps (probes, warm
    start and validation episodes included)."""
    options = config.method_options(method)
    # one sub-episode per train instance, trained together by the batched engine
    settings = from_dict(type(options), vars(options) | {"n_envs": len(config.train_instances)})
    train = [config.env_config(instance) for instance in config.train_instances]
    validation = [config.env_config(instance) for instance in config.validation_instances]
    meta = meta_train(method, settings, train, validation, seed)
    return {"optimizer_steps": meta.optimizer_steps, "policy": policy_bytes(meta.model), "validation": meta.validation}


def _search(
    config: BenchConfig, cell: Cell, env: RankAllocationEnv, policy: dict[str, Any] | None
) -> tuple[dict[str, int], int, list[tuple[int, float]], float | None]:
    """(allocation, optimizer steps spent on this instance, best-so-far history, test loss of the adapter the
    method's own episode trained, for policies) of `cell.method` on `env`."""
    method = METHODS[cell.method]
    options = config.method_options(cell.method)
    before, probe = env.total_optimizer_steps, env.probe_optimizer_steps
    if method.learned:
        episode = run_policy_episode(load_policy(policy["policy"]), env, seed=FINAL_SEED + cell.seed)
        steps = probe + env.total_optimizer_steps - before
        return episode["allocation"], steps, [(steps, episode["loss"])], env.evaluate_loss(split="test")
    if method.reference:
        return method.search(env, cell.seed, None, options).allocation, 0, [], None
    probe = probe if method.reads_importance(options) else 0
    cap = None
    if method.anytime:
        cap = cell.steps - probe
        if cap < 0:
            raise ValueError(
                f"search_steps cap {cell.steps} leaves {cap} optimizer steps to {cell.method} after the importance "
                f"probe ({probe} steps); allowed: raise search_steps"
            )
    result = method.search(env, cell.seed, cap, options)
    steps = result.optimizer_steps if method.own_model else env.total_optimizer_steps - before
    return result.allocation, steps + probe, [(s + probe, loss) for s, loss in result.history], None


def run_cells(config: BenchConfig, cells: list[Cell], policies: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Search (or act) for each cell of one test instance, budget scale and seed, then train every allocation
    found for one episode from FINAL_SEED + the seed, all together on the batched engine, and score each on the
    instance's test set. One result per cell, in order; a cell's error comes back recorded and the others go on."""
    results: list[dict[str, Any]] = []
    found: dict[int, dict[str, int]] = {}  # result index -> allocation found
    retrain: RankAllocationEnv | None = None  # the first cell's env trains every allocation
    for cell in cells:
        start = time.perf_counter()
        policy = policies.get(cell.policy_key)
        try:
            env = config.make_env(config.test_instances[cell.instance], cell.scale)
            allocation, steps, history, episode_loss = _search(config, cell, env, policy)
        except Exception as error:  # recorded; the other cells go on
            results.append(_error(error, start))
            continue
        found[len(results)] = allocation
        retrain = retrain or env
        result = {
            "status": "ok",
            "params": env.params_of(allocation),
            "budget": env.budget,
            "optimizer_steps": steps,
            "wall_s": time.perf_counter() - start,
            "allocation": {name: int(rank) for name, rank in allocation.items()},
            "history": [[int(s), float(loss)] for s, loss in history],
        }
        if policy is not None:
            result |= {"episode_loss": episode_loss, "meta_steps": policy["optimizer_steps"],
                       "meta_wall_s": policy["wall_s"]}  # fmt: skip
        results.append(result)
    if retrain is None:
        return results
    start = time.perf_counter()
    before = retrain.total_optimizer_steps
    try:
        seeds = [FINAL_SEED + cells[i].seed for i in found]
        losses = retrain.evaluate_allocations(list(found.values()), seeds, split="test")
    except Exception as error:  # the final retrain failed: every cell that reached it is recorded failed
        for i in found:
            results[i] = _error(error, start)
        return results
    share = (time.perf_counter() - start) / len(found)
    for i, loss in zip(found, losses, strict=True):
        result = results[i]
        result["static_loss"] = loss
        # the adapter the method delivers: a policy's own episode, else the static retrain of its allocation
        result["final_loss"] = result.get("episode_loss", loss)
        result["final_steps"] = (retrain.total_optimizer_steps - before) // len(found)
        result["wall_s"] += share
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
