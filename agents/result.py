"""What every search method returns: the allocation it found and what finding it cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SearchResult:
    """An allocation (module name -> rank) and the cost of the search that produced it."""

    method: str
    allocation: dict[str, int]
    optimizer_steps: int
    """Optimizer steps the search ran (restoring a snapshot costs none)."""
    loss: float | None = None
    """The best evaluation loss the search itself observed, if any."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """(optimizer steps spent so far, best loss so far) after each unit of search."""
    trajectory: list[list[int]] | None = None
    """For sequential methods: the actions that lead from reset to the result."""
    start: dict[str, int] = field(default_factory=dict)
    """For sequential methods: the allocation the trajectory starts from (`reset(options={"allocation": ...})`;
    empty: the env's own initial ranks)."""
