"""An instance is a base model plus a task: built once per process and shared by the envs that use it."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn
from transformers import PretrainedConfig

from strato_env.config import EnvConfig, TrainingProtocol
from strato_env.models import (
    TargetModule,
    find_target_modules,
    is_causal_lm,
    is_seq2seq,
    is_tiny_preset,
    load_config,
    load_model,
)
from strato_env.tasks.base import TaskData
from strato_env.tasks.planted import build_planted
from strato_env.tasks.text import (
    build_causal_lm,
    build_classification,
    build_seq2seq,
    classification_rows,
    load_tokenizer,
    seq2seq_rows,
)


@dataclass
class Instance:
    model: nn.Module
    """The frozen base model (envs train on their own copy)."""
    modules: list[TargetModule]
    data: TaskData
    key: str
    """Identifies the instance in caches."""
    probes: dict[tuple[TrainingProtocol, str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )
    """(protocol, probe, probe_steps) -> (||dL/dW|| at the base model, probe gain, energy shares of the probe's
    update at ranks 0 .. r_max) per module, measured once."""
    static_losses: dict[tuple[TrainingProtocol, tuple[int, ...], int], float] = field(default_factory=dict)
    """(protocol, rank per module, seed) -> final loss of that allocation kept for one episode (oracle, uniform)."""

    @property
    def nbytes(self) -> int:
        """Memory held by the base model's weights and the task's tensors."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [t for split in (self.data.train, self.data.eval, self.data.test) for t in split.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


_CACHE: dict[str, Instance] = {}
CACHE_BYTES = 2 * 2**30
"""The instance cache keeps the most recently built instances whose models and data fit in this many bytes
(always the newest one), so that meta-training on a set of tiny instances builds and probes each once per
process (bench_planted's 42 tiny instances hold 0.75 GiB) while hub-sized models are not hoarded."""


def instance_key(config: EnvConfig) -> str:
    return json.dumps(
        [config.model, asdict(config.task), config.target_modules, config.model_seed, config.device],
        sort_keys=True,
    )


def _check_task_fits_model(task: str, model: str, config: PretrainedConfig) -> None:
    """Reject a task family the model's family cannot run, naming the tasks it can."""
    allowed = ["planted", "seq2seq"] if is_seq2seq(config) else ["planted", "classification"]
    if is_causal_lm(config):
        allowed.append("causal_lm")
    if task not in allowed:
        raise ValueError(f"task.name={task!r} is invalid for model={model!r}; allowed for this model: {allowed}")


def _build(config: EnvConfig) -> Instance:
    task = config.task
    is_preset = is_tiny_preset(config.model)
    _check_task_fits_model(task.name, config.model, load_config(config.model))  # before reading any data
    if task.name == "classification":
        rows = classification_rows(task)  # read the data before loading any weights
        num_labels = max(int(label) for label in rows[task.label_column]) + 1
        model = load_model(config.model, config.model_seed, task="classification", num_labels=num_labels)
    else:
        rows = seq2seq_rows(task) if task.name == "seq2seq" else None
        model = load_model(config.model, config.model_seed)
    model.to(config.device)
    modules = find_target_modules(model, config.target_modules)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if task.name == "planted":
        data = build_planted(model, modules, task)
    elif task.name == "causal_lm":
        data = build_causal_lm(task, load_tokenizer(config.model, is_preset))
    elif task.name == "seq2seq":
        data = build_seq2seq(task, rows, load_tokenizer(config.model, is_preset), pad_id)
    else:
        data = build_classification(task, rows, load_tokenizer(config.model, is_preset), pad_id)
        data.modules_to_save = [name for name in ("classifier", "score") if hasattr(model, name)]
    data.train = {k: v.to(config.device) for k, v in data.train.items()}
    data.eval = {k: v.to(config.device) for k, v in data.eval.items()}
    data.test = {k: v.to(config.device) for k, v in data.test.items()}
    return Instance(model=model, modules=modules, data=data, key=instance_key(config))


def get_instance(config: EnvConfig) -> Instance:
    """The cached instance for `config`, built on first use."""
    key = instance_key(config)
    if key not in _CACHE:
        instance = _build(config)
        while _CACHE and sum(i.nbytes for i in _CACHE.values()) + instance.nbytes > CACHE_BYTES:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest
        _CACHE[key] = instance
    return _CACHE[key]


def fresh_model(instance: Instance) -> nn.Module:
    """A private copy of the instance's base model for one env to wrap with LoRA."""
    return copy.deepcopy(instance.model)
