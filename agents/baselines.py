"""Baselines for the rank-allocation problem: uniform LoRA, random search, greedy by importance or by estimated
gain, AdaLoRA, Optuna TPE.

Every baseline is `name(env, seed=0, max_optimizer_steps=None, **options) -> SearchResult`: given an
instance and a budget (`env`), return an allocation within `env.budget` and the optimizer steps spent
finding it. One static trial costs one episode, `decisions * inner_steps` steps (`env.evaluate_allocation`).
Each baseline's options are the fields of its options dataclass (`GreedyOptions`, ...), validated up front.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn

from agents.evaluation import uniform_allocation
from agents.result import SearchResult
from strato_env.config import from_dict
from strato_env.engine import ADAPTER
from strato_env.env import GROW, KEEP, RankAllocationEnv
from strato_env.models import fan_in_fan_out
from strato_env.observation import (
    BUDGET_USED,
    DECISION_SHARE,
    DECISIONS_LEFT,
    GROW_COST,
    IMPORTANCE,
    module_table,
)
from strato_env.validation import check_int, check_number

DEFAULT_TRIALS = 4
"""Static trials that random search and TPE run when `max_optimizer_steps` is None."""


@dataclass
class AdaLoraResult(SearchResult):
    """A SearchResult plus what AdaLoRA itself ended with, before mapping to the ladder."""

    raw_ranks: dict[str, int] = field(default_factory=dict)
    """Kept singular triplets per module (the count of True in `rank_pattern`)."""
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    """peft's final rank mask per module (True = triplet kept)."""
    singular_values: dict[str, list[float]] = field(default_factory=dict)
    """Final `lora_E` entries per module; masked triplets are exactly 0."""


# ---- options ----------------------------------------------------------------------------------------------
@dataclass
class NoOptions:
    """The method takes no options."""


@dataclass
class RandomOptions:
    """Options of random search."""

    max_proposals: int = 1000
    """Cap on the allocations drawn (a repeated draw costs no steps)."""
    batch: int = 8
    """Allocations trained together per batch by the batched engine (the draws and results do not depend on it)."""

    def __post_init__(self) -> None:
        check_int("max_proposals", self.max_proposals, 1)
        check_int("batch", self.batch, 1)


@dataclass
class GreedyOptions:
    """Options of greedy by importance."""

    probe_decisions: int = 0
    """Decisions at the smallest nonzero rank before the importance is read (0: the instance's probe alone)."""

    def __post_init__(self) -> None:
        check_int("probe_decisions", self.probe_decisions, 0)


@dataclass
class TPEOptions:
    """Options of Optuna TPE."""

    n_startup_trials: int = 10
    """Random proposals before TPE models the losses (Optuna's default; pruned proposals count)."""
    max_proposals: int = 1000
    """Cap on all proposals."""
    batch: int = 1
    """Proposals asked before their losses are told, trained together by the batched engine (Optuna's
    constant liar keeps a batch's proposals apart); 1: TPE sees every loss before its next proposal."""

    def __post_init__(self) -> None:
        check_int("n_startup_trials", self.n_startup_trials, 1)
        check_int("max_proposals", self.max_proposals, 1)
        check_int("batch", self.batch, 1)


@dataclass
class AdaLoraOptions:
    """Options of peft's AdaLoRA (see `adalora`)."""

    init_r: int | None = None
    """Initial rank of every module (None: r_max, so that any module can end at r_max)."""
    tinit_fraction: float = 0.2
    """Share of the steps before budgeting starts (peft's tinit)."""
    tfinal_fraction: float = 0.3
    """Share of the steps after budgeting ends (peft's tfinal); with tinit_fraction 0.2 the budget decreases over
    half the run, as AdaLoRA's authors advise."""
    delta_t: int = 1
    """Steps between two budget updates (peft's deltaT)."""
    orth_reg_weight: float = 0.5
    """Weight of AdaLoRA's orthogonal regularizer."""

    def __post_init__(self) -> None:
        if self.init_r is not None:
            check_int("init_r", self.init_r, 1)
        check_number("tinit_fraction", self.tinit_fraction, 0, 1, high_open=True)
        check_number("tfinal_fraction", self.tfinal_fraction, 0, 1, high_open=True)
        check_int("delta_t", self.delta_t, 1)
        check_number("orth_reg_weight", self.orth_reg_weight, 0)


def _options(cls: type, method: str, given: dict[str, Any]) -> Any:
    return from_dict(cls, given, where=f"{method} option ")


def _episode_steps(env: RankAllocationEnv) -> int:
    return env.config.decisions * env.config.inner_steps


def _step_limit(max_optimizer_steps: int | None, default: int) -> int:
    if max_optimizer_steps is None:
        return default
    check_int("max_optimizer_steps", max_optimizer_steps, 0)
    return max_optimizer_steps


# ---- shared pieces ----------------------------------------------------------------------------------------
class _StaticTrials:
    """Runs static trials (one episode each) within a step limit; tracks cost, best allocation and history."""

    def __init__(self, env: RankAllocationEnv, seed: int, max_optimizer_steps: int | None) -> None:
        self.env, self.seed = env, seed
        self.episode = _episode_steps(env)
        self.limit = _step_limit(max_optimizer_steps, DEFAULT_TRIALS * self.episode)
        if self.limit < self.episode:
            raise ValueError(
                f"max_optimizer_steps={max_optimizer_steps} allows no trial: one trial is an episode of "
                f"{self.episode} steps; allowed: >= {self.episode} or None"
            )
        self.steps = 0
        self.best: dict[str, int] | None = None
        self.best_loss = math.inf
        self.history: list[tuple[int, float]] = []
        self._cache: dict[tuple[int, ...], float] = {}

    def affordable(self) -> int:
        """How many more new allocations the step limit pays for."""
        return (self.limit - self.steps) // self.episode

    def _key(self, allocation: dict[str, int]) -> tuple[int, ...]:
        return tuple(allocation[m.name] for m in self.env.modules)

    def evaluate(self, allocations: list[dict[str, int]]) -> list[float]:
        """The final loss of each allocation, as if evaluated one after the other: the new ones train together
        in one batch, each charged one episode at its first place; a repeated allocation is looked up and costs
        no steps. The caller keeps the new ones within `affordable()`."""
        new = {self._key(a): a for a in allocations if self.is_new(a)}
        losses = self.env.evaluate_allocations(list(new.values()), [self.seed] * len(new)) if new else []
        self._cache.update(zip(new, losses, strict=True))
        results = []
        for allocation in allocations:
            if new.pop(self._key(allocation), None) is not None:
                self.steps += self.episode
            loss = self._cache[self._key(allocation)]
            loss = loss if math.isfinite(loss) else math.inf  # a diverged run ranks last
            if self.best is None or loss < self.best_loss:
                self.best, self.best_loss = dict(allocation), loss
            self.history.append((self.steps, self.best_loss))
            results.append(loss)
        return results

    def is_new(self, allocation: dict[str, int]) -> bool:
        return self._key(allocation) not in self._cache

    def result(self, method: str) -> SearchResult:
        if self.best is None:
            raise RuntimeError(f"{method} evaluated no allocation within budget")
        return SearchResult(method, self.best, self.steps, self.best_loss, list(self.history))


def _grow_cost(env: RankAllocationEnv, slot: int, index: list[int]) -> int:
    """Parameters added by growing module `slot` one ladder step from ladder index `index[slot]`."""
    step = env.ladder[index[slot] + 1] - env.ladder[index[slot]]
    return step * env.modules[slot].params_per_rank


def _allocation(env: RankAllocationEnv, index: list[int]) -> dict[str, int]:
    return {m.name: env.ladder[i] for m, i in zip(env.modules, index, strict=True)}


def _fill(env: RankAllocationEnv, index: list[int], choose: Callable[[list[int]], int]) -> list[int]:
    """Grow one ladder step at a time, module `choose(fitting slots)`, until no grow fits the budget."""
    params = env.params_of(_allocation(env, index))

    def fits(slot: int) -> bool:
        return index[slot] + 1 < len(env.ladder) and params + _grow_cost(env, slot, index) <= env.budget

    while fitting := [slot for slot in range(len(index)) if fits(slot)]:
        slot = choose(fitting)
        params += _grow_cost(env, slot, index)
        index[slot] += 1
    return index


# ---- uniform, random, greedy ------------------------------------------------------------------------------
def uniform(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> SearchResult:
    """The largest integer rank r that fits the budget on every module (any integer, not only ladder ranks).

    No search: 0 optimizer steps and no loss (evaluate it with `env.evaluate_allocation`).
    """
    _options(NoOptions, "uniform", options)
    _step_limit(max_optimizer_steps, 0)
    return SearchResult("uniform", uniform_allocation(env), 0)


def linear_depth(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> SearchResult:
    """Ranks that grow linearly with depth (PRILoRA's rule): module j gets the ladder rank at or below
    c * (1 + depth_j), with the largest c whose allocation fits the budget; what is left grows the deepest
    modules first. No search: 0 optimizer steps."""
    _options(NoOptions, "linear_depth", options)
    _step_limit(max_optimizer_steps, 0)
    weights = [1.0 + m.depth for m in env.modules]

    def index_at(c: float) -> list[int]:
        return [max(i for i, r in enumerate(env.ladder) if r <= c * w) for w in weights]

    low, high = 0.0, float(env.ladder[-1])
    for _ in range(40):  # bisection on c: the allocation's cost grows with c
        middle = (low + high) / 2
        low, high = (middle, high) if env.params_of(_allocation(env, index_at(middle))) <= env.budget else (low, middle)
    index = _fill(env, index_at(low), lambda fitting: max(fitting, key=lambda slot: (weights[slot], -slot)))
    return SearchResult("linear_depth", _allocation(env, index), 0)


def random_allocation(env: RankAllocationEnv, rng: np.random.Generator) -> dict[str, int]:
    """A random ladder allocation that fills the budget.

    Draw a ladder index per module uniformly; while over budget shrink a random adapted module by one step;
    then grow random modules by one step while any grow fits (so no budget is left unused by chance).
    """
    index = [int(i) for i in rng.integers(len(env.ladder), size=len(env.modules))]
    while env.params_of(_allocation(env, index)) > env.budget:
        index[int(rng.choice([slot for slot, i in enumerate(index) if i > 0]))] -= 1
    return _allocation(env, _fill(env, index, lambda fitting: int(rng.choice(fitting))))


def random_search(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> SearchResult:
    """Best of random budget-filling allocations (`random_allocation`), one full static trial each.

    Options: `max_proposals` (default 1000) caps the draws, since a repeated draw costs no steps; `batch`
    (default 8) new allocations are trained together by the batched engine.
    """
    settings = _options(RandomOptions, "random", options)
    trials = _StaticTrials(env, seed, max_optimizer_steps)
    rng = np.random.default_rng(seed)
    proposals = 0
    while proposals < settings.max_proposals and trials.affordable():
        batch: list[dict[str, int]] = []
        while proposals < settings.max_proposals and len(batch) < min(settings.batch, trials.affordable()):
            batch.append(random_allocation(env, rng))
            proposals += 1
        trials.evaluate(batch)
    return trials.result("random")


@contextmanager
def _episode_restored(env: RankAllocationEnv) -> Iterator[None]:
    """Runs episodes on `env` and then puts back the episode it held (as `evaluate_allocation` does)."""
    try:
        saved = env.get_state()
    except RuntimeError:  # no episode yet
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            env.set_state(saved)


def _importance(env: RankAllocationEnv, observation: dict[str, np.ndarray]) -> np.ndarray:
    return module_table(observation["modules"])[: len(env.modules), IMPORTANCE]


def _probed_importance(
    env: RankAllocationEnv, seed: int, max_optimizer_steps: int | None, method: str, probe: int
) -> tuple[np.ndarray, int]:
    """The importance greedy reads (after `reset(seed)`, or after `probe` decisions at the smallest nonzero rank)
    and the optimizer steps that cost; the env's current episode is restored."""
    check_int("probe_decisions", probe, 0, env.config.decisions)
    steps = probe * env.config.inner_steps
    limit = _step_limit(max_optimizer_steps, steps)
    if steps > limit:
        raise ValueError(
            f"max_optimizer_steps={max_optimizer_steps} is invalid: {method} with probe_decisions={probe} needs "
            f"{steps} steps"
        )
    smallest = {m.name: env.ladder[1] for m in env.modules}
    start = smallest if probe and env.params_of(smallest) <= env.budget else {}
    with _episode_restored(env):
        observation, info = env.reset(seed=seed, options={"allocation": start})
        for _ in range(probe):
            observation, _, terminated, truncated, info = env.step(np.full(env.config.max_modules, KEEP))
            if terminated or truncated:
                break
    return _importance(env, observation), int(info["optimizer_steps"])


def greedy(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> SearchResult:
    """Greedy by importance: the env's own per-module importance signal (observation feature 0).

    Rule: start from rank 0 everywhere and repeatedly grow, by one ladder step, the most important module
    whose grow still fits the budget (ties: the earlier module); stop when no grow fits.
    The importance is read after `reset(seed)` (the instance's cached probe, no optimizer step here) or, with
    option `probe_decisions=k` (default 0), after k decisions that keep every module at the smallest nonzero
    ladder rank (k * inner_steps optimizer steps, counted). The env's current episode is restored.
    """
    probe = _options(GreedyOptions, "greedy", options).probe_decisions
    importance, steps = _probed_importance(env, seed, max_optimizer_steps, "greedy", probe)
    index = _fill(env, [0] * len(env.modules), lambda fitting: max(fitting, key=lambda slot: importance[slot]))
    return SearchResult("greedy", _allocation(env, index), steps)


def greedy_gain(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> SearchResult:
    """Greedy by estimated gain: each ladder step is worth the module's importance times the share of its probe
    update that the step adds (`env.probe_energy`, the observation's GROW_SHARE), so a module whose update
    has rank 4 stops growing near rank 4 and the budget goes to the next module.

    Rule: start from rank 0 everywhere and repeatedly take the grow worth the most among those that fit the
    budget (ties: the earlier module); stop when no grow fits. The importance is read as `greedy` reads it
    (option `probe_decisions`); the env's current episode is restored.
    """
    probe = _options(GreedyOptions, "greedy_gain", options).probe_decisions
    importance, steps = _probed_importance(env, seed, max_optimizer_steps, "greedy_gain", probe)
    energy, index = env.probe_energy, [0] * len(env.modules)

    def worth(slot: int) -> float:
        rank, following = env.ladder[index[slot]], env.ladder[index[slot] + 1]
        return importance[slot] * (energy[slot, following] - energy[slot, rank])

    index = _fill(env, index, lambda fitting: max(fitting, key=worth))
    return SearchResult("greedy_gain", _allocation(env, index), steps)


FILL_SHARE = 0.5
"""Iterative greedy fills the budget over this share of an episode's decisions. Ranks grown late train for
fewer steps, so an episode's own adapter is better when the budget fills early; filled at the first decision,
it is spread over every module alike. Chosen on the bench_planted train and validation instances (never the
test set, one seed, encoders then matching only the teacher's last hidden states) by the gap closed by the
episode's own adapter:

| budget full after      | 8 of 8 decisions | 5 of 8 | 4 of 8 | 3 of 8 |
|------------------------|------------------|--------|--------|--------|
| 12 train instances     | 0.19             | 0.47   | 0.50   | 0.36   |
| 6 validation instances | -0.07            | 0.39 (6 of 8) | 0.47 | 0.42 |
"""


def iterative_greedy_grows(modules: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """Which module slots iterative greedy grows at this decision, read from a batch of observations alone
    (`modules` (batch, slots, features) as `module_table` rows, `global_` (batch, features)): at decision t of
    T it grows by one ladder step each of the most important modules (in order of importance, ties in slot
    order) whose grows fit within (t + 1) / (FILL_SHARE * T) of the budget (all of it from then on), passing
    over those that do not. A (batch, slots) boolean tensor; the warm start's teacher and the policy's `prior`
    both call it."""
    progress = 1 - global_[:, DECISIONS_LEFT] + global_[:, DECISION_SHARE]  # (t + 1) / T
    cap = torch.clamp(progress / FILL_SHARE, max=1.0) + 1e-6
    used = global_[:, BUDGET_USED]
    order = torch.argsort(-modules[..., IMPORTANCE], dim=1, stable=True)
    costs = torch.gather(modules[..., GROW_COST], 1, order)  # 0 where a grow is not allowed, and on padding
    grows = torch.zeros_like(costs, dtype=torch.bool)
    for k in range(costs.shape[1]):
        fits = (costs[:, k] > 0) & (used + costs[:, k] <= cap)
        used = used + torch.where(fits, costs[:, k], 0.0)
        grows[:, k] = fits
    return torch.zeros_like(grows).scatter(1, order, grows)


def iterative_greedy_action(modules: np.ndarray, global_: np.ndarray) -> np.ndarray:
    """`iterative_greedy_grows` as the env's action (grow where it grows, keep everywhere else) for one
    observation (`modules` as `module_table` rows) or a batch of them (a leading batch dimension)."""
    one = modules.ndim == 2
    batch_modules, batch_global = (modules[None], global_[None]) if one else (modules, global_)
    grows = iterative_greedy_grows(torch.as_tensor(batch_modules), torch.as_tensor(batch_global)).numpy()
    action = np.where(grows, GROW, KEEP).astype(np.int64)
    return action[0] if one else action


def greedy_iterative(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> SearchResult:
    """Greedy that re-reads the importance after each fill step: one episode from `reset(seed)` driven by
    `iterative_greedy_action`, so decision t fills up to (t + 1) / (FILL_SHARE * decisions) of the budget
    by the importance the env observes then. Between decisions the ranks so far train for `inner_steps` steps,
    so each fill reads the remaining gradient share under them. Returns the episode's final allocation (one episode of
    optimizer steps). The env's current episode is restored."""
    _options(NoOptions, "greedy_iterative", options)
    episode = _episode_steps(env)
    if _step_limit(max_optimizer_steps, episode) < episode:
        raise ValueError(
            f"max_optimizer_steps={max_optimizer_steps} is invalid: greedy_iterative runs one episode of "
            f"{episode} steps; allowed: >= {episode} or None"
        )
    with _episode_restored(env):
        observation, info = env.reset(seed=seed)
        done = False
        while not done:
            modules = module_table(observation["modules"])
            action = iterative_greedy_action(modules, observation["global"])
            observation, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
    return SearchResult("greedy_iterative", dict(info["allocation"]), int(info["optimizer_steps"]))


# ---- AdaLoRA ------------------------------------------------------------------------------------------------
def _orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's R(P, Q) = mean over factors of ||A A^T - I||_F and ||B^T B - I||_F (as peft computes it)."""
    terms = []
    for name, parameter in model.named_parameters():
        if f".lora_A.{ADAPTER}" in name or f".lora_B.{ADAPTER}" in name:
            covariance = parameter @ parameter.T if ".lora_A." in name else parameter.T @ parameter
            identity = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
            terms.append(torch.linalg.matrix_norm(covariance - identity))
    return torch.stack(terms).mean()


def _to_ladder(env: RankAllocationEnv, raw: dict[str, int], singular_values: dict[str, list[float]]) -> dict[str, int]:
    """Round each raw rank down to the ladder; while over budget, step down the module that loses the least
    |singular value| mass per parameter freed (AdaLoRA budgets ranks, not parameters); then, while a grow fits,
    grow the module that regains the most kept mass per parameter (so rounding does not leave budget unused)."""
    ladder = env.ladder
    allocation = {name: max(r for r in ladder if r <= rank) for name, rank in raw.items()}
    per_rank = {m.name: m.params_per_rank for m in env.modules}
    kept = {name: sorted((abs(v) for v in values if v != 0), reverse=True) for name, values in singular_values.items()}

    def mass_per_param(name: str, low: int, high: int) -> float:
        """Kept |singular value| mass of ranks low..high of module `name`, per parameter they cost."""
        return sum(kept[name][low:high]) / ((high - low) * per_rank[name])

    def step(name: str, by: int) -> int:
        return ladder[ladder.index(allocation[name]) + by]

    while env.params_of(allocation) > env.budget:
        name = min(
            (n for n, r in allocation.items() if r > 0), key=lambda n: mass_per_param(n, step(n, -1), allocation[n])
        )
        allocation[name] = step(name, -1)
    while True:
        params = env.params_of(allocation)
        gains = {
            n: mass_per_param(n, r, step(n, 1))
            for n, r in allocation.items()
            if r < ladder[-1] and params + (step(n, 1) - r) * per_rank[n] <= env.budget
        }
        gains = {n: gain for n, gain in gains.items() if gain > 0}
        if not gains:
            return allocation
        name = max(gains, key=gains.get)
        allocation[name] = step(name, 1)


def _train_adalora(
    env: RankAllocationEnv, base: nn.Module, config: AdaLoraConfig, target_total: int, seed: int, weight: float
) -> PeftModel:
    """peft AdaLoRA on `base` (a fresh copy of the base model), trained for `config.total_step` steps on the env's
    task with `weight` x the orthogonal regularizer."""
    torch_seed, order = env.episode_randomness(seed)  # those of an env episode from `seed`
    batch_size, total_step = env.config.batch_size, config.total_step
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        model = get_peft_model(base, config)
    model.base_model.rankallocator.target_bgt = target_total  # finer than peft's target_r * modules
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=env.config.learning_rate,
        weight_decay=env.config.weight_decay,
    )
    for step in range(1, total_step + 1):
        rows = torch.as_tensor(order[(step - 1) * batch_size : step * batch_size], device=env.config.device)
        batch = {k: v[rows] for k, v in env.data.train.items()}
        loss = env.data.loss(model, batch)[0] + weight * _orthogonal_regularization(model)
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)  # after step, before zero_grad: it reads the gradients
        optimizer.zero_grad(set_to_none=True)
    return model


def adalora(
    env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any
) -> AdaLoraResult:
    """peft's AdaLoRA trained for one episode on the env's task; its final ranks mapped to the ladder.

    - `init_r` (default r_max, so that every module can end at r_max); `lora_alpha = init_r`
      so the update's scaling is 1 as in the env. AdaLoRA budgets total rank, not parameters: its allocator's
      `target_bgt` is set to `(budget - extra params) / mean parameters per rank` (peft's integer `target_r`
      is that divided by the module count, rounded down).
    - Schedule: `total_step` = episode length (or `max_optimizer_steps` if smaller), `tinit = tinit_fraction *
      total_step` (0.2), `tfinal = max(1, tfinal_fraction * total_step)` (0.3), `deltaT = delta_t` (1);
      `update_and_allocate(step)` after every optimizer step, steps numbered from 1 so the final masking at
      `total_step - tfinal` happens.
    - Training: AdamW at the env's learning rate, batches in the order an env episode from `seed` draws;
      loss = task loss + `orth_reg_weight` (0.5) x AdaLoRA's orthogonal regularizer. peft adds that term only
      to `outputs.loss` inside forward, and task losses are computed outside it, so peft's weight is 0 and
      the same term is added here, for every task.
    - Read-back: raw rank = kept triplets of peft's final `rank_pattern`; see `_to_ladder`.

    `loss` is AdaLoRA's own evaluation loss at the end of its run (not that of the ladder allocation).
    """
    settings = _options(AdaLoraOptions, "adalora", options)
    n = len(env.modules)
    total_rank = (env.budget - env.extra_params) * n // sum(m.params_per_rank for m in env.modules)
    init_r = settings.init_r or env.ladder[-1]
    total_step = min(_episode_steps(env), _step_limit(max_optimizer_steps, _episode_steps(env)))
    tinit = int(settings.tinit_fraction * total_step)
    tfinal = max(1, int(settings.tfinal_fraction * total_step))
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"max_optimizer_steps={max_optimizer_steps}, tinit_fraction={settings.tinit_fraction} and "
            f"tfinal_fraction={settings.tfinal_fraction} leave AdaLoRA no budgeting phase ({total_step} steps, "
            f"tinit={tinit}, tfinal={tfinal}); allowed: tinit < total_step - tfinal"
        )
    target_total = min(total_rank, init_r * n - 1)  # peft needs at least one triplet to prune
    base = env.fresh_base_model()

    config = AdaLoraConfig(
        init_r=init_r,
        target_r=target_total // n,
        lora_alpha=init_r,
        lora_dropout=0.0,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=settings.delta_t,
        total_step=total_step,
        orth_reg_weight=0.0,  # added in _train_adalora instead
        target_modules=[m.name for m in env.modules],
        fan_in_fan_out=fan_in_fan_out(base, env.modules),
        modules_to_save=list(env.data.modules_to_save) or None,
    )
    model = _train_adalora(env, base, config, target_total, seed, settings.orth_reg_weight)
    final_loss = env.evaluate_loss(model)

    suffix, masks = f".lora_E.{ADAPTER}", model.peft_config[ADAPTER].rank_pattern  # keys: module.lora_E.default
    pattern = {key.removesuffix(suffix): [bool(b) for b in mask] for key, mask in masks.items()}
    raw_ranks = {m.name: sum(pattern[m.name]) for m in env.modules}
    singular_values = {
        m.name: model.base_model.model.get_submodule(m.name).lora_E[ADAPTER].detach().view(-1).tolist()
        for m in env.modules
    }
    return AdaLoraResult(
        method="adalora",
        allocation=_to_ladder(env, raw_ranks, singular_values),
        optimizer_steps=total_step,
        loss=final_loss,
        history=[(total_step, final_loss)],
        raw_ranks=raw_ranks,
        rank_pattern=pattern,
        singular_values=singular_values,
    )


# ---- Optuna TPE -----------------------------------------------------------------------------------------------
def tpe(env: RankAllocationEnv, seed: int = 0, max_optimizer_steps: int | None = None, **options: Any) -> SearchResult:
    """Optuna's TPE over static allocations: one categorical ladder rank per module, one static trial each.

    A proposal over budget is repaired before training: the highest-ranked module (ties: the costliest per rank,
    then the later) shrinks one ladder step until it fits, and TPE is told the repaired allocation's loss for
    its proposal (on small budgets nearly every raw proposal is over, and pruning them all would leave TPE
    nothing to learn from). A repeated allocation reuses its loss (0 steps). Options: `n_startup_trials`
    (default 10, Optuna's), `max_proposals` (default 1000) caps all proposals, `batch` (default 1) proposals
    trained together.
    """
    settings = _options(TPEOptions, "tpe", options)
    trials = _StaticTrials(env, seed, max_optimizer_steps)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=settings.n_startup_trials, constant_liar=settings.batch > 1
        )
        study = optuna.create_study(direction="minimize", sampler=sampler)
        proposals = 0
        while proposals < settings.max_proposals and trials.affordable():
            asked: list[tuple[optuna.Trial, dict[str, int]]] = []
            while proposals < settings.max_proposals and len(asked) < min(settings.batch, trials.affordable()):
                trial = study.ask()
                proposals += 1
                index = [env.ladder.index(trial.suggest_categorical(m.name, list(env.ladder))) for m in env.modules]
                while env.params_of(_allocation(env, index)) > env.budget:
                    slot = max(range(len(index)), key=lambda j: (index[j], env.modules[j].params_per_rank, j))
                    index[slot] -= 1
                asked.append((trial, _allocation(env, index)))
            for (trial, _), loss in zip(asked, trials.evaluate([a for _, a in asked]), strict=True):
                study.tell(trial, loss)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return trials.result("tpe")
