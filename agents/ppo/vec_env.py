"""Stable-Baselines3's view of many sub-episodes on the batched engine (SB3 refuses Gymnasium vector envs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from strato_env.config import EnvConfig
from strato_env.env import check_action, observation_space
from strato_env.episodes import SHARED_FIELDS, EpisodeBatch
from strato_env.instance import instance_key


def _group_key(config: EnvConfig) -> str:
    return json.dumps([getattr(config, name) for name in SHARED_FIELDS] + [config.task.name], default=str)


class BatchedVecEnv(VecEnv):
    """`n_envs` sub-episodes for SB3: sub-episode i plays `configs[i % len(configs)]`.

    Sub-episodes whose instances share a base model and protocol train together in one `EpisodeBatch` (one
    forward pass of the base per optimizer step); other instances get their own batch. SB3's conventions:
    an ended sub-episode is reset in the same step, its last observation in `info["terminal_observation"]`.
    The end of a fine-tuning run is reported as termination, not truncation (nothing follows it; see
    `agents.ppo.train.RunEndIsTerminal`), so SB3 bootstraps no value past it. `starts[k]`, if given, is the
    allocation every episode of `configs[k]` starts from (None: the env's initial rank).
    """

    def __init__(
        self, configs: Sequence[EnvConfig], n_envs: int, starts: Sequence[dict[str, int] | None] | None = None
    ) -> None:
        if n_envs < len(configs):
            raise ValueError(
                f"n_envs={n_envs} is smaller than the {len(configs)} training instances: every instance needs a "
                f"sub-episode; allowed: n_envs >= {len(configs)}"
            )
        max_modules = {c.max_modules for c in configs}
        if len(max_modules) > 1:
            raise ValueError(f"all instances must share max_modules (same spaces); got {sorted(max_modules)}")
        slots = max_modules.pop()
        assigned = [configs[i % len(configs)] for i in range(n_envs)]
        starts = [None] * len(configs) if starts is None else starts
        self._starts = [starts[i % len(configs)] for i in range(n_envs)]
        groups: dict[str, list[int]] = {}
        for i, config in enumerate(assigned):
            groups.setdefault(_group_key(config), []).append(i)
        self.groups = [(EpisodeBatch([assigned[i] for i in members]), members) for members in groups.values()]
        self._where = {i: (batch, j) for batch, members in self.groups for j, i in enumerate(members)}
        super().__init__(n_envs, observation_space(slots), spaces.MultiDiscrete([3] * slots))
        self._actions: np.ndarray | None = None

    @property
    def total_optimizer_steps(self) -> int:
        return sum(batch.total_optimizer_steps for batch, _ in self.groups)

    @property
    def probe_optimizer_steps(self) -> int:
        """Optimizer steps of the importance probes of the distinct instances played (each cached per instance,
        and not in `total_optimizer_steps`)."""
        probes = {
            instance_key(sub.config): sub.config.probe_optimizer_steps(len(batch.modules))
            for batch, _ in self.groups
            for sub in batch.subs
        }
        return sum(probes.values())

    def _observations(self) -> VecEnvObs:
        per_env = [self._where[i][0].observation(self._where[i][1]) for i in range(self.num_envs)]
        return {key: np.stack([o[key] for o in per_env]) for key in per_env[0]}

    def reset(self) -> VecEnvObs:
        for batch, members in self.groups:
            seeds = [self._seeds[i] for i in members]
            batch.start(range(len(members)), seeds, [self._starts[i] for i in members])
            for j, i in enumerate(members):
                self.reset_infos[i] = batch.info(j)
        self._reset_seeds()
        self._reset_options()
        return self._observations()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = check_action(actions, (self.num_envs, *self.action_space.shape), "actions")

    def step_wait(self) -> VecEnvStepReturn:
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for batch, members in self.groups:
            results = batch.step({j: self._actions[i] for j, i in enumerate(members)})
            ended = []
            for j, i in enumerate(members):
                rewards[i], terminated, truncated, infos[i] = results[j]
                dones[i] = terminated or truncated
                infos[i]["TimeLimit.truncated"] = False
                if dones[i]:
                    infos[i]["terminal_observation"] = batch.observation(j)
                    ended.append(j)
            if ended:
                # one evaluation pass for all
                batch.start(ended, [None] * len(ended), [self._starts[members[j]] for j in ended])
        return self._observations(), rewards, dones, infos

    def close(self) -> None:
        pass

    def _targets(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """An attribute of each sub-episode's config or of its batch (e.g. `action_masks`)."""
        values = []
        for i in self._targets(indices):
            batch, j = self._where[i]
            if attr_name == "render_mode":
                values.append(None)
            elif hasattr(batch.subs[j], attr_name):
                values.append(getattr(batch.subs[j], attr_name))
            else:
                values.append(getattr(batch, attr_name))
        return values

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"sub-episodes of a BatchedVecEnv have no settable attribute {attr_name!r}")

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """`EpisodeBatch.<method_name>(sub-episode, ...)` for each target, e.g. `action_masks`."""
        return [
            getattr(self._where[i][0], method_name)(self._where[i][1], *method_args, **method_kwargs)
            for i in self._targets(indices)
        ]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._targets(indices))
