"""The grid behind `strato bench`: methods x instances x seeds (x budget scales) at equal budget and equal cost.

Protocol, the same for every method:

- Budget: each cell's env has the instance's parameter budget (times the cell's budget scale).
- Search cost: the optimizer steps the method ran to find its allocation, at most `search_steps`. For methods
  that train inside the env this is measured by the env (`total_optimizer_steps`; returning to a state costs
  none); AdaLoRA, which trains its own peft model, reports its steps. A policy (PPO, A2C, MaskablePPO) is
  trained on the train instances and applied once to the held-out instance: its cost is both together.
- Final quality: the allocation trained statically for one episode from the cell's seed (the same optimizer
  steps for every method), so a method is judged by what it found, not by how its own search went.
- References: uniform LoRA on every instance, the planted oracle on planted instances; gap closed =
  (L_uniform - L) / (L_uniform - L_oracle) at the same instance, seed and budget.

Cells run in this process (`workers=1`), in a process pool, or on Ray (`backend="ray"`). Each finished cell is
written to `cells/` at once, so an interrupted benchmark resumes where it stopped; a cell that fails is
recorded with its error and the grid goes on.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from agents.config import InstanceSet, merge, read_config
from agents.runs import RunFolder, write_atomic
from strato_env.config import EnvConfig, from_dict

REFERENCES = ("uniform", "oracle")
POLICY_METHODS = ("ppo", "a2c", "maskable_ppo")
SEARCH_METHODS = ("random", "greedy", "tpe", "adalora", "go_explore")
METHODS = REFERENCES + SEARCH_METHODS + POLICY_METHODS
PROTOCOL_KEYS = ("decisions", "inner_steps")
"""EnvConfig keys an instance may not override: they fix the length of every final-quality run."""
BACKENDS = ("process", "ray")

QUICK = {
    "env": {"decisions": 2, "inner_steps": 5, "probe_steps": 1, "task": {"train_examples": 64, "eval_examples": 16}},
    "test_instances": [{"model": "llama-tiny"}, {"model": "bert-tiny"}],
    "seeds": [0],
    "search_steps": 100,
    "options": {
        "tpe": {"n_startup_trials": 2},
        "ppo": {"n_steps": 2, "batch_size": 2, "n_epochs": 2},
        "maskable_ppo": {"n_steps": 2, "batch_size": 2, "n_epochs": 2},
        "a2c": {"n_steps": 2},
    },
}
"""What `--quick` changes in the default grid: 2-decision episodes of 5 steps, one seed, two held-out instances."""


@dataclass
class BenchConfig(InstanceSet):
    """One benchmark grid. The defaults are `configs/bench_planted.yaml`."""

    name: str | None = None
    """Run folder name under `runs_dir` (default: the config file's name, plus '-quick'). Rerunning the same
    benchmark with the same name resumes it."""
    env: dict[str, Any] = field(
        default_factory=lambda: {"model": "gpt2-tiny", "task": {"name": "planted"}, "decisions": 8, "inner_steps": 20}
    )
    """EnvConfig fields shared by every instance."""
    train_instances: list[dict[str, Any]] = field(default_factory=lambda: [{"task": {"profile": "top-heavy"}}])
    """Instances the policies (PPO, A2C, MaskablePPO) train on, round robin; overrides on top of `env`."""
    test_instances: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"model": "llama-tiny", "task": {"profile": "top-heavy"}},
            {"model": "bert-tiny", "task": {"profile": "top-heavy"}},
            {"task": {"profile": "bottom-heavy"}},
            {"task": {"profile": "mlp-only"}},
        ]
    )
    """Held-out instances: every method runs on each of them (policies only act, without training)."""
    methods: list[str] = field(default_factory=lambda: list(SEARCH_METHODS + POLICY_METHODS))
    """Methods compared; the references (uniform LoRA, and the oracle on planted instances) always run."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Seeds of every method and of its final-quality run."""
    search_steps: int = 800
    """Cap on the optimizer steps each method may spend to find its allocation (5 default episodes)."""
    budget_scales: list[float] = field(default_factory=lambda: [1.0])
    """Each instance's budget is multiplied by each scale (1.0 must be present: references are taken there)."""
    options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "ppo": {"n_steps": 8, "batch_size": 8},
            "maskable_ppo": {"n_steps": 8, "batch_size": 8},
            "a2c": {"n_steps": 8},
        }
    )
    """Per-method options: baseline keywords (agents.baselines), GoExploreConfig or PPOConfig fields."""
    runs_dir: str = "runs"
    """Folder under which the benchmark's run folder is created."""
    quick: dict[str, Any] = field(default_factory=lambda: dict(QUICK))
    """Overrides that `--quick` applies to this config (a grid that finishes in minutes)."""

    def __post_init__(self) -> None:
        self._check_lists()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: {unknown[0]!r} is not a method; allowed: {list(METHODS)}")
        for method, values in self.options.items():
            if method not in METHODS:
                raise ValueError(f"options.{method}: not a method; allowed: {list(METHODS)}")
            if not isinstance(values, dict):
                raise ValueError(f"options.{method}={values!r} is invalid: expected a mapping of options")
        episode = self.episode_steps
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) or self.search_steps < episode:
            raise ValueError(
                f"search_steps={self.search_steps!r} is invalid: expected an integer >= one episode "
                f"({episode} optimizer steps: decisions x inner_steps)"
            )
        if self.policies and not self.train_instances:
            raise ValueError(f"train_instances=[] is invalid: the policies {self.policies} need one to train on")
        for where, instance in self.labelled_instances():
            for key in PROTOCOL_KEYS:
                if key in instance:
                    raise ValueError(f"{where}.{key}: set it in env, not per instance (it fixes the run length)")
            self.env_config(instance, where)
        if self.quick:
            values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quick"}
            try:
                from_dict(BenchConfig, merge(values, self.quick) | {"quick": {}})
            except ValueError as error:
                raise ValueError(f"quick: {error}") from None

    def _check_lists(self) -> None:
        if not isinstance(self.env, dict):
            raise ValueError(f"env={self.env!r} is invalid: expected a mapping of EnvConfig fields")
        for key in ("train_instances", "test_instances"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
                raise ValueError(f"{key}={value!r} is invalid: expected a list of mappings of EnvConfig fields")
        if not self.test_instances:
            raise ValueError("test_instances=[] is invalid: at least one instance is needed")
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError(f"methods={self.methods!r} is invalid: expected a non-empty list of {list(METHODS)}")
        seeds = self.seeds
        if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
            raise ValueError(f"seeds={seeds!r} is invalid: expected a non-empty list of integers")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds={seeds!r} is invalid: a seed is repeated")
        scales = self.budget_scales
        numbers = isinstance(scales, list) and all(type(s) in (int, float) and s > 0 for s in scales)
        if not numbers or 1.0 not in scales:
            raise ValueError(f"budget_scales={scales!r} is invalid: expected a list of numbers > 0 that holds 1.0")
        if not isinstance(self.options, dict) or not isinstance(self.quick, dict):
            raise ValueError("options and quick must be mappings")

    # ---- derived --------------------------------------------------------------------------------------------
    @property
    def episode_steps(self) -> int:
        config = self.env_config({})
        return config.decisions * config.inner_steps

    @property
    def policies(self) -> list[str]:
        return [m for m in self.methods if m in POLICY_METHODS]

    def make_env(self, instance: dict[str, Any], scale: float = 1.0):
        """The instance's env; with `scale != 1` its budget (given or default) is multiplied by `scale`."""
        from strato_env.env import RankAllocationEnv

        env = RankAllocationEnv(self.env_config(instance))
        if scale != 1.0:
            scaled = merge(self.env, instance) | {"budget": int(env.budget * scale)}
            env = RankAllocationEnv(from_dict(EnvConfig, scaled))
        return env

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_bench_config(path: str | None = None, overrides: list[str] | None = None, quick: bool = False) -> BenchConfig:
    """A BenchConfig from YAML plus `key=value` overrides; `quick` applies the config's `quick` section."""
    config = from_dict(BenchConfig, read_config(path, overrides, "BenchConfig"))
    name, values = config.name or (Path(path).stem if path else "bench"), config.to_dict()
    if quick:
        values = merge(values, config.quick) | {"quick": {}}
        name = f"{name}-quick" if config.name is None else name
    return from_dict(BenchConfig, values | {"name": name})


# ---- the cells ------------------------------------------------------------------------------------------------
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
        planted = config.env_config(instance).task.name == "planted"
        methods = ["uniform", *(["oracle"] if planted else []), *(m for m in config.methods if m not in REFERENCES)]
        cells += [Cell(m, index, s, float(x)) for m in methods for s in config.seeds for x in config.budget_scales]
    return cells


def _probe_steps(config: BenchConfig, instance: dict[str, Any]) -> int:
    """Optimizer steps of the instance's importance probe (see RankAllocationEnv.probe_optimizer_steps)."""
    from strato_env.instance import get_instance

    env_config = config.env_config(instance)
    return env_config.probe_steps * len(get_instance(env_config).modules)


def _policy_timesteps(config: BenchConfig, options: dict[str, Any]) -> int:
    """Env steps of policy training: whole rollouts within `search_steps`, less the importance probes of the
    train instances and of the costliest held-out instance, and less the held-out episode."""
    inner_steps = config.env_config({}).inner_steps
    n_steps = options.get("n_steps", 16)
    probes = sum(_probe_steps(config, i) for i in config.train_instances)
    probes += max(_probe_steps(config, i) for i in config.test_instances)
    decisions = (config.search_steps - config.episode_steps - probes) // inner_steps
    timesteps = decisions // n_steps * n_steps if isinstance(n_steps, int) and n_steps > 0 else 0
    if timesteps < 1:
        raise ValueError(
            f"search_steps={config.search_steps} leaves {decisions} training decisions after the importance probes "
            f"({probes} steps) and the held-out episode, fewer than one rollout (n_steps={n_steps!r}); "
            "allowed: raise search_steps or lower n_steps"
        )
    return timesteps


def _train_policy(config: BenchConfig, method: str, seed: int) -> dict[str, Any]:
    from agents.ppo.train import PPOConfig, build_algorithm, round_robin, save_policy

    options = dict(config.options.get(method, {}))
    for key in ("algorithm", "total_timesteps", "n_envs"):
        if key in options:
            raise ValueError(f"options.{method}.{key}: set by the benchmark, not allowed as an option")
    timesteps = _policy_timesteps(config, options)
    # in process, where the envs count the optimizer steps; the grid itself runs cells in parallel
    settings = options | {"algorithm": method, "total_timesteps": timesteps, "n_envs": 1}
    ppo = from_dict(PPOConfig, settings, where=f"options.{method}.")
    envs = [config.make_env(instance) for instance in config.train_instances]
    before = sum(env.total_optimizer_steps for env in envs)
    model = build_algorithm(ppo, round_robin(envs), seed)
    model.learn(timesteps)
    with tempfile.TemporaryDirectory() as folder:
        save_policy(model, f"{folder}/policy.zip")
        policy = Path(f"{folder}/policy.zip").read_bytes()
    steps = sum(env.total_optimizer_steps - before + env.probe_optimizer_steps for env in envs)
    return {"optimizer_steps": steps, "policy": policy}


def _search(config: BenchConfig, cell: Cell, env, policy: dict[str, Any] | None) -> tuple[dict, int, list]:
    """(allocation, optimizer steps spent, best-so-far history) of `cell.method` on `env`.

    Methods that read the env's importance feature (greedy, policies, importance-guided Go-Explore) are
    charged the instance's probe as well.
    """
    from agents.baselines import BASELINES
    from agents.evaluation import run_policy_episode
    from agents.go_explore import GoExplore, GoExploreConfig
    from agents.ppo.train import load_policy

    options = dict(config.options.get(cell.method, {}))
    before, probe = env.total_optimizer_steps, env.probe_optimizer_steps
    if cell.method in POLICY_METHODS:
        with tempfile.TemporaryDirectory() as folder:
            write_atomic(Path(folder) / "policy.zip", policy["policy"])
            agent = load_policy(f"{folder}/policy.zip")
        episode = run_policy_episode(agent, env, seed=cell.seed)
        steps = policy["optimizer_steps"] + probe + env.total_optimizer_steps - before
        return episode["allocation"], steps, [(steps, episode["loss"])]
    if cell.method == "oracle":
        return dict(env.data.oracle_ranks), 0, []
    guided = cell.method == "go_explore" and options.get("importance_guided", GoExploreConfig.importance_guided)
    probe = probe if cell.method == "greedy" or guided else 0
    cap = config.search_steps - probe
    if cap < (env.config.inner_steps if cell.method == "go_explore" else 0):
        raise ValueError(
            f"search_steps={config.search_steps} leaves {cap} optimizer steps to {cell.method} after the importance "
            f"probe ({probe} steps); allowed: raise search_steps"
        )
    if cell.method == "go_explore":
        if "max_optimizer_steps" in options:
            raise ValueError("options.go_explore.max_optimizer_steps: set by search_steps, not allowed as an option")
        settings = from_dict(GoExploreConfig, options | {"max_optimizer_steps": cap}, "options.go_explore.")
        result = GoExplore(settings).run(env, seed=cell.seed)
    else:
        result = BASELINES[cell.method](env, seed=cell.seed, max_optimizer_steps=cap, **options)
    measured = env.total_optimizer_steps - before
    steps = result.optimizer_steps if cell.method == "adalora" else measured + probe  # AdaLoRA trains its own model
    return result.allocation, steps, [(s + probe, loss) for s, loss in result.history]


def _run_cell(config: BenchConfig, cell: Cell, policy: dict[str, Any] | None) -> dict[str, Any]:
    start = time.perf_counter()
    env = config.make_env(config.test_instances[cell.instance], cell.scale)
    allocation, steps, history = _search(config, cell, env, policy)
    wall = time.perf_counter() - start + (policy["wall_s"] if policy else 0.0)
    before = env.total_optimizer_steps
    final_loss = env.evaluate_allocation(allocation, seed=cell.seed)
    if not history:  # a method without its own evaluations: its final quality is its only point
        history = [(steps, final_loss)]
    return {
        "final_loss": final_loss,
        "params": env.params_of(allocation),
        "budget": env.budget,
        "optimizer_steps": steps,
        "final_steps": env.total_optimizer_steps - before,
        "wall_s": wall,
        "allocation": {name: int(rank) for name, rank in allocation.items()},
        "history": [[int(s), float(loss)] for s, loss in history],
    }


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task (a policy training or a cell) in any process; never raises: errors come back recorded."""
    if task.get("threads"):
        import torch

        torch.set_num_threads(task["threads"])
    start = time.perf_counter()
    try:
        config = from_dict(BenchConfig, task["config"])
        if task["kind"] == "policy":
            result = _train_policy(config, task["method"], task["seed"])
        else:
            result = _run_cell(config, Cell(**task["cell"]), task.get("policy"))
    except Exception as error:  # recorded; the grid goes on
        return {"status": "error", "error": f"{type(error).__name__}: {error}", "wall_s": time.perf_counter() - start}
    return {"status": "ok", "wall_s": time.perf_counter() - start} | result


# ---- executing the grid -------------------------------------------------------------------------------------
def _execute(tasks: list[dict[str, Any]], workers: int, backend: str, on_result: Callable[[dict, dict], None]) -> None:
    """Run `tasks`, calling `on_result(task, result)` in this process as each one finishes."""
    if not tasks:
        return
    if backend == "ray":
        _execute_ray(tasks, workers, on_result)
    elif workers == 1:
        for task in tasks:
            on_result(task, run_task(task))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_task, task | {"threads": threads}): task for task in tasks}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as error:  # the worker process died
                    result = {"status": "error", "error": f"worker failed: {type(error).__name__}: {error}"}
                on_result(futures[future], result)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install 'strato-peft[ray]'") from None
    return ray


def _execute_ray(tasks: list[dict[str, Any]], workers: int, on_result: Callable[[dict, dict], None]) -> None:
    """Each task a Ray task of one CPU; uses the running Ray (or RAY_ADDRESS's cluster), else starts a local one."""
    ray = _import_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_task)
    pending = {remote.remote(task | {"threads": 1}): task for task in tasks}
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done)
        try:
            result = ray.get(done)
        except Exception as error:  # the Ray worker died
            result = {"status": "error", "error": f"worker failed: {type(error).__name__}: {error}"}
        on_result(task, result)


class BenchFolder(RunFolder):
    """The benchmark's run folder: config.yaml, cells/*.json, policies/*, then results.csv, summary.md, plots.

    An existing folder of the same benchmark (identical config.yaml) is resumed; another one is refused.
    """

    def __init__(self, config: BenchConfig) -> None:
        path = Path(config.runs_dir) / str(config.name)
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        resume = path.is_dir() and any(path.iterdir())
        if resume and (not (path / "config.yaml").is_file() or (path / "config.yaml").read_text() != text):
            raise ValueError(
                f"run folder {path} holds another benchmark (its config.yaml differs); "
                "choose another name=... or remove the folder"
            )
        super().__init__(config.runs_dir, str(config.name), resume=resume)
        if not resume:
            self.write_text("config.yaml", text)

    def finished_cell(self, cell: Cell) -> dict[str, Any] | None:
        path = self.path / "cells" / f"{cell.key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def policy(self, method: str, seed: int) -> dict[str, Any] | None:
        meta = self.path / "policies" / f"{method}-s{seed}.json"
        if not meta.is_file():
            return None
        values = json.loads(meta.read_text())
        if values["status"] == "ok":
            values["policy"] = (self.path / "policies" / f"{method}-s{seed}.zip").read_bytes()
        return values


def run_bench(
    config: BenchConfig,
    workers: int = 1,
    backend: str = "process",
    command: str | None = None,
    publish: str | None = None,
) -> Path:
    """Run (or resume) the grid and write the run folder; returns its path."""
    from agents.bench_report import publish_results, write_report

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers {workers!r} is invalid: expected an integer >= 1")
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is invalid: allowed {list(BACKENDS)}")
    if backend == "ray":
        _import_ray()
    folder = BenchFolder(config)
    values = config.to_dict()
    cells = grid(config)
    rows: dict[str, dict[str, Any]] = {}
    policies: dict[str, dict[str, Any]] = {}
    try:
        for cell in cells:
            if (done := folder.finished_cell(cell)) is not None and done["status"] == "ok":
                rows[cell.key] = done
        for method in config.policies:
            for seed in config.seeds:
                if (done := folder.policy(method, seed)) is not None and done["status"] == "ok":
                    policies[f"{method}-s{seed}"] = done
        todo = [c for c in cells if c.key not in rows]
        policy_tasks = [
            {"kind": "policy", "config": values, "method": m, "seed": s}
            for m in config.policies
            for s in config.seeds
            if f"{m}-s{s}" not in policies and any(c.policy_key == f"{m}-s{s}" for c in todo)
        ]
        first = [t for t in todo if t.method not in POLICY_METHODS]
        bar = tqdm(total=len(todo) + len(policy_tasks), desc=f"bench {config.name}", unit="task")

        def on_result(task: dict[str, Any], result: dict[str, Any]) -> None:
            if task["kind"] == "policy":
                key = f"{task['method']}-s{task['seed']}"
                if result["status"] == "ok":
                    write_atomic(folder.path / "policies" / f"{key}.zip", result["policy"])
                meta = {k: v for k, v in result.items() if k != "policy"}
                write_atomic(folder.path / "policies" / f"{key}.json", json.dumps(meta, indent=2))
                policies[key] = result
            else:
                cell = Cell(**task["cell"])
                row = asdict(cell) | result
                write_atomic(folder.path / "cells" / f"{cell.key}.json", json.dumps(row, indent=2))
                rows[cell.key] = row
                bar.set_postfix_str(f"{cell.key}: {result['status']}")
            bar.update()

        phase_one = policy_tasks + [{"kind": "cell", "config": values, "cell": asdict(c)} for c in first]
        _execute(phase_one, workers, backend, on_result)
        phase_two = []
        for cell in (c for c in todo if c.method in POLICY_METHODS):
            policy = policies.get(cell.policy_key, {"status": "error", "error": "policy training did not run"})
            if policy["status"] != "ok":
                on_result(
                    {"kind": "cell", "cell": asdict(cell)},
                    {"status": "error", "error": f"policy training failed: {policy['error']}", "wall_s": 0.0},
                )
            else:
                phase_two.append({"kind": "cell", "config": values, "cell": asdict(cell), "policy": policy})
        _execute(phase_two, workers, backend, on_result)
        bar.close()
        results, images = write_report(folder, config, [rows[c.key] for c in cells], command)
        if publish is not None:
            publish_results(folder, config, results, images, publish, command)
    except BaseException as error:
        folder.mark_interrupted(f"{type(error).__name__}: {error}")
        raise
    folder.finish()
    return folder.path
