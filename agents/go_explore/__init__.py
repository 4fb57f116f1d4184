"""Go-Explore rank scheduler: an archive of coarse cells, count-based selection, return by set_state."""

from agents.go_explore.archive import Archive, CellEntry
from agents.go_explore.cells import Cell, CellFunction, DepthProfileCell, ExactAllocationCell
from agents.go_explore.config import GoExploreConfig
from agents.go_explore.explore import GoExplore, Move, Policy, draw_group_moves, group_action, random_action

__all__ = [
    "Archive",
    "Cell",
    "CellEntry",
    "CellFunction",
    "DepthProfileCell",
    "ExactAllocationCell",
    "GoExplore",
    "GoExploreConfig",
    "Move",
    "Policy",
    "draw_group_moves",
    "group_action",
    "random_action",
]
