"""Experiment configs: YAML files plus `key=value` overrides, validated into typed dataclasses before any work."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from agents.go_explore import GoExploreConfig
from agents.ppo.train import PPOConfig
from strato_env.config import EnvConfig, from_dict

AGENTS = ("ppo", "maskable_ppo", "a2c", "go_explore")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursing into nested dicts (e.g. `task`)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class InstanceSet:
    """What configs with `env` (EnvConfig fields) and `train_instances` / `test_instances` (overrides of `env`)
    share: labelled instances and their validated EnvConfig."""

    def labelled_instances(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"train_instances[{i}]", x) for i, x in enumerate(self.train_instances)] + [
            (f"test_instances[{i}]", x) for i, x in enumerate(self.test_instances)
        ]

    def env_config(self, instance: dict[str, Any], where: str = "env") -> EnvConfig:
        """`env` updated by `instance`, validated; errors start with `where`."""
        try:
            return from_dict(EnvConfig, merge(self.env, instance))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


@dataclass
class TrainConfig(InstanceSet):
    """One `strato train` run."""

    agent: str = "maskable_ppo"
    """'ppo', 'maskable_ppo', 'a2c' (a policy) or 'go_explore' (a search)."""
    seed: int = 0
    """Seed of the agent and of the episodes."""
    env: dict[str, Any] = field(default_factory=dict)
    """EnvConfig fields shared by every instance (default: the embedded planted gpt2-tiny instance)."""
    train_instances: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    """Instances trained on, round robin; each is a set of EnvConfig overrides on top of `env`."""
    test_instances: list[dict[str, Any]] = field(default_factory=list)
    """Held-out instances the trained policy is evaluated on (policies only)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO / MaskablePPO / A2C settings."""
    go_explore: GoExploreConfig = field(default_factory=GoExploreConfig)
    """Go-Explore settings."""
    runs_dir: str = "runs"
    """Folder under which the run folder is created."""
    name: str | None = None
    """Run folder name (default: agent and time)."""

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise ValueError(f"agent={self.agent!r} is invalid: allowed {list(AGENTS)}")
        if isinstance(self.ppo, dict):
            self.ppo = from_dict(PPOConfig, self.ppo, where="ppo.")
        if isinstance(self.go_explore, dict):
            self.go_explore = from_dict(GoExploreConfig, self.go_explore, where="go_explore.")
        if not isinstance(self.env, dict):
            raise ValueError(f"env={self.env!r} is invalid: expected a mapping of EnvConfig fields")
        for key, instances in (("train_instances", self.train_instances), ("test_instances", self.test_instances)):
            if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
                raise ValueError(f"{key}={instances!r} is invalid: expected a list of mappings of EnvConfig fields")
        if not self.train_instances:
            raise ValueError("train_instances=[] is invalid: at least one instance is needed")
        for where, instance in self.labelled_instances():
            self.env_config(instance, where)  # every instance must be a valid EnvConfig, checked up front

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: asdict(v) if is_dataclass(v) else v for k, v in values.items()}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["ppo.total_timesteps=64", "env.model=llama-tiny"]` -> nested dict, values parsed as YAML."""
    result: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is invalid: expected key=value, e.g. agent=go_explore")
        key, raw = pair.split("=", 1)
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return result


def read_config(path: str | None, overrides: list[str] | None, kind: str) -> dict[str, Any]:
    """The mapping in YAML file `path` (if any) updated by `key=value` overrides; `kind` names it in errors."""
    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file {path!r} does not exist")
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of {kind} keys")
    return merge(values, parse_overrides(overrides or []))


def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    return from_dict(TrainConfig, read_config(path, overrides, "TrainConfig"))
