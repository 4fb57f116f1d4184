"""A benchmark's plots: gap closed against search cost, loss against parameters, and the best allocations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.bench.config import BenchConfig
from agents.evaluation import paired_bootstrap
from agents.runs import draw_ranks, plt
from strato_env.models import find_target_modules, load_model


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # one colour per method
    return {m: palette(i % palette.N) for i, m in enumerate(methods)}


def anytime_plot(rows: list[dict[str, Any]]) -> plt.Figure:
    """Gap closed on the test instances against the optimizer steps spent per instance (budget scale 1): one
    curve per search over its caps, one point per other method; 95% bootstrap intervals over instances."""
    ok = [r for r in rows if r["status"] == "ok" and r["budget_scale"] == 1.0 and math.isfinite(r["gap_closed"])]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    colors = _colors(methods)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        mine = [r for r in ok if r["method"] == method]
        caps = sorted({r["search_steps"] for r in mine})
        points = []
        for cap in caps:
            at = [r for r in mine if r["search_steps"] == cap]
            by_instance: dict[str, list[float]] = {}
            for r in at:
                by_instance.setdefault(r["instance"], []).append(r["gap_closed"])
            mean, low, high = paired_bootstrap(by_instance)
            points.append((max(1.0, float(np.mean([r["optimizer_steps"] for r in at]))), mean, low, high))
        x, mean, low, high = (np.array(v) for v in zip(*points, strict=True))
        axis.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o-" if len(x) > 1 else "o", capsize=3,
                      color=colors[method], label=method)  # fmt: skip
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.axhline(1, color="grey", linewidth=0.8, linestyle="--")
    axis.set(xscale="log", xlabel="optimizer steps per test instance (1 = none)", ylabel="gap closed (test)",
             title="Gap closed against search cost")  # fmt: skip
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def loss_params_plot(rows: list[dict[str, Any]]) -> plt.Figure:
    """Every finished cell's test loss relative to uniform LoRA's (same instance, seed and scale) against its
    parameters as a share of the budget, by method."""
    uniform = {(r["instance"], r["seed"], r["budget_scale"]): r["final_loss"] for r in rows if r["method"] == "uniform"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = _colors(methods)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        points = [
            (r["params"] / r["budget"], r["final_loss"] / uniform[(r["instance"], r["seed"], r["budget_scale"])])
            for r in rows
            if r["method"] == method
            and r["status"] == "ok"
            and uniform.get((r["instance"], r["seed"], r["budget_scale"]))
        ]
        if points:
            axis.scatter(*zip(*points, strict=True), s=14, alpha=0.6, color=colors[method], label=method)
    axis.axhline(1, color="grey", linewidth=0.8)
    axis.set(xlabel="parameters / budget", ylabel="test loss / uniform LoRA's", yscale="log",
             title="Loss against parameters (every cell)")  # fmt: skip
    axis.legend(fontsize=7, loc="best")
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
