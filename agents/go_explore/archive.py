"""The Go-Explore archive: the best trajectory known per cell, count-based selection, JSON save and load."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.go_explore.cells import Cell
from strato_env.files import write_atomic

ARCHIVE_FORMAT = "strato-go-explore-archive"
ARCHIVE_VERSION = 2
"""v2: entries have a `start` allocation (v1 archives load with none)."""
SAVED_FIELDS = (
    "score",
    "loss",
    "optimizer_steps",
    "trajectory",
    "allocation",
    "finished",
    "times_chosen",
    "times_improved",
    "start",
)


@dataclass
class CellEntry:
    """The best trajectory known to reach one cell, and how often the cell was explored from."""

    cell: Cell
    score: float
    """-(evaluation loss) at the end of the trajectory, -inf if training diverged; higher is better."""
    loss: float
    """Evaluation loss at the end of the trajectory (info["loss"])."""
    optimizer_steps: int
    """Optimizer steps from reset to the end of the trajectory (info["optimizer_steps"])."""
    trajectory: list[list[int]]
    """Actions that lead from env.reset(seed, options={"allocation": start}) to this cell."""
    allocation: dict[str, int]
    """Module name -> rank at the end of the trajectory."""
    finished: bool
    """The episode has ended (truncated or diverged): a result, but nothing to explore from."""
    times_chosen: int = 0
    """Times the cell was selected to explore from."""
    times_improved: int = 0
    """Explorations from this cell that found a new cell or a better trajectory to one."""
    start: dict[str, int] = field(default_factory=dict)
    """The allocation the trajectory starts from at reset (empty: the env's own initial ranks)."""
    snapshot: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """env.get_state() at the end of the trajectory; kept in memory only, None for finished cells."""
    observation: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    """The observation that goes with the snapshot (set_state returns none)."""

    def to_dict(self) -> dict[str, Any]:
        return {"cell": list(self.cell)} | {key: getattr(self, key) for key in SAVED_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CellEntry:
        return cls(**(values | {"cell": tuple(values["cell"])}))


def better(score: float, steps: int, than: CellEntry) -> bool:
    """Higher score wins; on equal scores, fewer optimizer steps."""
    return score > than.score or (score == than.score and steps < than.optimizer_steps)


class Archive:
    """Cells -> best entry. Selection weight 1 / sqrt(1 + times chosen) + bonus * times improved / (1 + chosen)."""

    def __init__(self, improvement_bonus: float = 0.0, metadata: dict[str, Any] | None = None) -> None:
        self.improvement_bonus = improvement_bonus
        self.metadata = dict(metadata or {})
        self.entries: dict[Cell, CellEntry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[CellEntry]:
        return iter(self.entries.values())

    def __getitem__(self, cell: Cell) -> CellEntry:
        return self.entries[cell]

    def accepts(self, cell: Cell, score: float, steps: int) -> bool:
        """Whether a trajectory with this score and cost would be new or better for `cell`."""
        return cell not in self.entries or better(score, steps, self.entries[cell])

    def add(self, entry: CellEntry) -> bool:
        """Store `entry` if its cell is new or it beats the stored one (keeping the cell's counts)."""
        old = self.entries.get(entry.cell)
        if old is not None and not better(entry.score, entry.optimizer_steps, old):
            return False
        if old is not None:
            entry.times_chosen, entry.times_improved = old.times_chosen, old.times_improved
        self.entries[entry.cell] = entry
        return True

    def weight(self, entry: CellEntry) -> float:
        chosen = 1 + entry.times_chosen
        return 1 / np.sqrt(chosen) + self.improvement_bonus * entry.times_improved / chosen

    def select(
        self, rng: np.random.Generator, explorable: Callable[[CellEntry], bool] | None = None
    ) -> CellEntry | None:
        """Draw an unfinished cell (one that `explorable` accepts, if given) with probability proportional to its
        weight; None if there is none."""
        candidates = [e for e in self.entries.values() if not e.finished and (explorable is None or explorable(e))]
        if not candidates:
            return None
        weights = np.array([self.weight(e) for e in candidates])
        return candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]

    def best(self) -> CellEntry:
        """Best finished, non-diverged trajectory; the best entry overall if there is none."""
        if not self.entries:
            raise ValueError("the archive is empty")
        finished = [e for e in self.entries.values() if e.finished and np.isfinite(e.score)]
        best = None
        for entry in finished or list(self.entries.values()):
            if best is None or better(entry.score, entry.optimizer_steps, best):
                best = entry
        assert best is not None
        return best

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the archive as JSON (no snapshots), atomically."""
        data = {
            "format": ARCHIVE_FORMAT,
            "version": ARCHIVE_VERSION,
            "improvement_bonus": self.improvement_bonus,
            "metadata": self.metadata,
            "cells": [entry.to_dict() for entry in self.entries.values()],
        }
        write_atomic(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Archive:
        """Read an archive written by save(); entries come back without snapshots."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != ARCHIVE_FORMAT or data.get("version") not in (1, ARCHIVE_VERSION):
            raise ValueError(
                f"{path} is not a Go-Explore archive: format={data.get('format')!r}, version={data.get('version')!r}; "
                f"expected format={ARCHIVE_FORMAT!r}, version 1 or {ARCHIVE_VERSION}"
            )
        archive = cls(data["improvement_bonus"], data["metadata"])
        for values in data["cells"]:
            entry = CellEntry.from_dict(values)
            archive.entries[entry.cell] = entry
        return archive
