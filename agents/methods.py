"""Every allocation method in one table: its name, how it runs, its typed options and what it reads.

`strato train`'s agents, `strato bench`'s methods, their option validation and their dispatch all read
`METHODS`. Adding a method is one `Method` entry here plus the module that implements it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents import baselines
from agents.go_explore import GoExplore, GoExploreConfig
from agents.ppo.train import ALGORITHMS
from agents.result import SearchResult
from strato_env.config import from_dict
from strato_env.env import RankAllocationEnv

Search = Callable[[RankAllocationEnv, int, "int | None", Any], SearchResult]
"""(env, seed, max optimizer steps, typed options) -> the allocation found and its cost."""


def _never(options: Any) -> bool:
    return False


def _always(options: Any) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """One allocation method."""

    name: str
    summary: str
    options: type
    """Dataclass of the method's options (`options.<name>` in a bench config, `ppo` / `go_explore` in train)."""
    search: Search | None = None
    """Run on one instance within a step cap (search methods and references); None for learned policies."""
    learned: bool = False
    """A policy trained on train instances, then applied unchanged to held-out ones (an SB3 algorithm of
    `agents.ppo.train.ALGORITHMS`)."""
    reference: bool = False
    """A reference every benchmark runs (uniform LoRA, the planted oracle), not a competitor."""
    reads_importance: Callable[[Any], bool] = _never
    """Whether, with these options, the method reads the env's importance feature (it is then charged the
    instance's importance probe)."""
    trainable: bool = False
    """`strato train agent=NAME` runs it: a learned policy, or a search that writes an archive."""
    fixed_options: tuple[str, ...] = ()
    """Options the benchmark sets itself (a search's step cap, a policy's width); a bench config may not set them."""
    anytime: bool = False
    """A search under a step cap: the search track runs it once per cap of `search_steps`."""
    own_model: bool = False
    """Trains its own model rather than the env's, so it reports its optimizer steps itself."""

    def parse_options(self, values: dict[str, Any] | Any, where: str) -> Any:
        """`values` as the method's typed options; unknown keys and bad values raise, naming `where`."""
        if type(values) is self.options:
            return values
        if not isinstance(values, dict):
            raise ValueError(f"{where.rstrip('.')}={values!r} is invalid: expected a mapping of {self.name} options")
        try:
            return from_dict(self.options, values, where=where)
        except ValueError as error:  # a bad value: name it as the config does
            message = str(error)
            raise ValueError(message if message.startswith("unknown key") else where + message) from None


def _baseline(function: Callable[..., SearchResult]) -> Search:
    def search(env: RankAllocationEnv, seed: int, cap: int | None, options: Any) -> SearchResult:
        return function(env, seed=seed, max_optimizer_steps=cap, **dataclasses.asdict(options))

    return search


def _oracle(env: RankAllocationEnv, seed: int, cap: int | None, options: Any) -> SearchResult:
    if env.oracle_allocation is None:
        raise ValueError(f"{env.config.label} has no oracle: only planted instances know their optimum")
    return SearchResult("oracle", env.oracle_allocation, 0)


def _go_explore(env: RankAllocationEnv, seed: int, cap: int | None, options: GoExploreConfig) -> SearchResult:
    settings = options if cap is None else dataclasses.replace(options, max_optimizer_steps=cap)
    return GoExplore(settings).run(env, seed=seed)


_POLICY_SUMMARIES = {name: f"{cls.__name__}, slot-shared policy" for name, (cls, *_) in ALGORITHMS.items()}

METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("uniform", "uniform LoRA: the largest rank every module can get", baselines.NoOptions,
               _baseline(baselines.uniform), reference=True),
        Method("oracle", "the planted optimum (planted instances only)", baselines.NoOptions, _oracle, reference=True),
        Method("random", "random search over budget-filling allocations", baselines.RandomOptions,
               _baseline(baselines.random_search), anytime=True),
        Method("greedy", "greedy by the env's importance feature", baselines.GreedyOptions,
               _baseline(baselines.greedy), reads_importance=_always),
        Method("greedy_gain", "greedy by importance x the share of the probe's update a ladder step adds",
               baselines.GreedyOptions, _baseline(baselines.greedy_gain), reads_importance=_always),
        Method("greedy_iterative", "greedy re-reading the importance after each fill step, in one episode",
               baselines.NoOptions, _baseline(baselines.greedy_iterative), reads_importance=_always),
        Method("linear_depth", "ranks growing linearly with depth, filling the budget (PRILoRA-style)",
               baselines.NoOptions, _baseline(baselines.linear_depth)),
        Method("tpe", "Optuna TPE over static allocations", baselines.TPEOptions, _baseline(baselines.tpe),
               anytime=True),
        Method("adalora", "peft's AdaLoRA, its final ranks mapped to the ladder", baselines.AdaLoraOptions,
               _baseline(baselines.adalora), own_model=True),
        Method("go_explore", "Go-Explore over rank schedules", GoExploreConfig, _go_explore,
               reads_importance=lambda options: options.importance_guided or options.greedy_episode,
               trainable=True, fixed_options=("max_optimizer_steps",), anytime=True),
        *(
            Method(name, summary, ALGORITHMS[name][2], learned=True,
                   reads_importance=_always, trainable=True, fixed_options=("n_envs",))
            for name, summary in _POLICY_SUMMARIES.items()
        ),
    ]
}  # fmt: skip


def method(name: Any, where: str = "method") -> Method:
    """The registered method called `name`, or a ValueError listing the allowed names."""
    if name not in METHODS:
        raise ValueError(f"{where}={name!r} is invalid: allowed {list(METHODS)}")
    return METHODS[name]


def trainable_agents() -> list[str]:
    return [name for name, m in METHODS.items() if m.trainable]


def competitors() -> list[str]:
    """Every method a benchmark compares (the references run anyway)."""
    return [name for name, m in METHODS.items() if not m.reference]
