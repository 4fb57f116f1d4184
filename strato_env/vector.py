"""RankAllocationVecEnv: N rank-allocation episodes on one base model, one forward pass per training step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from strato_env.config import EnvConfig
from strato_env.env import check_action, observation_space
from strato_env.episodes import EpisodeBatch


class RankAllocationVecEnv(VectorEnv):
    """`num_envs` sub-episodes of `RankAllocationEnv`, stepped together by the batched LoRA engine.

    Each sub-episode has its own seed, allocation, budget and instance; instances share the base model and
    the training protocol (see `strato_env.episodes.SHARED_FIELDS`) and may differ in task (planted teacher,
    data). One `step` takes every sub-episode's moves, then trains all of them together: one pass of the frozen
    base per optimizer step over the sub-episodes' batches stacked along the batch dimension. Sub-episode i
    gives the same allocations and, up to float summation order, the same losses as a `RankAllocationEnv`
    driven with the same seed and actions.

    Autoreset follows Gymnasium 1.x: `NEXT_STEP` (default): the step after a sub-episode ends resets it and
    ignores its action (reward 0); `DISABLED`: the caller resets ended sub-episodes with
    `reset(options={"reset_mask": mask})`.

    >>> import gymnasium as gym, strato_env
    >>> envs = gym.make_vec("strato_env/RankAllocation-v3", num_envs=4, vectorization_mode="vector_entry_point",
    ...                     decisions=2, inner_steps=1)
    >>> observations, infos = envs.reset(seed=0)
    >>> observations["modules"].shape, envs.action_masks().shape
    ((4, 768), (4, 192))
    """

    def __init__(
        self,
        configs: Sequence[EnvConfig] | None = None,
        num_envs: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("max_episode_steps", None)  # from the registration (gym.make_vec): every episode truncates itself
        if configs is None:
            if num_envs is None or isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
                raise ValueError(f"num_envs={num_envs!r} is invalid: allowed: an integer >= 1")
            configs = [EnvConfig(**kwargs)] * num_envs  # one config, shared: sub-episodes never change it
        elif kwargs or (num_envs is not None and num_envs != len(configs)):
            raise ValueError("pass either configs, or num_envs and EnvConfig keyword arguments, not both")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            raise ValueError("autoreset_mode=SAME_STEP is not supported; allowed: NEXT_STEP, DISABLED")
        self.metadata = {"autoreset_mode": self.autoreset_mode, "render_modes": []}
        self.batch = EpisodeBatch(configs)
        self.num_envs = self.batch.size
        max_modules = self.batch.config.max_modules
        self.single_action_space = spaces.MultiDiscrete([3] * max_modules)
        self.single_observation_space = observation_space(max_modules)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._ended = np.zeros(self.num_envs, dtype=bool)

    # ---- stepping -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Reset every sub-episode, or those in `options["reset_mask"]`. `seed`: an int (sub-episode i gets
        seed + i), a list of seeds, or None. `options["allocation"]`: a starting allocation for all of them,
        or a list of one per sub-episode."""
        options = dict(options or {})
        mask = np.asarray(options.pop("reset_mask", np.ones(self.num_envs, dtype=bool)), dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"options['reset_mask'] has shape {mask.shape}, expected ({self.num_envs},)")
        if seed is None or isinstance(seed, int | np.integer):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed has {len(seeds)} entries, expected one per sub-episode ({self.num_envs})")
        allocations = options.pop("allocation", None)
        if not isinstance(allocations, list):
            allocations = [allocations] * self.num_envs
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; allowed: 'allocation', 'reset_mask'")
        indices = [i for i in range(self.num_envs) if mask[i]]
        self.batch.start(indices, [seeds[i] for i in indices], [allocations[i] for i in indices])
        self._ended[indices] = False
        infos: dict[str, Any] = {}
        for i in indices:
            infos = self._add_info(infos, self.batch.info(i), i)
        return self._observations(), infos

    def step(self, actions: Any):
        actions = check_action(actions, self.action_space.shape, "actions")
        rewards = np.zeros(self.num_envs)
        terminations = np.zeros(self.num_envs, dtype=bool)
        truncations = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        resetting = [i for i in range(self.num_envs) if self._ended[i]]
        if resetting and self.autoreset_mode == AutoresetMode.DISABLED:
            raise RuntimeError(f"sub-episodes {resetting} have ended; reset them with options={{'reset_mask': ...}}")
        stepping = {i: actions[i] for i in range(self.num_envs) if not self._ended[i]}
        for i, (reward, terminated, truncated, info) in self.batch.step(stepping).items():
            rewards[i], terminations[i], truncations[i] = reward, terminated, truncated
            infos = self._add_info(infos, info, i)
        if resetting:
            self.batch.start(resetting, [None] * len(resetting), [None] * len(resetting))
            for i in resetting:
                infos = self._add_info(infos, self.batch.info(i), i)
        self._ended = terminations | truncations
        return self._observations(), rewards, terminations, truncations, infos

    def _observations(self) -> dict[str, np.ndarray]:
        out = create_empty_array(self.single_observation_space, self.num_envs)
        return concatenate(
            self.single_observation_space, [self.batch.observation(i) for i in range(self.num_envs)], out
        )

    # ---- per sub-episode ----------------------------------------------------------------------------------
    def action_masks(self) -> np.ndarray:
        """(num_envs, 3 * max_modules): each sub-episode's `RankAllocationEnv.action_masks()`."""
        return np.stack([self.batch.action_masks(i) for i in range(self.num_envs)])

    def get_state(self, i: int) -> dict[str, Any]:
        """Everything that determines the rest of sub-episode i (as `RankAllocationEnv.get_state`)."""
        return self.batch.get_state(i)

    def set_state(self, i: int, state: dict[str, Any]) -> None:
        """Return sub-episode i to a state from `get_state` (of this env or a `RankAllocationEnv` of the same
        instance)."""
        self.batch.set_state(i, state)
        self._ended[i] = state["episode"].ended(self.batch.config.decisions)

    def export_adapter(self, i: int, path: str) -> None:
        """Write sub-episode i's current adapter as a standard peft folder."""
        self.batch.export(i, path)

    @property
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of all sub-episodes since construction (probes excluded)."""
        return self.batch.total_optimizer_steps
