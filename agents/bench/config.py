"""A benchmark grid's config: instances, methods, seeds, the step cap and per-method options.

Its values come from a YAML file (`configs/bench_*.yaml`) plus `key=value` overrides; the code holds no grid
of its own. Everything is validated when the config loads, per-method options included, before any cell runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from agents.config import InstanceSet, check_instances, merge, read_config
from agents.methods import METHODS, Method, competitors
from strato_env.config import EnvConfig, from_dict
from strato_env.validation import fail, is_int, is_number

PRETRAINED = "pretrained:"
"""Prefix of an instance's `model` that names a base of the benchmark's `pretrain` section."""
PROTOCOL_KEYS = ("decisions", "inner_steps")
"""EnvConfig keys an instance may not override: they fix the length of every final-quality run."""


@dataclass
class BenchConfig(InstanceSet):
    """One benchmark grid (`configs/bench_planted.yaml` and `configs/bench_text.yaml` are two)."""

    name: str | None = None
    """Run folder name under `runs_dir` (default: the config file's name, plus '-quick'). Rerunning the same
    benchmark with the same name resumes it."""
    env: dict[str, Any] = field(default_factory=dict)
    """EnvConfig fields shared by every instance."""
    train_instances: list[dict[str, Any]] = field(default_factory=list)
    """Instances the learned policies meta-train on, one sub-episode each on the batched engine; overrides on top
    of `env`. An entry `{generated: {models: [...], seeds: [...]}}` stands for one generated planted instance
    per model and generator seed."""
    validation_instances: list[dict[str, Any]] = field(default_factory=list)
    """Instances for choosing settings (never the test set); disjoint from the other two sets."""
    test_instances: list[dict[str, Any]] = field(default_factory=list)
    """Held-out instances the report is about: every method runs on each of them (policies only act, without
    training); never used for training or tuning."""
    methods: list[str] = field(default_factory=competitors)
    """Methods compared; the references (uniform LoRA, and the oracle on planted instances) always run."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of every method and of its final-quality run."""
    search_steps: list[int] = field(default_factory=lambda: [800])
    """Search track: the caps on the optimizer steps a search method (random, tpe, go_explore) may spend on one
    instance; it runs once per cap, which gives its anytime curve."""
    budget_scales: list[float] = field(default_factory=lambda: [1.0])
    """Each instance's budget is multiplied by each scale (1.0 must be present: references are taken there)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method options: `options.<method>` holds the fields of that method's options dataclass (see
    `agents.methods.METHODS`), except those the benchmark sets from `search_steps`."""
    pretrain: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Base models to pretrain before any cell runs: NAME -> `strato pretrain` arguments (model, data, steps,
    ...). An instance with `model: pretrained:NAME` runs on it. Each lives in `runs_dir`/pretrained/ under a name
    that holds a hash of its arguments, so a base already pretrained with the same arguments costs nothing."""
    runs_dir: str = "runs"
    """Folder under which the benchmark's run folder is created."""
    quick: dict[str, Any] = field(default_factory=dict)
    """Overrides that `--quick` applies to this config (a grid that finishes in minutes)."""

    def __post_init__(self) -> None:
        self._check_lists()
        for name in self.methods:
            if name not in METHODS:
                fail("methods", name, f"allowed: {list(METHODS)}")
        for name in self.options:
            self.method_options(name)  # validates
        self._check_pretrain()
        steps = self.search_steps
        if (
            not isinstance(steps, list)
            or not steps
            or not all(is_int(s) for s in steps)
            or len(set(steps)) < len(steps)
        ):
            fail("search_steps", steps, "expected a non-empty list of distinct integers, e.g. [160, 800, 3200]")
        if min(steps) < self.episode_steps:
            fail("search_steps", steps, f"every cap must be >= one episode ({self.episode_steps} optimizer steps: "
                 "decisions x inner_steps)")  # fmt: skip
        if self.policies and not self.train_instances:
            raise ValueError(f"train_instances=[] is invalid: the policies {self.policies} need one to train on")
        for where, instance in self.labelled_instances():
            for key in PROTOCOL_KEYS:
                if key in instance:
                    raise ValueError(f"{where}.{key}: set it in env, not per instance (it fixes the run length)")
            self.env_config(instance, where)
        self.check_disjoint()
        if self.quick:
            values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quick"}
            try:
                from_dict(BenchConfig, merge(values, self.quick) | {"quick": {}})
            except ValueError as error:
                raise ValueError(f"quick: {error}") from None

    def _check_lists(self) -> None:
        check_instances(self)
        if not self.test_instances:
            raise ValueError("test_instances=[] is invalid: at least one held-out instance is needed")
        if not isinstance(self.methods, list) or not self.methods:
            fail("methods", self.methods, f"expected a non-empty list of {list(METHODS)}")
        if not isinstance(self.seeds, list) or not self.seeds or not all(is_int(s) for s in self.seeds):
            fail("seeds", self.seeds, "expected a non-empty list of integers")
        if len(set(self.seeds)) != len(self.seeds):
            fail("seeds", self.seeds, "a seed is repeated")
        scales = self.budget_scales
        if not isinstance(scales, list) or not all(is_number(s) and s > 0 for s in scales) or 1.0 not in scales:
            fail("budget_scales", scales, "expected a list of numbers > 0 that holds 1.0")
        for key in ("options", "quick", "pretrain"):
            if not isinstance(getattr(self, key), dict):
                fail(key, getattr(self, key), "expected a mapping")

    def _check_pretrain(self) -> None:
        from strato_env.pretrain import pretrain

        allowed = [p for p in inspect.signature(pretrain).parameters if p != "out"]
        for name, arguments in self.pretrain.items():
            if not isinstance(arguments, dict) or not {"model", "data"} <= set(arguments) <= set(allowed):
                fail(f"pretrain.{name}", arguments, f"expected a mapping with model and data, keys from {allowed}")

    # ---- derived --------------------------------------------------------------------------------------------
    def method_options(self, name: str) -> Any:
        """The typed options of method `name` (its defaults updated by `options.<name>`)."""
        method = METHODS.get(name)
        if method is None:
            raise ValueError(f"options.{name}: not a method; allowed: {list(METHODS)}")
        given = self.options.get(name, {})
        for key in method.fixed_options:
            if isinstance(given, dict) and key in given:
                raise ValueError(f"options.{name}.{key}: set by the benchmark, not an option")
        return method.parse_options(given, f"options.{name}.")

    @property
    def episode_steps(self) -> int:
        """Optimizer steps of one episode (decisions x inner_steps, which instances may not override)."""
        return self.env.get("decisions", EnvConfig.decisions) * self.env.get("inner_steps", EnvConfig.inner_steps)

    @property
    def policies(self) -> list[str]:
        return [m for m in self.methods if METHODS[m].learned]

    def compared(self, planted: bool) -> list[Method]:
        """The methods run on one instance: the references (the oracle on planted instances only), then the rest."""
        references = [m for m in METHODS.values() if m.reference and (planted or m.name != "oracle")]
        return references + [METHODS[m] for m in self.methods if not METHODS[m].reference]

    def make_env(self, instance: dict[str, Any], scale: float = 1.0):
        """The instance's env; with `scale != 1` its budget (given or default) is multiplied by `scale`."""
        from strato_env.env import RankAllocationEnv

        config = self.env_config(instance)
        env = RankAllocationEnv(config)
        if scale != 1.0:
            env = RankAllocationEnv(dataclasses.replace(config, budget=int(env.budget * scale)))
        return env

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def pretrained_path(self, name: str) -> Path:
        arguments = json.dumps(self.pretrain[name], sort_keys=True)
        return Path(self.runs_dir) / "pretrained" / f"{name}-{hashlib.sha256(arguments.encode()).hexdigest()[:8]}"

    def resolve_model(self, model: Any) -> Any:
        if not isinstance(model, str) or not model.startswith(PRETRAINED):
            return model
        name = model.removeprefix(PRETRAINED)
        if name not in self.pretrain:
            fail("model", model, f"names no base of `pretrain`; allowed: {[PRETRAINED + n for n in self.pretrain]}")
        return str(self.pretrained_path(name))

    def pretrain_bases(self) -> None:
        """Pretrain (or reuse) every base model of `pretrain`."""
        from strato_env.pretrain import pretrain

        for name, arguments in self.pretrain.items():
            pretrain(out=str(self.pretrained_path(name)), **arguments)


def load_bench_config(path: str | None = None, overrides: list[str] | None = None, quick: bool = False) -> BenchConfig:
    """A BenchConfig from YAML plus `key=value` overrides; `quick` applies the config's `quick` section."""
    if path is None:
        raise ValueError("a benchmark config is needed: e.g. strato bench configs/bench_planted.yaml")
    config = from_dict(BenchConfig, read_config(path, overrides, "BenchConfig"))
    name, values = config.name or Path(path).stem, config.to_dict()
    if quick:
        values = merge(values, config.quick) | {"quick": {}}
        name = f"{name}-quick" if config.name is None else name
    return from_dict(BenchConfig, values | {"name": name})
