"""A benchmark's plots: best loss against search cost, loss against parameters, and the best allocations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.bench.config import BenchConfig
from agents.evaluation import mean_ci
from agents.runs import draw_ranks, plt
from strato_env.models import find_target_modules, load_model


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    palette = plt.get_cmap("tab10")
    return {m: palette(i % 10) for i, m in enumerate(methods)}


def _best_so_far(history: list[list[float]], grid: np.ndarray) -> np.ndarray:
    """The best loss seen by each grid point of optimizer steps (NaN before the first point)."""
    values = np.full(len(grid), np.nan)
    best = math.inf
    points = sorted((s, v if math.isfinite(v) else math.inf) for s, v in history)
    index = 0
    for g, x in enumerate(grid):
        while index < len(points) and points[index][0] <= x:
            best = min(best, points[index][1])
            index += 1
        if math.isfinite(best):
            values[g] = best
    return values


def best_so_far_plot(config: BenchConfig, cells: list[dict[str, Any]], labels: list[str]) -> plt.Figure:
    """Per instance: best loss seen against optimizer steps spent, mean over seeds with a 95% CI band."""
    grid = np.linspace(0, config.search_steps, 120)
    methods = list(dict.fromkeys(c["method"] for c in cells))
    colors = _colors(methods)
    figure, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.8), squeeze=False)
    for index, axis in enumerate(axes[0]):
        for method in methods:
            runs = [
                c
                for c in cells
                if c["method"] == method and c["instance"] == index and c["scale"] == 1.0 and c["status"] == "ok"
            ]
            if not runs:
                continue
            if all(len(c["history"]) <= 1 for c in runs):  # one point per seed: its mean and CI
                steps, loss = zip(*[c["history"][-1] for c in runs], strict=True)
                (mean, half), x = mean_ci(loss), float(np.mean(steps))
                axis.errorbar(x, mean, yerr=half if math.isfinite(half) else None, fmt="o", color=colors[method])
                axis.plot([], [], "o", color=colors[method], label=method)
                continue
            curves = np.array([_best_so_far(c["history"], grid) for c in runs])
            usable = ~np.isnan(curves).any(axis=0)
            stats_ = [mean_ci(curves[:, g]) for g in range(len(grid))]
            mean = np.array([m for m, _ in stats_])
            half = np.nan_to_num(np.array([h for _, h in stats_]))
            axis.plot(grid[usable], mean[usable], color=colors[method], label=method)
            low, high = (mean - half)[usable], (mean + half)[usable]
            axis.fill_between(grid[usable], low, high, color=colors[method], alpha=0.2)
        axis.set(xlabel="optimizer steps spent", ylabel="best loss seen", yscale="log", title=labels[index])
    axes[0][-1].legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    return figure


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for params, loss in sorted(points):
        if loss < best:
            front.append((params, loss))
            best = loss
    return front


def loss_params_plot(cells: list[dict[str, Any]], labels: list[str]) -> plt.Figure:
    """Per instance: every cell's final loss against its parameters, by method, with the Pareto front."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    colors = _colors(methods)
    figure, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.8), squeeze=False)
    for index, axis in enumerate(axes[0]):
        mine = [c for c in cells if c["instance"] == index and c["status"] == "ok" and math.isfinite(c["final_loss"])]
        for method in methods:
            points = [(c["params"], c["final_loss"]) for c in mine if c["method"] == method]
            if points:
                axis.scatter(*zip(*points, strict=True), s=18, alpha=0.7, color=colors[method], label=method)
        front = _pareto([(c["params"], c["final_loss"]) for c in mine])
        if front:
            axis.step(*zip(*front, strict=True), where="post", color="k", linewidth=1, label="Pareto front")
        for budget in sorted({c["budget"] for c in mine}):
            axis.axvline(budget, color="grey", linestyle="--", linewidth=0.8)
        axis.set(xlabel="trainable parameters", ylabel="final loss", yscale="log", title=labels[index])
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    return figure


def rank_plot(config: BenchConfig, cells: list[dict[str, Any]], index: int, label: str) -> plt.Figure:
    """One instance: the best allocation (lowest final loss over seeds, budget scale 1) of each method."""
    env = config.env_config(config.test_instances[index])
    modules = find_target_modules(load_model(env.model), env.target_modules)
    best: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c["instance"] == index and c["scale"] == 1.0 and c["status"] == "ok" and math.isfinite(c["final_loss"]):
            if c["method"] not in best or c["final_loss"] < best[c["method"]]["final_loss"]:
                best[c["method"]] = c
    columns = min(len(best), 4) or 1
    rows = math.ceil(len(best) / columns) or 1
    layers = len({m.layer for m in modules})
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.4 * columns, (0.35 * layers + 2.4) * rows), squeeze=False, layout="constrained"
    )
    for axis, (method, cell) in zip(axes.flat, best.items(), strict=False):
        image = draw_ranks(axis, modules, cell["allocation"], f"{method} (loss {cell['final_loss']:.3g})", env.r_max)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(best) :]:
        axis.set_visible(False)
    if best:
        figure.colorbar(image, ax=axes, label="LoRA rank", shrink=0.6)
    figure.suptitle(f"{label}: best allocation per method (lowest final loss over seeds)")
    return figure
