"""N rank-allocation episodes on one base model, trained together by the batched engine.

`EpisodeBatch` is the one implementation behind `RankAllocationEnv` (N = 1) and `RankAllocationVecEnv`:
moves, budget, training, rewards, observations, masks and snapshots of every sub-episode, with one forward
and backward pass of the base per optimizer step for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from strato_env import observation as obs
from strato_env.config import EnvConfig
from strato_env.costs import allocation_cost, cheapest_nonempty
from strato_env.engine import BatchedLora, BatchedModel, check_width_fits, episode_bytes
from strato_env.importance import energy_shares, normalized
from strato_env.instance import Instance, fresh_model, get_instance
from strato_env.models import MODULE_KINDS
from strato_env.tasks.base import Batch, Loss, TaskData

SHRINK, KEEP, GROW = 0, 1, 2
LOSS_RATIO_MAX = 10.0
SHARED_FIELDS = (
    "model",
    "target_modules",
    "model_seed",
    "device",
    "rank_ladder",
    "decisions",
    "inner_steps",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "max_modules",
    "probe_steps",
    "probe",
    "importance_smoothing",
)
"""EnvConfig fields every sub-episode of one batch shares (they train in lockstep on one base model); the
task, budget, cost_weight, divergence_penalty and initial_rank may differ."""
STATE_KEYS = ("episode", "lora", "np_random", "generator")
PROBE_WIDTH = 16
"""Module removals the joint probe evaluates together."""


def data_order(rng: np.random.Generator, pool_size: int, total: int) -> np.ndarray:
    """Row indices of an episode's training batches: shuffled passes over the pool, `total` rows."""
    return np.concatenate([rng.permutation(pool_size) for _ in range(math.ceil(total / pool_size))])[:total]


def episode_randomness(rng: np.random.Generator, pool_size: int, rows: int) -> tuple[int, np.ndarray]:
    """What an episode draws from its generator as it starts, in this order: the seed of the adapters'
    torch generator (new A rows), then the row order of its `rows` training examples. Any other training run
    that wants the episode's randomness (e.g. the AdaLoRA baseline) gets it here."""
    return int(rng.integers(2**62)), data_order(rng, pool_size, rows)


@dataclass
class Episode:
    """The state of one episode besides the adapters, optimizer and random generators."""

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

    def ended(self, decisions: int) -> bool:
        return self.diverged or self.decision >= decisions


def stack(batches: Sequence[Batch]) -> Batch:
    """The episodes' batches stacked along the batch dimension, in episode order."""
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


@torch.no_grad()
def evaluate_losses(
    target: BatchedModel, lora: BatchedLora, datas: Sequence[TaskData], batch_size: int, split: str = "eval"
) -> np.ndarray:
    """Loss of each of `lora`'s episodes on its task's `split` (validation or test set), batched like training."""
    splits = [d.rows(split) for d in datas]
    size = len(next(iter(splits[0].values())))
    total = torch.zeros(lora.episodes, dtype=torch.float64)
    with target.using(lora) as model:
        for start in range(0, size, batch_size):
            batch = stack([{k: v[start : start + batch_size] for k, v in rows.items()} for rows in splits])
            rows = min(batch_size, size - start)
            total += datas[0].loss(model, batch, lora.episodes).double().cpu() * rows
    return (total / size).numpy()


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data: TaskData, batch_size: int, split: str = "eval") -> float:
    """Loss of any model (e.g. a peft model) on `data`'s `split`, batched like training."""
    rows = data.rows(split)
    size = len(next(iter(rows.values())))
    total = 0.0
    for start in range(0, size, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        total += float(data.loss(model, batch)[0]) * min(batch_size, size - start)
    return total / size


def train_step(
    target: BatchedModel,
    lora: BatchedLora,
    loss: Loss,
    batches: Sequence[Batch],
    training: Sequence[int],
    record: bool = False,
) -> np.ndarray | None:
    """One AdamW step of the `training` episodes on their batches (one per episode, in order); the others
    are left as they were. With `record`, also returns ||dL/dW|| of every target module's frozen weight per
    episode (episodes x modules), read from the same backward pass."""
    recording = target.recording_weight_gradients(lora.episodes) if record else contextlib.nullcontext()
    with target.using(lora) as model, recording as recorded:
        losses = loss(model, stack(batches), lora.episodes)
        if lora.trains_anything:
            lora.backward_and_step(losses, training)
        elif record and len(training):  # nothing to train: the backward pass only reads the weight gradients
            losses[list(training)].sum().backward()
        return recorded.double().cpu().numpy() if record else None


@dataclass
class SubEpisode:
    """One sub-episode's instance, budget, fixed features and random state."""

    config: EnvConfig
    instance: Instance
    budget: int
    static_features: np.ndarray
    base_gradients: np.ndarray
    """||dL/dW|| per module at the base model (the probe's first batch)."""
    probe_gains: np.ndarray
    probe_energy: np.ndarray
    """Per module, the share of its probe update that rank r keeps, r = 0 .. r_max (`importance.energy_shares`)."""
    rng: np.random.Generator | None = None
    generator: torch.Generator | None = None
    episode: Episode | None = None

    @property
    def data(self) -> TaskData:
        return self.instance.data


def _check_compatible(configs: Sequence[EnvConfig], instances: Sequence[Instance]) -> None:
    first = configs[0]
    for i, config in enumerate(configs[1:], start=1):
        for name in SHARED_FIELDS:
            if getattr(config, name) != getattr(first, name):
                raise ValueError(
                    f"configs[{i}].{name}={getattr(config, name)!r} differs from configs[0].{name}="
                    f"{getattr(first, name)!r}: sub-episodes of one batch share {', '.join(SHARED_FIELDS)}"
                )
    data = instances[0].data
    for i, instance in enumerate(instances[1:], start=1):
        other = instance.data
        same = other.loss is data.loss and other.modules_to_save == data.modules_to_save
        for split in ("train", "eval", "test"):  # training pools may differ in size, evaluation sets may not
            a, b = getattr(data, split), getattr(other, split)
            dims = slice(1, None) if split == "train" else slice(None)
            same = same and set(a) == set(b) and all(a[k].shape[dims] == b[k].shape[dims] for k in a)
        if not same:
            raise ValueError(
                f"configs[{i}].task ({configs[i].label}) cannot share a batch with configs[0].task ({first.label}): "
                "sub-episodes of one batch need the same task kind and tensor shapes (same loss, sequence length "
                "and evaluation-set sizes); their planted teachers, seeds and data may differ"
            )


class EpisodeBatch:
    """`len(configs)` rank-allocation episodes on one base model (see `RankAllocationEnv` for their meaning)."""

    def __init__(self, configs: Sequence[EnvConfig]) -> None:
        if not configs:
            raise ValueError("configs is empty: an episode batch needs at least one EnvConfig")
        self.configs = list(configs)
        self.config = self.configs[0]
        first, c = get_instance(self.config), self.config
        tokens = first.data.train["input_ids"].shape[1]
        self._episode_bytes = episode_bytes(first.modules, c.rank_ladder[-1], first.model.config, c.batch_size, tokens)
        check_width_fits(len(self.configs), self._episode_bytes, torch.device(c.device))
        instances = [first] + [get_instance(config) for config in self.configs[1:]]
        _check_compatible(self.configs, instances)
        self.modules = instances[0].modules
        if len(self.modules) > self.config.max_modules:
            raise ValueError(
                f"max_modules={self.config.max_modules} is invalid: {self.config.model} has {len(self.modules)} "
                f"target modules; allowed: max_modules >= {len(self.modules)}"
            )
        self.ladder = self.config.rank_ladder
        self.loss = instances[0].data.loss
        self.target = BatchedModel(fresh_model(instances[0]), self.modules, instances[0].data.modules_to_save)
        self.lora = self._new_lora(len(self.configs))
        self.extra_params = self.lora.extra_params
        self.total_optimizer_steps = 0
        """Optimizer steps of all sub-episodes since construction, over all episodes and static evaluations
        (returning to a state with `set_state` runs none)."""
        self.subs: list[SubEpisode] = []
        for config, instance in zip(self.configs, instances, strict=True):
            budget = config.budget if config.budget is not None else self._default_budget(instance)
            self._check_budget(config, budget)
            norms, gains, energy = self._cached_probe(instance)
            self.subs.append(SubEpisode(config, instance, budget, self._module_features(budget), norms, gains, energy))

    @property
    def size(self) -> int:
        return len(self.subs)

    def _new_lora(self, episodes: int) -> BatchedLora:
        c = self.config
        return BatchedLora(self.target, episodes, self.ladder[-1], c.learning_rate, c.weight_decay)

    # ---- budgets and costs --------------------------------------------------------------------------------
    def params_of(self, allocation: dict[str, int]) -> int:
        return allocation_cost(self.modules, allocation).params + self.extra_params

    def _default_budget(self, instance: Instance) -> int:
        ranks = instance.data.oracle_ranks or {m.name: min(4, self.ladder[-1]) for m in self.modules}
        return self.params_of(ranks)

    def _check_budget(self, config: EnvConfig, budget: int) -> None:
        cheapest = cheapest_nonempty(self.modules, self.ladder) + self.extra_params
        if budget < cheapest:
            raise ValueError(
                f"budget={budget} is smaller than the cheapest non-empty allocation ({cheapest} parameters: "
                f"rank {self.ladder[1]} on the smallest module); allowed: budget >= {cheapest}"
            )
        initial = self.params_of({m.name: config.initial_rank for m in self.modules})
        if initial > budget:
            raise ValueError(
                f"initial_rank={config.initial_rank} on every module needs {initial} parameters, over budget={budget}"
            )

    def ranks(self, i: int) -> dict[str, int]:
        return {m.name: int(r) for m, r in zip(self.modules, self.lora.ranks[i], strict=True)}

    # ---- runs outside the sub-episodes: probes and static allocations ---------------------------------------
    def training_batch(self, data: TaskData, order: np.ndarray, step: int) -> Batch:
        """Training step `step`'s rows of `data` in the row order `order`."""
        size = self.config.batch_size
        rows = torch.as_tensor(order[step * size : (step + 1) * size], device=self.config.device)
        return {k: v[rows] for k, v in data.train.items()}

    def _cached_probe(self, instance: Instance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(||dL/dW|| at the base model, probe gain, energy shares) per module: depend on the instance only, so
        paid once.

        The probe (`EnvConfig.probe`) trains rank-r_max updates for `probe_steps` steps: on each module alone
        ('single', all modules at once, one episode each; a module's gain is its relative drop of the evaluation
        loss) or on every module together ('joint'; a module's gain is the relative rise of the evaluation loss
        when its update is removed). A module's energy shares (modules x (r_max + 1)) are
        `importance.energy_shares` of its trained update: how much of it rank r keeps."""
        c = self.config
        key = (c.protocol, c.probe, c.probe_steps)
        if key not in instance.probes:
            data, n, modules = instance.data, instance.data.train_size, len(self.modules)
            order = np.arange(max(c.probe_steps, 1) * c.batch_size) % n
            base = self._new_lora(1)  # rank 0 everywhere, the initial heads
            initial = float(evaluate_losses(self.target, base, [data], c.batch_size)[0])
            with self.target.using(base) as model, self.target.recording_weight_gradients(1) as recorded:
                self.loss(model, self.training_batch(data, order, 0), 1).sum().backward()  # no optimizer step
            norms = recorded[0].double().cpu().numpy()
            gains, trained, episode_of = norms, base, [0] * modules  # no probe: rank-0 updates, linear shares
            if c.probe_steps:
                if c.probe == "joint":
                    trained, joint, removed = self._removal_losses(data, order)
                    changes = (removed - joint) / initial if initial > 0 else np.zeros_like(removed)
                else:
                    top = self.ladder[-1]
                    starts = [([top if k == j else 0 for k in range(modules)], 0) for j in range(modules)]
                    trained = self._train_together(data, starts, [order] * len(starts), c.probe_steps)
                    losses = evaluate_losses(self.target, trained, [data] * modules, c.batch_size)
                    changes = (initial - losses) / initial if initial > 0 else np.zeros_like(losses)
                    episode_of = list(range(modules))
                gains = np.where(np.isfinite(changes), np.maximum(changes, 0.0), 0.0)
            energy = np.stack([
                energy_shares(trained.B[j][k], trained.A[j][k]) for j, k in zip(range(modules), episode_of, strict=True)
            ])  # fmt: skip
            instance.probes[key] = (norms, gains, energy)
        return instance.probes[key]

    def _removal_losses(self, data: TaskData, order: np.ndarray) -> tuple[BatchedLora, float, np.ndarray]:
        """The joint probe: one rank-r_max update on every module, trained for `probe_steps` steps in row order
        `order`. Returns it, its evaluation loss and, for each module j, the evaluation loss with module j's
        update removed (PROBE_WIDTH removals evaluated together)."""
        c, modules = self.config, len(self.modules)
        joint = self._train_together(data, [([self.ladder[-1]] * modules, 0)], [order], c.probe_steps)
        trained = joint.snapshot(0)
        losses = []
        for first in range(0, modules, PROBE_WIDTH):
            removed = range(first, min(first + PROBE_WIDTH, modules))
            lora = self._new_lora(len(removed))
            for k, module in enumerate(removed):
                lora.restore(k, trained)
                lora.set_rank(k, module, 0)
            losses.append(evaluate_losses(self.target, lora, [data] * len(removed), c.batch_size))
        return joint, float(evaluate_losses(self.target, joint, [data], c.batch_size)[0]), np.concatenate(losses)

    def static_losses(
        self, i: int, allocations: Sequence[dict[str, int]], seeds: Sequence[int], split: str = "eval"
    ) -> list[float]:
        """Final loss on `split` of each allocation kept fixed for a whole episode of sub-episode i's instance,
        started from its seed (budget not enforced), all trained together. Sub-episodes are left as they were."""
        c, data = self.config, self.subs[i].data
        starts, orders = [], []
        for allocation, seed in zip(allocations, seeds, strict=True):
            torch_seed, order = self.draw_episode(gym.utils.seeding.np_random(seed)[0], data)
            starts.append(([int(allocation.get(m.name, 0)) for m in self.modules], torch_seed))
            orders.append(order)
        steps = c.decisions * c.inner_steps
        lora = self._train_together(data, starts, orders, steps)
        losses = evaluate_losses(self.target, lora, [data] * len(starts), c.batch_size, split)
        self.total_optimizer_steps += steps * len(allocations)
        return [float(x) for x in losses]

    def _train_together(
        self, data: TaskData, starts: Sequence[tuple[list[int], int]], orders: Sequence[np.ndarray], steps: int
    ) -> BatchedLora:
        """Episodes apart from the sub-episodes, on one instance's `data`, trained together: episode k starts at
        starts[k] = (rank per module, seed of its adapters' generator) and takes `steps` steps in row order
        orders[k]. Returns their adapters."""
        check_width_fits(len(starts), self._episode_bytes, torch.device(self.config.device), where="episodes")
        lora = self._new_lora(len(starts))
        for k, (ranks, seed) in enumerate(starts):
            lora.reset(k, ranks, torch.Generator(self.config.device).manual_seed(seed))
        everyone = range(len(starts))
        for step in range(steps):
            batches = [self.training_batch(data, order, step) for order in orders]
            train_step(self.target, lora, self.loss, batches, everyone)
        return lora

    def draw_episode(self, rng: np.random.Generator, data: TaskData) -> tuple[int, np.ndarray]:
        """(adapter generator seed, row order) an episode on `data` draws from `rng` as it starts."""
        c = self.config
        return episode_randomness(rng, data.train_size, c.decisions * c.inner_steps * c.batch_size)

    # ---- episodes -----------------------------------------------------------------------------------------
    def checked_allocation(self, i: int, allocation: dict[str, int]) -> dict[str, int]:
        names = {m.name for m in self.modules}
        for name, rank in allocation.items():
            if name not in names:
                raise ValueError(f"allocation names unknown module {name!r}")
            if rank not in self.ladder:
                raise ValueError(f"allocation[{name!r}]={rank} is not on rank_ladder {list(self.ladder)}")
        full = {m.name: int(allocation.get(m.name, 0)) for m in self.modules}
        if self.params_of(full) > self.subs[i].budget:
            raise ValueError(f"allocation needs {self.params_of(full)} parameters, over budget={self.subs[i].budget}")
        return full

    def start(
        self, indices: Sequence[int], seeds: Sequence[int | None], allocations: Sequence[dict[str, int] | None]
    ) -> None:
        """Start new episodes of the given sub-episodes (seeded like `gym.Env.reset`; an allocation, if given,
        replaces `initial_rank` everywhere), with one evaluation pass for all of them."""
        for i, seed, allocation in zip(indices, seeds, allocations, strict=True):
            sub = self.subs[i]
            if allocation is not None:
                allocation = self.checked_allocation(i, allocation)
            else:
                allocation = {m.name: sub.config.initial_rank for m in self.modules}
            if seed is not None or sub.rng is None:
                sub.rng = gym.utils.seeding.np_random(seed)[0]
            torch_seed, order = self.draw_episode(sub.rng, sub.data)
            sub.generator = torch.Generator(device=self.config.device).manual_seed(torch_seed)
            self.lora.reset(i, [allocation[m.name] for m in self.modules], sub.generator)
            sub.episode = Episode(0, 0, order, math.nan, math.nan, 0.0, sub.base_gradients.copy())
        losses = self.evaluate()
        for i in indices:
            episode = self.subs[i].episode
            episode.initial_loss = episode.loss = float(losses[i])

    def evaluate(self, split: str = "eval") -> np.ndarray:
        """Every sub-episode's loss on its task's `split` (the validation set by default), now."""
        return evaluate_losses(self.target, self.lora, [s.data for s in self.subs], self.config.batch_size, split)

    def apply(self, i: int, moves: np.ndarray) -> None:
        """Shrinks first, then grows in a random order (from the sub-episode's generator), each skipped if it
        would leave the ladder or break the budget."""
        sub = self.subs[i]
        index = [self.ladder.index(int(r)) for r in self.lora.ranks[i]]
        moves = moves[: len(self.modules)]
        for j, move in enumerate(moves):
            if move == SHRINK and index[j] > 0:
                index[j] -= 1
        params = self.params_of({m.name: self.ladder[k] for m, k in zip(self.modules, index, strict=True)})
        for j in sub.rng.permutation(len(self.modules)):
            if moves[j] == GROW and index[j] + 1 < len(self.ladder):
                extra = (self.ladder[index[j] + 1] - self.ladder[index[j]]) * self.modules[j].params_per_rank
                if params + extra <= sub.budget:
                    index[j] += 1
                    params += extra
        for j, k in enumerate(index):
            self.lora.set_rank(i, j, self.ladder[k], sub.generator)

    def train(self, indices: Sequence[int], steps: int) -> None:
        """`steps` optimizer steps of the given sub-episodes together (the others are left as they were); the
        last one also reads the weight gradients behind the importance feature."""
        for step in range(steps):
            batches = []
            for i, sub in enumerate(self.subs):
                position = sub.episode.optimizer_steps if i in indices else 0
                order = sub.episode.order if i in indices else np.arange(self.config.batch_size) % sub.data.train_size
                batches.append(self.training_batch(sub.data, order, position))
            last = step == steps - 1
            norms = train_step(self.target, self.lora, self.loss, batches, list(indices), record=last)
            for i in indices:
                episode = self.subs[i].episode
                if last:
                    smoothing = self.config.importance_smoothing
                    episode.gradients = smoothing * episode.gradients + (1 - smoothing) * norms[i]
                episode.optimizer_steps += 1
            self.total_optimizer_steps += len(indices)

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, tuple[float, bool, bool, dict[str, Any]]]:
        """One decision of each given sub-episode: its moves, `inner_steps` steps for all of them together,
        then one evaluation. Returns (reward, terminated, truncated, info) per sub-episode."""
        for i, moves in actions.items():
            self.apply(i, moves)
        self.train(list(actions), self.config.inner_steps)
        losses = self.evaluate()
        results = {}
        for i in actions:
            sub, episode = self.subs[i], self.subs[i].episode
            episode.decision += 1
            loss = float(losses[i])
            params = self.params_of(self.ranks(i))
            if math.isfinite(loss):
                gain = (episode.loss - loss) / episode.initial_loss
                reward = gain - sub.config.cost_weight * params / sub.budget
                episode.loss, episode.last_gain = loss, gain
                terminated = False
            else:
                reward = -sub.config.divergence_penalty
                episode.diverged = terminated = True
            truncated = not terminated and episode.decision >= self.config.decisions
            info = self.info(i)
            info["loss"] = loss
            results[i] = (float(reward), terminated, truncated, info)
        return results

    # ---- masks, observation, info -------------------------------------------------------------------------
    def action_masks(self, i: int) -> np.ndarray:
        mask = np.zeros((self.config.max_modules, 3), dtype=bool)
        mask[:, KEEP] = True
        n = len(self.modules)
        mask[:n, SHRINK] = self.lora.ranks[i] > 0
        mask[:n, GROW] = self._grow_params(i) > 0
        return mask.reshape(-1)

    def _grow_params(self, i: int) -> np.ndarray:
        """Per module: the parameters its next ladder step adds in sub-episode i, 0 where that step is not
        allowed (at r_max, or over the budget left)."""
        step = dict(zip(self.ladder[:-1], np.diff(self.ladder), strict=True))
        ranks = self.lora.ranks[i]
        grow = np.array([step.get(int(r), 0) * m.params_per_rank for m, r in zip(self.modules, ranks, strict=True)])
        return np.where(self.params_of(self.ranks(i)) + grow <= self.subs[i].budget, grow, 0)

    def _grow_shares(self, i: int) -> np.ndarray:
        """Per module: the share of its probe update that its next ladder step adds in sub-episode i (0 at r_max
        or off the ladder)."""
        following = dict(zip(self.ladder[:-1], self.ladder[1:], strict=True))
        energy = self.subs[i].probe_energy
        return np.array([
            energy[j, following[r]] - energy[j, r] if r in following else 0.0
            for j, r in enumerate(int(r) for r in self.lora.ranks[i])
        ])  # fmt: skip

    def _module_features(self, budget: int) -> np.ndarray:
        features = np.zeros((self.config.max_modules, obs.MODULE_FEATURES), np.float32)
        for i, m in enumerate(self.modules):
            features[i, obs.PARAMS_PER_RANK] = min(m.params_per_rank / budget, 1.0)
            features[i, obs.DEPTH] = m.depth
            features[i, obs.KINDS.start + MODULE_KINDS.index(m.kind)] = 1.0
            features[i, obs.ENCODER] = float(m.stack == "encoder")
            features[i, obs.CROSS_ATTENTION] = float(m.cross_attention)
            features[i, obs.PRESENT] = 1.0
        return features

    def observation(self, i: int) -> dict[str, np.ndarray]:
        sub, episode = self.subs[i], self.subs[i].episode
        modules = sub.static_features.copy()
        n = len(self.modules)
        base = sub.base_gradients
        remaining = np.divide(episode.gradients, base, out=np.zeros(n), where=base > 0)
        importance = normalized(sub.probe_gains * remaining)
        modules[:n, obs.IMPORTANCE] = importance
        modules[:n, obs.RANK] = self.lora.ranks[i] / self.ladder[-1]
        grow = self._grow_params(i) / sub.budget
        modules[:n, obs.GROW_COST] = np.minimum(grow, 1.0)
        order = np.argsort(-importance, kind="stable")  # most important first, ties in slot order
        modules[order, obs.COST_AHEAD] = np.minimum(np.cumsum(grow[order]) - grow[order], 1.0)
        modules[:n, obs.GROW_SHARE] = self._grow_shares(i)
        ratio = episode.loss / episode.initial_loss if episode.initial_loss > 0 else 0.0
        global_ = np.zeros(obs.GLOBAL_FEATURES, np.float32)
        global_[obs.BUDGET_USED] = min(self.params_of(self.ranks(i)) / sub.budget, 1.0)
        global_[obs.DECISIONS_LEFT] = 1 - episode.decision / self.config.decisions
        global_[obs.LOSS_RATIO] = min(ratio, LOSS_RATIO_MAX)
        global_[obs.LAST_GAIN] = np.clip(episode.last_gain, -LOSS_RATIO_MAX, 1.0)
        global_[obs.DECISION_SHARE] = 1 / self.config.decisions
        return {"modules": modules.reshape(-1), "global": global_}

    def info(self, i: int) -> dict[str, Any]:
        sub, episode = self.subs[i], self.subs[i].episode
        ranks = self.ranks(i)
        cost = allocation_cost(self.modules, ranks)
        info = {
            "loss": episode.loss,
            "initial_loss": episode.initial_loss,
            "params": cost.params + self.extra_params,
            "budget": sub.budget,
            "flops_per_token": cost.flops_per_token,
            "adapter_bytes": cost.adapter_bytes + 4 * self.extra_params,
            "allocation": ranks,
            "optimizer_steps": episode.optimizer_steps,
            "diverged": episode.diverged,
        }
        if sub.data.oracle_ranks is not None:
            info["oracle_allocation"] = dict(sub.data.oracle_ranks)
        return info

    # ---- snapshots and export -----------------------------------------------------------------------------
    def get_state(self, i: int) -> dict[str, Any]:
        """Everything that determines the rest of sub-episode i: adapters, optimizer, data position, RNGs."""
        sub = self.subs[i]
        if sub.episode is None:
            raise RuntimeError("call reset() before get_state()")
        return {
            "episode": sub.episode.copy(),
            "lora": self.lora.snapshot(i),
            "np_random": sub.rng.bit_generator.state,
            "generator": sub.generator.get_state(),
        }

    def set_state(self, i: int, state: dict[str, Any]) -> None:
        """Return sub-episode i to a state returned by `get_state()` of an env of the same instance."""
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS) or not isinstance(state["episode"], Episode):
            what = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state={what} is invalid: expected a dict returned by get_state() (keys {list(STATE_KEYS)})"
            )
        if not isinstance(state["lora"], dict) or len(state["lora"].get("ranks", ())) != len(self.modules):
            raise ValueError("state is invalid: it comes from an env with other target modules")
        sub = self.subs[i]
        sub.episode = state["episode"].copy()
        self.lora.restore(i, state["lora"])
        if sub.rng is None:
            sub.rng = gym.utils.seeding.np_random(0)[0]
        sub.rng.bit_generator.state = state["np_random"]
        sub.generator = torch.Generator(device=self.config.device)
        sub.generator.set_state(state["generator"])

    def export(self, i: int, path: str) -> None:
        """Write sub-episode i's current adapter as a standard peft folder."""
        self.lora.export(i, path, fresh_model(self.subs[i].instance), self.config.model)

    def peft_model(self, i: int) -> torch.nn.Module:
        """Sub-episode i's current adapter on a fresh copy of the base, as a peft model."""
        return self.lora.peft_model(i, fresh_model(self.subs[i].instance), self.config.model)
