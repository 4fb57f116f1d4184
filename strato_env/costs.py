"""Exact costs of a rank allocation, from module shapes alone.

A LoRA update of rank r on a module with `in` inputs and `out` outputs has factors A (r x in) and
B (out x r): r * (in + out) parameters, and x -> B(Ax) costs 2 * r * (in + out) FLOPs per token
(one multiply and one add per weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from strato_env.models import TargetModule


@dataclass(frozen=True)
class AllocationCost:
    params: int
    """Trainable LoRA parameters."""
    flops_per_token: int
    """Extra forward FLOPs per token added by the adapters."""
    adapter_bytes: int
    """Size of the adapter weights at the given bytes per parameter."""


def lora_params(module: TargetModule, rank: int) -> int:
    return rank * module.params_per_rank


def allocation_cost(
    modules: Sequence[TargetModule], ranks: Mapping[str, int], bytes_per_param: int = 4
) -> AllocationCost:
    """Cost of giving each module `ranks[module.name]` (missing names count as rank 0)."""
    params = sum(lora_params(m, ranks.get(m.name, 0)) for m in modules)
    return AllocationCost(params=params, flops_per_token=2 * params, adapter_bytes=bytes_per_param * params)


def uniform_rank_for_budget(modules: Sequence[TargetModule], budget: int) -> int:
    """The largest rank r such that giving every module rank r stays within `budget` parameters."""
    return budget // sum(m.params_per_rank for m in modules)


def cheapest_nonempty(modules: Sequence[TargetModule], ladder: Sequence[int]) -> int:
    """Parameters of the cheapest allocation that adapts at least one module."""
    return min(lora_params(m, ladder[1]) for m in modules)
