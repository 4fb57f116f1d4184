"""A benchmark grid's config: instances, methods, seeds, the step cap and per-method options.

Its values come from a YAML file (`configs/bench_*.yaml`) plus `key=value` overrides; the code holds no grid
of its own. Everything is validated when the config loads, per-method options included, before any cell runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from agents.config import InstanceSet, check_instances, merge, read_config
from agents.methods import METHODS, Method, competitors
from strato_env.config import EnvConfig, from_dict
from strato_env.validation import check_int, fail, is_int, is_number

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
    """Instances the learned policies train on, one sub-episode each on the batched engine; overrides on top of
    `env`."""
    test_instances: list[dict[str, Any]] = field(default_factory=list)
    """Held-out instances: every method runs on each of them (policies only act, without training)."""
    methods: list[str] = field(default_factory=competitors)
    """Methods compared; the references (uniform LoRA, and the oracle on planted instances) always run."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of every method and of its final-quality run."""
    search_steps: int = 800
    """Cap on the optimizer steps each method may spend to find its allocation."""
    budget_scales: list[float] = field(default_factory=lambda: [1.0])
    """Each instance's budget is multiplied by each scale (1.0 must be present: references are taken there)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method options: `options.<method>` holds the fields of that method's options dataclass (see
    `agents.methods.METHODS`), except those the benchmark sets from `search_steps`."""
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
        check_int("search_steps", self.search_steps, 1)
        if self.search_steps < self.episode_steps:
            fail("search_steps", self.search_steps, f"expected >= one episode ({self.episode_steps} optimizer "
                 "steps: decisions x inner_steps)")  # fmt: skip
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
        for key in ("options", "quick"):
            if not isinstance(getattr(self, key), dict):
                fail(key, getattr(self, key), "expected a mapping")

    # ---- derived --------------------------------------------------------------------------------------------
    def method_options(self, name: str) -> Any:
        """The typed options of method `name` (its defaults updated by `options.<name>`)."""
        method = METHODS.get(name)
        if method is None:
            raise ValueError(f"options.{name}: not a method; allowed: {list(METHODS)}")
        given = self.options.get(name, {})
        for key in method.fixed_options:
            if isinstance(given, dict) and key in given:
                raise ValueError(f"options.{name}.{key}: set by the benchmark from search_steps, not an option")
        return method.parse_options(given, f"options.{name}.")

    @property
    def episode_steps(self) -> int:
        config = self.env_config({})
        return config.decisions * config.inner_steps

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

        env = RankAllocationEnv(self.env_config(instance))
        if scale != 1.0:
            scaled = merge(self.env, instance, {"budget": int(env.budget * scale)})
            env = RankAllocationEnv(from_dict(EnvConfig, scaled))
        return env

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
