"""Experiment configs: YAML files plus `key=value` overrides (merged by OmegaConf), validated into typed
dataclasses before any work."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agents.go_explore import GoExploreConfig
from agents.methods import method, trainable_agents
from agents.ppo.train import PPOConfig
from strato_env.config import EnvConfig, field_docs, from_dict
from strato_env.validation import is_int


def merge(*configs: dict[str, Any]) -> dict[str, Any]:
    """The configs merged left to right: nested mappings (e.g. `task`) key by key, anything else replaced."""
    try:
        return OmegaConf.to_container(OmegaConf.merge(*configs), resolve=True)
    except (TypeError, ValueError, OmegaConfBaseException) as error:  # e.g. a mapping over a list
        raise ValueError(f"the overrides do not fit the config: {error}".splitlines()[0]) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["ppo.total_timesteps=64", "env.model=llama-tiny"]` -> nested dict, values parsed as YAML."""
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is invalid: expected key=value, e.g. agent=go_explore")
    return OmegaConf.to_container(OmegaConf.from_dotlist(pairs), resolve=True)


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


INSTANCE_SETS = ("train_instances", "validation_instances", "test_instances")


def expand_instances(instances: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """`instances` with each `{generated: {models: [...], seeds: [...]}}` entry replaced by one generated
    planted instance per model and generator seed (`task.profile=generated`, `task.data_seed=seed`), in that
    order; other entries are kept as they are."""
    expanded = []
    for i, instance in enumerate(instances):
        if "generated" not in instance:
            expanded.append(instance)
            continue
        spec = instance["generated"]
        at = f"{where}[{i}].generated"
        if len(instance) != 1 or not isinstance(spec, dict) or set(spec) != {"models", "seeds"}:
            raise ValueError(f"{at}={spec!r} is invalid: expected {{generated: {{models: [...], seeds: [...]}}}} alone")
        models, seeds = spec["models"], spec["seeds"]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise ValueError(f"{at}.models={models!r} is invalid: expected a non-empty list of model names")
        if not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds):
            raise ValueError(f"{at}.seeds={seeds!r} is invalid: expected a non-empty list of integers >= 0")
        expanded += [{"model": m, "task": {"profile": "generated", "data_seed": s}} for m in models for s in seeds]
    return expanded


def check_instances(config: Any) -> None:
    """`env` is a mapping and the instance sets are lists of mappings; `generated` entries are expanded."""
    if not isinstance(config.env, dict):
        raise ValueError(f"env={config.env!r} is invalid: expected a mapping of EnvConfig fields")
    for key in INSTANCE_SETS:
        value = getattr(config, key, None)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
            raise ValueError(f"{key}={value!r} is invalid: expected a list of mappings of EnvConfig fields")
        setattr(config, key, expand_instances(value, key))


class InstanceSet:
    """What configs with `env` (EnvConfig fields) and instance sets (overrides of `env`: `train_instances`,
    `test_instances` and, in a benchmark, `validation_instances`) share: labelled instances and their validated
    EnvConfig."""

    env: dict[str, Any]
    train_instances: list[dict[str, Any]]
    test_instances: list[dict[str, Any]]

    def labelled_instances(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"{key}[{i}]", x) for key in INSTANCE_SETS for i, x in enumerate(getattr(self, key, None) or [])]

    def check_disjoint(self) -> None:
        """No instance is in two sets (the same model, task, target modules and seeds): a policy is never tested
        or validated on what it trained on."""
        from strato_env.instance import instance_key

        seen: dict[str, str] = {}
        for where, instance in self.labelled_instances():
            config = self.env_config(instance, where)
            key = instance_key(config)
            first = seen.setdefault(key, where)
            if first != where and first.split("[")[0] != where.split("[")[0]:
                raise ValueError(
                    f"{where} ({config.label}) is also {first}: train, validation and test instances must not overlap"
                )

    def env_config(self, instance: dict[str, Any], where: str = "env") -> EnvConfig:
        """`env` updated by `instance`, validated; errors start with `where`."""
        try:
            values = merge(self.env, instance)
            values["model"] = self.resolve_model(values.get("model", EnvConfig.model))
            return from_dict(EnvConfig, values)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def resolve_model(self, model: Any) -> Any:
        """The model an instance's `model` value stands for (a benchmark resolves its pretrained bases)."""
        return model


@dataclass
class TrainConfig(InstanceSet):
    """One `strato train` run."""

    agent: str = "maskable_ppo"
    """'ppo', 'maskable_ppo', 'a2c', 'trpo' (a policy learner) or 'go_explore' (a search)."""
    seed: int = 0
    """Seed of the agent and of the episodes."""
    env: dict[str, Any] = field(default_factory=dict)
    """EnvConfig fields shared by every instance (default: the embedded planted gpt2-tiny instance)."""
    train_instances: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    """Instances trained on (sub-episode i of `ppo.n_envs` plays instance i modulo their number); each is a set of
    EnvConfig overrides on top of `env`."""
    validation_instances: list[dict[str, Any]] = field(default_factory=list)
    """Held-out instances a policy is scored on while it trains (every `ppo.eval_every` rollouts); the best
    scoring policy is the one kept. None: the last policy is kept."""
    test_instances: list[dict[str, Any]] = field(default_factory=list)
    """Held-out instances the trained policy is evaluated on (policies only)."""
    ppo: Any = None
    """Policy learners: the fields of the agent's settings class in `agents.ppo.train.ALGORITHMS` (PPOConfig for
    ppo and maskable_ppo; A2CConfig for a2c: no batch_size, n_epochs or clip_range; TRPOConfig for trpo)."""
    go_explore: Any = None
    """agent=go_explore: GoExploreConfig fields."""
    runs_dir: str = "runs"
    """Folder under which the run folder is created."""
    name: str | None = None
    """Run folder name (default: agent and time)."""

    def __post_init__(self) -> None:
        agent = method(self.agent, "agent")
        if not agent.trainable:
            raise ValueError(f"agent={self.agent!r} is invalid: allowed {trainable_agents()}")
        sections = {"ppo": agent.learned, "go_explore": self.agent == "go_explore"}
        for section, used in sections.items():
            value = getattr(self, section)
            if not used and value:
                raise ValueError(f"{section}: does not apply to agent={self.agent!r}; remove it")
            if used:
                try:
                    setattr(self, section, agent.parse_options({} if value is None else value, f"{section}."))
                except ValueError as error:
                    raise ValueError(f"{error} (agent={self.agent})") from None
        check_instances(self)
        if not self.train_instances:
            raise ValueError("train_instances=[] is invalid: at least one instance is needed")
        for where, instance in self.labelled_instances():
            self.env_config(instance, where)  # every instance must be a valid EnvConfig, checked up front
        self.check_disjoint()

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: asdict(v) if is_dataclass(v) else v for k, v in values.items()}


def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    return from_dict(TrainConfig, read_config(path, overrides, "TrainConfig"))


def key_lines(
    prefix: str,
    cls: type,
    defaults: Any = None,
    skip: tuple[str, ...] = (),
    sections: dict[str, tuple[type, Any]] | None = None,
) -> list[str]:
    """`prefix.key=default` and its docstring for each field of dataclass `cls`, recursing into nested
    dataclasses and into `sections` (field -> its dataclass and defaults), except the fields named in `skip`.
    Defaults come from the instance `defaults`, or from the fields themselves."""
    docs, sections = field_docs(cls), sections or {}
    lines = []
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.name in sections:
            lines.append(f"  {prefix}{f.name}: {docs.get(f.name, '')}")
            lines += key_lines(f"{prefix}{f.name}.", *sections[f.name])
            continue
        if defaults is not None:
            value = getattr(defaults, f.name)
        else:
            value = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(value):
            lines += key_lines(f"{prefix}{f.name}.", type(value), value)
            continue
        lines.append(f"  {prefix}{f.name}={value!r}")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    return lines


def config_help(cls: type, sections: dict[str, tuple[type, Any]]) -> str:
    """Every `key=value` that a config of dataclass `cls` accepts, with its default and its docstring;
    `sections` gives the dataclass (and defaults) of nested sections such as `ppo` or `env`."""
    return "\n".join(
        ["config keys (key=value overrides, dotted for nested ones):", *key_lines("", cls, sections=sections)]
    )


ENV_SECTION = (EnvConfig, EnvConfig())
TRAIN_HELP_SECTIONS = {
    "env": ENV_SECTION,
    "ppo": (PPOConfig, PPOConfig()),
    "go_explore": (GoExploreConfig, GoExploreConfig()),
}
