"""RankAllocationEnv: one LoRA fine-tuning run as an episode, with the agent as the rank scheduler."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from strato_env import observation as obs
from strato_env.adapters import DynamicLora
from strato_env.config import EnvConfig
from strato_env.costs import allocation_cost, cheapest_nonempty
from strato_env.importance import WeightGradients, gradient_norms, normalized, probe_gains
from strato_env.instance import fresh_model, get_instance
from strato_env.models import MODULE_KINDS

SHRINK, KEEP, GROW = 0, 1, 2
LOSS_RATIO_MAX = 10.0


def data_order(rng: np.random.Generator, pool_size: int, total: int) -> np.ndarray:
    """Row indices of an episode's training batches: shuffled passes over the pool, `total` rows."""
    return np.concatenate([rng.permutation(pool_size) for _ in range(math.ceil(total / pool_size))])[:total]


def episode_randomness(rng: np.random.Generator, pool_size: int, rows: int) -> tuple[int, np.ndarray]:
    """What an episode draws from the env's generator as it starts, in this order: the seed of the adapters'
    torch generator (new A rows), then the row order of its `rows` training examples. Any other training run
    that wants the episode's randomness (e.g. the AdaLoRA baseline) gets it here."""
    return int(rng.integers(2**62)), data_order(rng, pool_size, rows)


@dataclass
class Episode:
    """The state of the current episode besides the adapters, optimizer and random generators."""

    decision: int
    optimizer_steps: int
    order: np.ndarray
    """Row indices of the training batches, in order, for the whole episode."""
    initial_loss: float
    loss: float
    last_gain: float
    gradients: np.ndarray
    """Smoothed ||dL/dW|| per module."""
    diverged: bool = False

    def copy(self) -> Episode:
        return dataclasses.replace(self, order=self.order.copy(), gradients=self.gradients.copy())


STATE_KEYS = ("episode", "lora", "np_random", "generator")


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

    `Dict(modules=Box(max_modules * 12), global=Box(4))`, scale-free so one policy fits any model.
    `modules` is flat (as SB3 prefers); `strato_env.observation.module_table(modules)` gives one row per module
    slot. Read columns by their names in `strato_env.observation` (`IMPORTANCE`, `DEPTH`, `KINDS`, `PRESENT`,
    `BUDGET_USED`, ...), not by number:

    | column (index)         | meaning                                                   | bounds  |
    |------------------------|-----------------------------------------------------------|---------|
    | IMPORTANCE (0)         | probe gain x remaining dL/dW share, min-max scaled        | [0, 1]  |
    | RANK (1)               | rank / r_max                                              | [0, 1]  |
    | PARAMS_PER_RANK (2)    | parameters per unit of rank / B                           | [0, 1]  |
    | DEPTH (3)              | relative depth over every stack (layer / (layers - 1))    | [0, 1]  |
    | KINDS (4-8)            | kind one-hot: attention in, attention out, MLP in, MLP out, other | {0, 1} |
    | ENCODER (9)            | 1 in an encoder stack (BERT; a T5 encoder), 0 in a decoder | {0, 1} |
    | CROSS_ATTENTION (10)   | 1 for an encoder-decoder's cross-attention (T5 `EncDecAttention`) | {0, 1} |
    | PRESENT (11)           | present flag (0 for padding slots, whose features are all 0) | {0, 1} |

    An encoder-decoder's layers are numbered over both stacks, encoder first: a 2 + 2 block T5 has depths
    0, 1/3 (encoder), 2/3 and 1 (decoder). Cross-attention q, k, v and o are attention in / out modules of
    their decoder block with CROSS_ATTENTION set.

    | column (index)     | meaning                                 | bounds    |
    |--------------------|-----------------------------------------|-----------|
    | BUDGET_USED (0)    | budget used, P_t / B                    | [0, 1]    |
    | DECISIONS_LEFT (1) | decisions left / decisions              | [0, 1]    |
    | LOSS_RATIO (2)     | L_t / L_0 (clipped)                     | [0, 10]   |
    | LAST_GAIN (3)      | last loss gain (L_{t-1} - L_t) / L_0    | [-10, 1]  |

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
    | probe_steps     | 10           | steps of the once-per-instance probe of each module alone       |
    | ...             |              | every other field of `strato_env.config.EnvConfig`              |

    `info` holds `loss`, `initial_loss`, `params`, `budget`, `flops_per_token`, `adapter_bytes`,
    `allocation` (module -> rank), `optimizer_steps`, `diverged`, and on planted instances
    `oracle_allocation` and `oracle_loss` (the loss the oracle allocation reaches when kept for the whole
    episode from seed 0, computed once per instance).

    ## Version History

    - v0: initial version.
    - v1: the ENCODER and CROSS_ATTENTION module columns (T5); policies saved under v0 are refused.

    ## Example

    >>> import gymnasium as gym, strato_env
    >>> env = gym.make("strato_env/RankAllocation-v1", decisions=2, inner_steps=1)
    >>> observation, info = env.reset(seed=0)
    >>> observation["modules"].shape, info["params"]
    ((768,), 0)
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("pass either config or keyword arguments, not both")
        self.config = config if config is not None else EnvConfig(**kwargs)
        self.instance = get_instance(self.config)
        self.modules = self.instance.modules
        if len(self.modules) > self.config.max_modules:
            raise ValueError(
                f"max_modules={self.config.max_modules} is invalid: {self.config.model} has {len(self.modules)} "
                f"target modules; allowed: max_modules >= {len(self.modules)}"
            )
        self.data = self.instance.data
        self.ladder = self.config.rank_ladder

        self.lora = DynamicLora(
            fresh_model(self.instance),
            self.modules,
            self.config.learning_rate,
            self.config.weight_decay,
            self.data.modules_to_save,
        )
        self.model = self.lora.peft_model
        self.budget = self.config.budget if self.config.budget is not None else self._default_budget()
        self._check_budget()
        self._base_weights = [self.model.base_model.model.get_submodule(m.name).base_layer.weight for m in self.modules]
        self._static_features = self._module_features()

        n = self.config.max_modules
        self.action_space = spaces.MultiDiscrete([3] * n)
        self.observation_space = spaces.Dict(
            {
                "modules": spaces.Box(0.0, 1.0, (n * obs.MODULE_FEATURES,), np.float32),
                "global": spaces.Box(
                    np.array([0, 0, 0, -LOSS_RATIO_MAX], np.float32),
                    np.array([1, 1, LOSS_RATIO_MAX, 1], np.float32),
                    dtype=np.float32,
                ),
            }
        )
        self._episode: Episode | None = None
        self.total_optimizer_steps = 0
        """Optimizer steps this env has run since construction, over all episodes and `evaluate_allocation`
        calls (returning to a state with `set_state` runs none)."""
        self._base_gradients, self._probe_gains = self._cached_probe()
        self.oracle_loss = self._cached_oracle_loss()

    # ---- public facts about the instance and the episode ---------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        """The current rank of every target module."""
        return self.lora.ranks

    @property
    def extra_params(self) -> int:
        """Trained parameters outside LoRA (a classification head), counted in every allocation's params."""
        return self.lora.extra_params

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
        return self._draw_episode(gym.utils.seeding.np_random(seed)[0])

    def _draw_episode(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        rows = self.config.decisions * self.config.inner_steps * self.config.batch_size
        return episode_randomness(rng, self.data.train_size, rows)

    # ---- validation and instance-level caches -------------------------------------------------------------
    def _default_budget(self) -> int:
        ranks = self.data.oracle_ranks or {m.name: min(4, self.ladder[-1]) for m in self.modules}
        return allocation_cost(self.modules, ranks).params + self.lora.extra_params

    def _check_budget(self) -> None:
        cheapest = cheapest_nonempty(self.modules, self.ladder) + self.lora.extra_params
        if self.budget < cheapest:
            raise ValueError(
                f"budget={self.budget} is smaller than the cheapest non-empty allocation ({cheapest} parameters: "
                f"rank {self.ladder[1]} on the smallest module); allowed: budget >= {cheapest}"
            )
        initial = self.params_of({m.name: self.config.initial_rank for m in self.modules})
        if initial > self.budget:
            raise ValueError(
                f"initial_rank={self.config.initial_rank} on every module needs {initial} parameters, "
                f"over budget={self.budget}"
            )

    def _cached_probe(self) -> tuple[np.ndarray, np.ndarray]:
        """(||dL/dW|| at the base model, probe gain per module): depend on the instance only, so paid once."""
        c = self.config
        key = (c.protocol, c.probe_steps)
        if key not in self.instance.probes:
            n = self.data.train_size
            batches = [
                {k: v[torch.arange(i * c.batch_size, (i + 1) * c.batch_size) % n] for k, v in self.data.train.items()}
                for i in range(max(c.probe_steps, 1))
            ]
            self.lora.reinitialize({})
            norms = gradient_norms(self.model, self._base_weights, self.data.loss, batches[0])
            gains = norms
            if c.probe_steps:
                gains = probe_gains(self.lora, self.ladder[-1], batches, self.data.loss, self.evaluate_loss)
            self.instance.probes[key] = (norms, gains)
        return self.instance.probes[key]

    def _cached_oracle_loss(self) -> float | None:
        if self.data.oracle_ranks is None:
            return None
        return self.static_loss(self.data.oracle_ranks, seed=0)

    def static_loss(self, allocation: dict[str, int], seed: int = 0) -> float:
        """`evaluate_allocation`, remembered per instance and protocol: a repeated call trains nothing."""
        ranks = tuple(int(allocation.get(m.name, 0)) for m in self.modules)
        key = (self.config.protocol, ranks, seed)
        if key not in self.instance.static_losses:
            self.instance.static_losses[key] = self.evaluate_allocation(allocation, seed=seed)
        return self.instance.static_losses[key]

    # ---- costs and features -------------------------------------------------------------------------------
    def params_of(self, allocation: dict[str, int]) -> int:
        return allocation_cost(self.modules, allocation).params + self.lora.extra_params

    def _module_features(self) -> np.ndarray:
        features = np.zeros((self.config.max_modules, obs.MODULE_FEATURES), np.float32)
        for i, m in enumerate(self.modules):
            features[i, obs.PARAMS_PER_RANK] = min(m.params_per_rank / self.budget, 1.0)
            features[i, obs.DEPTH] = m.depth
            features[i, obs.KINDS.start + MODULE_KINDS.index(m.kind)] = 1.0
            features[i, obs.ENCODER] = float(m.stack == "encoder")
            features[i, obs.CROSS_ATTENTION] = float(m.cross_attention)
            features[i, obs.PRESENT] = 1.0
        return features

    # ---- episode ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        allocation = {m.name: self.config.initial_rank for m in self.modules}
        if options and "allocation" in options:
            allocation = self._checked_allocation(options["allocation"])
        self._start_episode(allocation)
        return self._observation(), self._info()

    def _checked_allocation(self, allocation: dict[str, int]) -> dict[str, int]:
        names = {m.name for m in self.modules}
        for name, rank in allocation.items():
            if name not in names:
                raise ValueError(f"allocation names unknown module {name!r}")
            if rank not in self.ladder:
                raise ValueError(f"allocation[{name!r}]={rank} is not on rank_ladder {list(self.ladder)}")
        full = {m.name: int(allocation.get(m.name, 0)) for m in self.modules}
        if self.params_of(full) > self.budget:
            raise ValueError(f"allocation needs {self.params_of(full)} parameters, over budget={self.budget}")
        return full

    def _start_episode(self, allocation: dict[str, int]) -> None:
        torch_seed, order = self._draw_episode(self.np_random)
        self._generator = torch.Generator(device=self.config.device).manual_seed(torch_seed)
        self.lora.reinitialize(allocation, self._generator)
        initial_loss = self.evaluate_loss()
        self._episode = Episode(0, 0, order, initial_loss, initial_loss, 0.0, self._base_gradients.copy())

    @torch.no_grad()
    def evaluate_loss(self, model: torch.nn.Module | None = None) -> float:
        """Loss on the task's fixed evaluation set (batched like training), of the env's model or of `model`."""
        model = model if model is not None else self.model
        size = len(next(iter(self.data.eval.values())))
        total = 0.0
        for start in range(0, size, self.config.batch_size):
            batch = {k: v[start : start + self.config.batch_size] for k, v in self.data.eval.items()}
            total += self.data.loss(model, batch) * len(batch["input_ids"])
        return float(total / size)

    def _checked_action(self, action: Any) -> np.ndarray:
        """The action as an integer array, or a ValueError naming what is wrong with it."""
        array = np.asarray(action)
        if array.shape != self.action_space.shape:
            raise ValueError(
                f"action has shape {array.shape}, expected {self.action_space.shape}: one move per module slot"
            )
        valid = np.isin(array, (SHRINK, KEEP, GROW))
        if not valid.all():
            slot = int(np.argmin(valid))
            raise ValueError(
                f"action[{slot}]={array[slot].item()!r} is invalid: allowed moves are {SHRINK} (shrink), "
                f"{KEEP} (keep) and {GROW} (grow)"
            )
        return array.astype(np.int64)

    def _apply(self, moves: np.ndarray) -> None:
        ranks = self.lora.ranks
        index = {name: self.ladder.index(r) for name, r in ranks.items()}
        moves = moves[: len(self.modules)]
        for m, move in zip(self.modules, moves, strict=True):
            if move == SHRINK and index[m.name] > 0:
                index[m.name] -= 1
        params = self.params_of({name: self.ladder[i] for name, i in index.items()})
        for slot in self.np_random.permutation(len(self.modules)):
            m = self.modules[slot]
            if moves[slot] == GROW and index[m.name] + 1 < len(self.ladder):
                extra = (self.ladder[index[m.name] + 1] - self.ladder[index[m.name]]) * m.params_per_rank
                if params + extra <= self.budget:
                    index[m.name] += 1
                    params += extra
        self.lora.set_ranks({name: self.ladder[i] for name, i in index.items()}, self._generator)

    def _train(self, steps: int) -> None:
        episode = self._episode
        size = self.config.batch_size
        for step in range(steps):
            start = episode.optimizer_steps * size
            rows = torch.as_tensor(episode.order[start : start + size], device=self.config.device)
            batch = {k: v[rows] for k, v in self.data.train.items()}
            last = step == steps - 1
            with WeightGradients(self._base_weights if last else []) as gradients:
                loss = self.data.loss(self.model, batch)
                if loss.requires_grad:  # an empty allocation has nothing to train
                    loss.backward()
                    self.lora.optimizer.step()
                    self.lora.optimizer.zero_grad(set_to_none=True)
                if last:
                    smoothing = self.config.importance_smoothing
                    episode.gradients = smoothing * episode.gradients + (1 - smoothing) * gradients.norms()
            episode.optimizer_steps += 1
            self.total_optimizer_steps += 1

    def step(self, action: np.ndarray):
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        if self._episode.decision >= self.config.decisions or self._episode.diverged:
            raise RuntimeError("the episode has ended; call reset()")
        episode = self._episode
        self._apply(self._checked_action(action))
        self._train(self.config.inner_steps)
        episode.decision += 1
        loss = self.evaluate_loss()
        params = self.params_of(self.lora.ranks)
        if math.isfinite(loss):
            gain = (episode.loss - loss) / episode.initial_loss
            reward = gain - self.config.cost_weight * params / self.budget
            episode.loss, episode.last_gain = loss, gain
            terminated = False
        else:
            reward = -self.config.divergence_penalty
            episode.diverged = terminated = True
        truncated = not terminated and episode.decision >= self.config.decisions
        info = self._info()
        info["loss"] = loss
        return self._observation(), float(reward), terminated, truncated, info

    def evaluate_allocation(self, allocation: dict[str, int], seed: int = 0) -> float:
        """Final loss of `allocation` kept fixed for a whole episode from `seed` (budget not enforced).

        The env's current episode and random state are left as they were.
        """
        saved = (self.get_state() if self._episode is not None else None, self._np_random)
        self._np_random, _ = gym.utils.seeding.np_random(seed)
        self._start_episode({m.name: int(allocation.get(m.name, 0)) for m in self.modules})
        self._train(self.config.decisions * self.config.inner_steps)
        loss = self.evaluate_loss()
        state, self._np_random = saved
        if state is None:
            self._episode = None
        else:
            self.set_state(state)
        return loss

    @property
    def probe_optimizer_steps(self) -> int:
        """Optimizer steps of the once-per-instance probe behind the importance feature (`probe_steps` on each
        module alone). It is cached per instance and not counted in `total_optimizer_steps`."""
        return self.config.probe_steps * len(self.modules)

    @property
    def decisions_made(self) -> int:
        """Decisions taken in the current episode (0 before the first reset)."""
        return self._episode.decision if self._episode is not None else 0

    # ---- masks, observation, info -------------------------------------------------------------------------
    def action_masks(self) -> np.ndarray:
        mask = np.zeros((self.config.max_modules, 3), dtype=bool)
        mask[:, KEEP] = True
        ranks = self.lora.ranks
        params = self.params_of(ranks)
        for slot, m in enumerate(self.modules):
            i = self.ladder.index(ranks[m.name])
            mask[slot, SHRINK] = i > 0
            if i + 1 < len(self.ladder):
                mask[slot, GROW] = params + (self.ladder[i + 1] - self.ladder[i]) * m.params_per_rank <= self.budget
        return mask.reshape(-1)

    def _observation(self) -> dict[str, np.ndarray]:
        episode = self._episode
        modules = self._static_features.copy()
        n = len(self.modules)
        remaining = np.divide(episode.gradients, self._base_gradients, out=np.zeros(n), where=self._base_gradients > 0)
        modules[:n, obs.IMPORTANCE] = normalized(self._probe_gains * remaining)
        modules[:n, obs.RANK] = np.array(list(self.lora.ranks.values())) / self.ladder[-1]
        ratio = episode.loss / episode.initial_loss if episode.initial_loss > 0 else 0.0
        global_ = np.zeros(obs.GLOBAL_FEATURES, np.float32)
        global_[obs.BUDGET_USED] = min(self.params_of(self.lora.ranks) / self.budget, 1.0)
        global_[obs.DECISIONS_LEFT] = 1 - episode.decision / self.config.decisions
        global_[obs.LOSS_RATIO] = min(ratio, LOSS_RATIO_MAX)
        global_[obs.LAST_GAIN] = np.clip(episode.last_gain, -LOSS_RATIO_MAX, 1.0)
        return {"modules": modules.reshape(-1), "global": global_}

    def _info(self) -> dict[str, Any]:
        ranks = self.lora.ranks
        cost = allocation_cost(self.modules, ranks)
        info = {
            "loss": self._episode.loss,
            "initial_loss": self._episode.initial_loss,
            "params": cost.params + self.lora.extra_params,
            "budget": self.budget,
            "flops_per_token": cost.flops_per_token,
            "adapter_bytes": cost.adapter_bytes + 4 * self.lora.extra_params,
            "allocation": ranks,
            "optimizer_steps": self._episode.optimizer_steps,
            "diverged": self._episode.diverged,
        }
        if (oracle := self.oracle_allocation) is not None:
            info["oracle_allocation"] = oracle
            info["oracle_loss"] = self.oracle_loss
        return info

    # ---- snapshots and export -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything that determines the rest of the episode: adapters, optimizer, data position, RNGs."""
        if self._episode is None:
            raise RuntimeError("call reset() before get_state()")
        return {
            "episode": self._episode.copy(),
            "lora": self.lora.snapshot(),
            "np_random": self.np_random.bit_generator.state,
            "generator": self._generator.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Return to a state returned by `get_state()` of an env of the same instance."""
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS) or not isinstance(state["episode"], Episode):
            what = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state={what} is invalid: expected a dict returned by get_state() (keys {list(STATE_KEYS)})"
            )
        if set(state["lora"]["factors"]) != {m.name for m in self.modules}:
            raise ValueError("state is invalid: it comes from an env with other target modules")
        self._episode = state["episode"].copy()
        self.lora.restore(state["lora"])
        self.np_random.bit_generator.state = state["np_random"]
        self._generator = torch.Generator(device=self.config.device)
        self._generator.set_state(state["generator"])

    def export_adapter(self, path: str) -> None:
        """Write the current adapter as a standard peft folder (`rank_pattern` in adapter_config.json)."""
        self.lora.export(path, self.config.model)
