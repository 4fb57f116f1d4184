"""The observation's layout, by name. The env writes these columns and every consumer reads them from here.

`observation["modules"]` is flat (as SB3 prefers); `module_table` gives one row per module slot, with the
columns of `MODULE_COLUMNS`. `observation["global"]` has the columns of `GLOBAL_COLUMNS`. A change of layout is
a new `OBSERVATION_VERSION`; saved policies record the version they were trained on.
"""

from __future__ import annotations

from typing import Any, TypeVar

from strato_env.models import MODULE_KINDS

OBSERVATION_VERSION = 3
"""v3 added GROW_SHARE (how much of the module's probe update its next ladder step adds); v2 added GROW_COST and
COST_AHEAD (what growing costs, in the order of importance) and DECISION_SHARE; v1 added ENCODER
and CROSS_ATTENTION (encoder-decoder models); v0 had neither."""

MODULE_COLUMNS = (
    "importance",
    "rank",
    "params_per_rank",
    "grow_cost",
    "cost_ahead",
    "grow_share",
    "depth",
    *(f"kind_{k}" for k in MODULE_KINDS),
    "encoder",
    "cross_attention",
    "present",
)
"""Per module slot: importance in [0, 1]; rank / r_max; parameters per unit of rank / B; the parameters its
next ladder step adds / B (0 at r_max); the sum of that over the more important modules (ties: lower slots
first), clipped to 1; the share of the squared norm of the module's probe update that its next ladder step
adds to the best approximation at its rank (0 at r_max; `strato_env.importance.energy_shares`); relative depth
over every stack; the kind one-hot; 1 in an encoder stack; 1 for an encoder-decoder's cross-attention;
the present flag (0 for padding slots, whose features are all 0)."""
IMPORTANCE, RANK, PARAMS_PER_RANK, GROW_COST, COST_AHEAD, GROW_SHARE, DEPTH = range(7)
KINDS = slice(7, 7 + len(MODULE_KINDS))
"""The kind one-hot columns, in the order of `strato_env.models.MODULE_KINDS`."""
ENCODER, CROSS_ATTENTION, PRESENT = range(KINDS.stop, KINDS.stop + 3)
MODULE_FEATURES = len(MODULE_COLUMNS)

GLOBAL_COLUMNS = ("budget_used", "decisions_left", "loss_ratio", "last_gain", "decision_share")
"""P_t / B; decisions left / decisions; L_t / L_0 (clipped); last loss gain (L_{t-1} - L_t) / L_0 (clipped);
1 / decisions (one decision's share of the episode)."""
BUDGET_USED, DECISIONS_LEFT, LOSS_RATIO, LAST_GAIN, DECISION_SHARE = range(5)
GLOBAL_FEATURES = len(GLOBAL_COLUMNS)

Array = TypeVar("Array")


def module_table(modules: Array) -> Array:
    """`modules` (a flat observation["modules"], or a batch of them: numpy or torch) as (..., slots, features)."""
    flat: Any = modules
    return flat.reshape(*flat.shape[:-1], -1, MODULE_FEATURES)


def slots_of(observation_space: Any) -> int:
    """Module slots (the env's `max_modules`) of an observation space, e.g. a saved policy's."""
    return observation_space["modules"].shape[0] // MODULE_FEATURES
