"""RankAllocationEnv: one LoRA fine-tuning run as an episode, with the agent as the rank scheduler."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from strato_env import observation as obs
from strato_env.config import EnvConfig
from strato_env.episodes import (
    GROW,
    KEEP,
    LOSS_RATIO_MAX,
    SHRINK,
    STATE_KEYS,
    Episode,
    EpisodeBatch,
    data_order,
    episode_randomness,
    evaluate_model,
)
from strato_env.instance import fresh_model

__all__ = [
    "GROW",
    "KEEP",
    "SHRINK",
    "STATE_KEYS",
    "Episode",
    "RankAllocationEnv",
    "check_action",
    "data_order",
    "episode_randomness",
    "observation_space",
]


def observation_space(max_modules: int) -> spaces.Dict:
    """The observation space of one env (one sub-episode) with `max_modules` slots."""
    return spaces.Dict(
        {
            "modules": spaces.Box(0.0, 1.0, (max_modules * obs.MODULE_FEATURES,), np.float32),
            "global": spaces.Box(
                np.array([0, 0, 0, -LOSS_RATIO_MAX, 0], np.float32),
                np.array([1, 1, LOSS_RATIO_MAX, 1, 1], np.float32),
                dtype=np.float32,
            ),
        }
    )


def check_action(action: Any, shape: tuple[int, ...], where: str = "action") -> np.ndarray:
    """The action as an integer array, or a ValueError naming what is wrong with it."""
    array = np.asarray(action)
    if array.shape != shape:
        raise ValueError(f"{where} has shape {array.shape}, expected {shape}: one move per module slot")
    valid = np.isin(array, (SHRINK, KEEP, GROW))
    if not valid.all():
        slot = tuple(int(k) for k in np.argwhere(~valid)[0])
        slot_text = slot[0] if len(slot) == 1 else list(slot)
        raise ValueError(
            f"{where}[{slot_text}]={array[slot].item()!r} is invalid: allowed moves are {SHRINK} (shrink), "
            f"{KEEP} (keep) and {GROW} (grow)"
        )
    return array.astype(np.int64)


class RankAllocationEnv(gym.Env):
    """
    ## Description

    One episode is one LoRA fine-tuning run of one instance (a base model and a task). The agent is the
    rank scheduler: before every block of `inner_steps` AdamW steps it may shrink, keep or grow the LoRA rank
    of each target module by one step on a rank ladder (default `0, 1, 2, 4, 8, 16`; rank 0 = not adapted),
    under a budget `B` of trainable parameters. Growing keeps the model's function (new directions start at
    zero output); shrinking keeps the truncated SVD of the module's update `B @ A`; Adam moments follow.

    ## Action Space

    `MultiDiscrete([3] * max_modules)`: per module slot `0` shrink, `1` keep, `2` grow; any other value or
    shape raises a `ValueError`. `action_masks()`
    gives the flat boolean mask (length `3 * max_modules`) that sb3-contrib's MaskablePPO reads: no rank off
    the ladder, no grow that alone would break the budget, padding slots may only keep. Unmasked agents may
    send anything: a move off the ladder is ignored; shrinks apply first, then grows in a random order
    (from the env's seed), each skipped if it would break the budget. The allocation never exceeds `B`.

    ## Observation Space

    `Dict(modules=Box(max_modules * 15), global=Box(5))`, scale-free so one policy fits any model.
    `modules` is flat (as SB3 prefers); `strato_env.observation.module_table(modules)` gives one row per module
    slot. Read columns by their names in `strato_env.observation` (`IMPORTANCE`, `DEPTH`, `KINDS`, `PRESENT`,
    `BUDGET_USED`, ...), not by number (layout v3):

    | column (index)         | meaning                                                   | bounds  |
    |------------------------|-----------------------------------------------------------|---------|
    | IMPORTANCE (0)         | probe gain x remaining dL/dW share, min-max scaled        | [0, 1]  |
    | RANK (1)               | rank / r_max                                              | [0, 1]  |
    | PARAMS_PER_RANK (2)    | parameters per unit of rank / B                           | [0, 1]  |
    | GROW_COST (3)          | parameters the next ladder step adds / B (0 at r_max)     | [0, 1]  |
    | COST_AHEAD (4)         | GROW_COST summed over the more important modules, clipped | [0, 1]  |
    | GROW_SHARE (5)         | share of the probe's update the next ladder step adds (0 at r_max) | [0, 1] |
    | DEPTH (6)              | relative depth over every stack (layer / (layers - 1))    | [0, 1]  |
    | KINDS (7-11)           | kind one-hot: attention in, attention out, MLP in, MLP out, other | {0, 1} |
    | ENCODER (12)           | 1 in an encoder stack (BERT; a T5 encoder), 0 in a decoder | {0, 1} |
    | CROSS_ATTENTION (13)   | 1 for an encoder-decoder's cross-attention (T5 `EncDecAttention`) | {0, 1} |
    | PRESENT (14)           | present flag (0 for padding slots, whose features are all 0) | {0, 1} |

    GROW_SHARE reads the probe's trained rank-r_max update of the module, `U S V^T`: the share of `sum(S^2)` that
    the singular values between its rank and its next ladder rank hold (`strato_env.importance.energy_shares`).
    Importance x GROW_SHARE estimates what that ladder step gains. With `probe_steps=0` (no update) the shares
    are linear in the rank.

    An encoder-decoder's layers are numbered over both stacks, encoder first: a 2 + 2 block T5 has depths
    0, 1/3 (encoder), 2/3 and 1 (decoder). Cross-attention q, k, v and o are attention in / out modules of
    their decoder block with CROSS_ATTENTION set.

    | column (index)     | meaning                                 | bounds    |
    |--------------------|-----------------------------------------|-----------|
    | BUDGET_USED (0)    | budget used, P_t / B                    | [0, 1]    |
    | DECISIONS_LEFT (1) | decisions left / decisions              | [0, 1]    |
    | LOSS_RATIO (2)     | L_t / L_0 (clipped)                     | [0, 10]   |
    | LAST_GAIN (3)      | last loss gain (L_{t-1} - L_t) / L_0    | [-10, 1]  |
    | DECISION_SHARE (4) | 1 / decisions                           | [0, 1]    |

    ## Rewards

    `r_t = (L_{t-1} - L_t) / L_0 - cost_weight * P_t / B`, where `L` is the loss on the task's fixed
    evaluation set, `P_t` the trainable parameters after decision `t` and `B` the budget. Over an episode the
    first term sums to the relative loss reduction. On divergence the reward is `-divergence_penalty`.

    ## Starting State

    Every module at `initial_rank` (default 0), A drawn from the episode's seed, B = 0, a fresh optimizer,
    and a data order drawn from the seed. `reset(options={"allocation": {module: rank}})` starts from a given
    allocation instead (on the ladder, within budget).

    ## Episode End

    - Termination: the evaluation loss becomes NaN or inf (training diverged).
    - Truncation: after `decisions` decisions.

    ## Arguments

    | argument        | default      | meaning                                                         |
    |-----------------|--------------|-----------------------------------------------------------------|
    | model           | "gpt2-tiny"  | tiny preset, hub id or local directory                          |
    | task            | planted      | `TaskConfig` or dict: planted, causal_lm or classification        |
    | rank_ladder     | 0,1,2,4,8,16 | allowed ranks                                                   |
    | budget          | None         | B in parameters; None: the oracle's count (planted) or uniform rank 4 |
    | cost_weight     | 0.001        | lambda of the reward                                            |
    | decisions       | 8            | decisions per episode                                           |
    | inner_steps     | 20           | optimizer steps per decision                                    |
    | probe_steps     | 80           | steps of the once-per-instance importance probe                 |
    | probe           | "joint"      | probe all modules together and remove one at a time, or each alone |
    | ...             |              | every other field of `strato_env.config.EnvConfig`              |

    `info` holds `loss`, `initial_loss`, `params`, `budget`, `flops_per_token`, `adapter_bytes`,
    `allocation` (module -> rank), `optimizer_steps`, `diverged`, and on planted instances
    `oracle_allocation` and `oracle_loss` (the loss the oracle allocation reaches when kept for the whole
    episode from seed 0, computed once per instance).

    ## Many episodes at once

    This env is the one-episode case of `strato_env.episodes.EpisodeBatch`, which trains N episodes over one
    base model with one forward pass per optimizer step (`strato_env.engine`).
    `gym.make_vec("strato_env/RankAllocation-v3", num_envs=N, vectorization_mode="vector_entry_point")` gives
    `strato_env.vector.RankAllocationVecEnv`, whose sub-episode i matches this env driven with the same seed and
    actions (allocations exactly, losses to float summation order).

    ## Version History

    - v0: initial version.
    - v1: the ENCODER and CROSS_ATTENTION module columns (T5); policies saved under v0 are refused.

    ## Example

    >>> import gymnasium as gym, strato_env
    >>> env = gym.make("strato_env/RankAllocation-v3", decisions=2, inner_steps=1)
    >>> observation, info = env.reset(seed=0)
    >>> observation["modules"].shape, info["params"]
    ((768,), 0)
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("pass either config or keyword arguments, not both")
        self.config = config if config is not None else EnvConfig(**kwargs)
        self.batch = EpisodeBatch([self.config])
        self.instance = self.batch.subs[0].instance
        self.modules = self.batch.modules
        self.data = self.instance.data
        self.ladder = self.config.rank_ladder
        self.budget = self.batch.subs[0].budget
        self.action_space = spaces.MultiDiscrete([3] * self.config.max_modules)
        self.observation_space = observation_space(self.config.max_modules)
        self._side_batches: dict[int, EpisodeBatch] = {}
        self.oracle_loss = self.static_loss(self.data.oracle_ranks, seed=0) if self.data.oracle_ranks else None

    # ---- public facts about the instance and the episode ---------------------------------------------------
    @property
    def _episode(self) -> Episode | None:
        return self.batch.subs[0].episode

    @property
    def ranks(self) -> dict[str, int]:
        """The current rank of every target module."""
        return self.batch.ranks(0)

    @property
    def extra_params(self) -> int:
        """Trained parameters outside LoRA (a classification head), counted in every allocation's params."""
        return self.batch.extra_params

    @property
    def total_optimizer_steps(self) -> int:
        """Optimizer steps this env has run since construction, over all episodes, `evaluate_allocation` calls
        and its `sub_episodes` batches (returning to a state with `set_state` runs none)."""
        return self.batch.total_optimizer_steps + sum(b.total_optimizer_steps for b in self._side_batches.values())

    def sub_episodes(self, width: int) -> EpisodeBatch:
        """`width` episodes of this env's instance and protocol trained together on the batched engine, for
        searches that explore several states at once (e.g. Go-Explore's `parallel`); their optimizer steps count
        in `total_optimizer_steps`, and `get_state()` states move between them and this env."""
        if width not in self._side_batches:
            self._side_batches[width] = EpisodeBatch([self.config] * width)
        return self._side_batches[width]

    @property
    def oracle_allocation(self) -> dict[str, int] | None:
        """Planted instances: the ranks of the teacher's updates (the optimal allocation); None otherwise."""
        return dict(self.data.oracle_ranks) if self.data.oracle_ranks is not None else None

    @property
    def data_order(self) -> np.ndarray:
        """Row indices into the task's training pool of the current episode's batches, in training order."""
        if self._episode is None:
            raise RuntimeError("call reset() before reading data_order")
        return self._episode.order.copy()

    def fresh_base_model(self) -> torch.nn.Module:
        """A private copy of the frozen base model (no adapters), on the env's device."""
        return fresh_model(self.instance)

    def episode_randomness(self, seed: int) -> tuple[int, np.ndarray]:
        """(torch generator seed, data order) that an episode started by `reset(seed=seed)` uses."""
        return self.batch.draw_episode(gym.utils.seeding.np_random(seed)[0], self.data)

    def params_of(self, allocation: dict[str, int]) -> int:
        return self.batch.params_of(allocation)

    def static_loss(self, allocation: dict[str, int], seed: int = 0) -> float:
        """`evaluate_allocation`, remembered per instance and protocol: a repeated call trains nothing."""
        ranks = tuple(int(allocation.get(m.name, 0)) for m in self.modules)
        key = (self.config.protocol, ranks, seed)
        if key not in self.instance.static_losses:
            self.instance.static_losses[key] = self.evaluate_allocation(allocation, seed=seed)
        return self.instance.static_losses[key]

    def evaluate_allocation(self, allocation: dict[str, int], seed: int = 0, split: str = "eval") -> float:
        """Final loss of `allocation` kept fixed for a whole episode from `seed` (budget not enforced), on the
        validation set (`split='eval'`, the env's loss) or the held-out test set (`split='test'`).

        The env's current episode and random state are left as they were."""
        return self.evaluate_allocations([allocation], [seed], split)[0]

    def evaluate_allocations(
        self, allocations: list[dict[str, int]], seeds: list[int], split: str = "eval"
    ) -> list[float]:
        """`evaluate_allocation` of many allocations (each with its seed), trained together in one batch."""
        return self.batch.static_losses(0, allocations, seeds, split)

    # ---- episode ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        allocation = options.get("allocation") if options else None
        sub = self.batch.subs[0]
        if seed is None and sub.rng is None:
            sub.rng = self.np_random  # gym's own generator, seeded at random on first use
        self.batch.start([0], [seed], [allocation])
        self._np_random = sub.rng
        return self._observation(), self._info()

    def evaluate_loss(self, model: torch.nn.Module | None = None, split: str = "eval") -> float:
        """Loss on the task's validation set (`split='eval'`, the env's loss) or held-out test set
        (`split='test'`), batched like training, of the env's adapter now or of `model` (any model, e.g. a peft
        model loaded from an exported adapter)."""
        if model is not None:
            return evaluate_model(model, self.data, self.config.batch_size, split)
        return float(self.batch.evaluate(split)[0])

    def step(self, action: np.ndarray):
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        if self._episode.ended(self.config.decisions):
            raise RuntimeError("the episode has ended; call reset()")
        moves = check_action(action, self.action_space.shape)
        reward, terminated, truncated, info = self.batch.step({0: moves})[0]
        self._add_oracle(info)
        return self._observation(), reward, terminated, truncated, info

    @property
    def probe_optimizer_steps(self) -> int:
        """Optimizer steps of the once-per-instance probe behind the importance feature (`probe_steps` on each
        module alone, or `probe_steps` in all with `probe='joint'`). It is cached per instance and not counted in
        `total_optimizer_steps`."""
        return self.config.probe_optimizer_steps(len(self.modules))

    @property
    def probe_energy(self) -> np.ndarray:
        """(modules, r_max + 1): the share of each module's probe update that rank r keeps (the GROW_SHARE column
        reads it; `strato_env.importance.energy_shares`). Cached per instance like the probe."""
        return self.batch.subs[0].probe_energy.copy()

    @property
    def decisions_made(self) -> int:
        """Decisions taken in the current episode (0 before the first reset)."""
        return self._episode.decision if self._episode is not None else 0

    # ---- masks, observation, info -------------------------------------------------------------------------
    def action_masks(self) -> np.ndarray:
        return self.batch.action_masks(0)

    def _observation(self) -> dict[str, np.ndarray]:
        return self.batch.observation(0)

    def _info(self) -> dict[str, Any]:
        return self._add_oracle(self.batch.info(0))

    def _add_oracle(self, info: dict[str, Any]) -> dict[str, Any]:
        if self.oracle_loss is not None:
            info["oracle_loss"] = self.oracle_loss
        return info

    # ---- snapshots and export -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything that determines the rest of the episode: adapters, optimizer, data position, RNGs."""
        return self.batch.get_state(0)

    def set_state(self, state: dict[str, Any]) -> None:
        """Return to a state returned by `get_state()` of an env of the same instance."""
        self.batch.set_state(0, state)
        self._np_random = self.batch.subs[0].rng

    def export_adapter(self, path: str) -> None:
        """Write the current adapter as a standard peft folder (`rank_pattern` in adapter_config.json)."""
        self.batch.export(0, path)

    def peft_model(self) -> torch.nn.Module:
        """The current adapter on a fresh copy of the base model, as a peft model (what `export_adapter` writes)."""
        return self.batch.peft_model(0)
