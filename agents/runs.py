"""Run folders: every file written atomically, an UNFINISHED marker until the run completes, plots, report."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from strato_env.files import write_atomic  # noqa: E402
from strato_env.models import TargetModule  # noqa: E402

UNFINISHED = "UNFINISHED"


class RunFolder:
    """One run's folder. It holds an `UNFINISHED` marker from creation until `finish()`.

    `resume=True` reopens an existing folder (marked unfinished again) instead of refusing it.
    """

    def __init__(self, root: str | os.PathLike, name: str, resume: bool = False) -> None:
        self.path = Path(root) / name
        if not resume and self.path.exists() and any(self.path.iterdir()):
            raise ValueError(f"run folder {self.path} already exists and is not empty; choose another name")
        self.path.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        verb = "resumed" if resume else "started"
        write_atomic(self.path / UNFINISHED, f"{verb} {time.strftime('%Y-%m-%d %H:%M:%S')}; not complete yet\n")

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text)

    def write_yaml(self, name: str, values: Any) -> None:
        write_atomic(self.path / name, yaml.safe_dump(values, sort_keys=False))

    def write_json(self, name: str, values: Any) -> None:
        write_atomic(self.path / name, json.dumps(values, indent=2) + "\n")

    def write_csv(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path / name, buffer.getvalue())

    def save_figure(self, name: str, figure: plt.Figure) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        write_atomic(self.path / name, buffer.getvalue())

    def mark_interrupted(self, reason: str) -> None:
        write_atomic(self.path / UNFINISHED, f"interrupted after {time.time() - self.started:.0f} s: {reason}\n")

    def finish(self) -> None:
        (self.path / UNFINISHED).unlink()

    @property
    def wall_seconds(self) -> float:
        return time.time() - self.started


def is_complete(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and not (Path(path) / UNFINISHED).exists()


# ---- plots ----------------------------------------------------------------------------------------------------
def learning_curve(
    rows: Sequence[dict[str, Any]], x: str, title: str, validation: Sequence[dict[str, Any]] = ()
) -> plt.Figure:
    """Final loss and return of each training episode by `x`; `validation` rows (`x` and `return`) are drawn on
    the return panel."""
    figure, (loss_axis, return_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [row[x] for row in rows]
    loss_axis.plot(xs, [row["loss"] for row in rows], ".-", alpha=0.8)
    loss_axis.set(xlabel=x, ylabel="final evaluation loss", title=title, yscale="log")
    if rows and "return" in rows[0]:
        return_axis.plot(xs, [row["return"] for row in rows], ".-", color="tab:green", alpha=0.8, label="train")
        if validation:
            points = [row[x] for row in validation], [row["return"] for row in validation]
            return_axis.plot(*points, "o-", color="tab:red", label="validation (deterministic)")
            return_axis.legend()
        return_axis.set(xlabel=x, ylabel="episode return", title="return")
    else:
        return_axis.set_visible(False)
    figure.tight_layout()
    return figure


def _short_name(module: TargetModule) -> str:
    parts = module.name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else parts[-1]


def draw_ranks(
    axis: plt.Axes, modules: Sequence[TargetModule], allocation: dict[str, int], title: str, vmax: float | None = None
):
    """Ranks as a grid on `axis`: one row per layer, one column per module of a layer; returns the image.
    Colours run from rank 0 to `vmax` (default: the largest rank shown)."""
    columns = list(dict.fromkeys(_short_name(m) for m in modules))
    layers = sorted({m.layer for m in modules})
    grid = np.full((len(layers), len(columns)), np.nan)
    for m in modules:
        grid[layers.index(m.layer), columns.index(_short_name(m))] = allocation.get(m.name, 0)
    vmax = vmax if vmax is not None else max(np.nanmax(grid), 1)
    image = axis.imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=0, vmax=vmax)
    for (row, column), value in np.ndenumerate(grid):
        if not np.isnan(value):
            axis.text(column, row, int(value), ha="center", va="center", color="white" if value < vmax / 2 else "k")
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    axis.set_title(title)
    return image


def rank_heatmap(modules: Sequence[TargetModule], allocation: dict[str, int], title: str) -> plt.Figure:
    """One allocation's ranks by layer and module kind (see `draw_ranks`)."""
    columns = len({_short_name(m) for m in modules})
    figure, axis = plt.subplots(figsize=(1.1 * columns + 2, 0.45 * len({m.layer for m in modules}) + 1.6))
    figure.colorbar(draw_ranks(axis, modules, allocation, title), ax=axis, label="LoRA rank")
    return figure


def loss_versus_params(
    points: Sequence[dict[str, Any]], references: dict[str, tuple[float, float]], budget: int, title: str
) -> plt.Figure:
    """Each point: an allocation's parameters and loss; references (uniform, oracle) as labelled markers."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.scatter([p["params"] for p in points], [p["loss"] for p in points], s=14, alpha=0.6, label="episodes")
    for (label, (params, loss)), marker in zip(references.items(), "*Ds^", strict=False):
        axis.scatter([params], [loss], marker=marker, s=120, label=label, edgecolor="k")
    axis.axvline(budget, color="grey", linestyle="--", label="budget")
    axis.set(xlabel="trainable parameters", ylabel="final evaluation loss", yscale="log", title=title)
    axis.legend(fontsize=8)
    return figure
