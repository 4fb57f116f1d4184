"""What a benchmark writes once its cells are done: results.csv, summary.md (mean and 95% CI), the plots, and
its section of a published RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from agents.bench.config import BenchConfig
from agents.bench.plots import best_so_far_plot, loss_params_plot, rank_plot
from agents.evaluation import gap_closed, mean_ci
from agents.methods import METHODS
from agents.runs import RunFolder
from strato_env.files import write_atomic

COLUMNS = (
    "method",
    "instance",
    "seed",
    "budget_scale",
    "final_loss",
    "params",
    "budget",
    "gap_closed",
    "optimizer_steps",
    "final_steps",
    "wall_s",
    "status",
    "error",
)
MATCH_TARGET = 0.7
"""Text instances: the goal is uniform LoRA's loss at this share of its parameters, or fewer."""


def instance_labels(config: BenchConfig) -> list[str]:
    """A readable, unique label per test instance, e.g. 'llama-tiny/planted/top-heavy'."""
    labels: list[str] = []
    for instance in config.test_instances:
        label = config.env_config(instance).label
        labels.append(label if label not in labels else f"{label}#{len(labels)}")
    return labels


def table_rows(config: BenchConfig, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One results.csv row per cell; gap closed against the uniform and oracle rows of the same instance, seed
    and budget scale."""
    labels = instance_labels(config)
    reference = {(c["method"], c["instance"], c["seed"], c["scale"]): c.get("final_loss") for c in cells}
    rows = []
    for c in cells:
        ok = c["status"] == "ok"
        uniform = reference.get(("uniform", c["instance"], c["seed"], c["scale"]))
        oracle = reference.get(("oracle", c["instance"], c["seed"], c["scale"]))
        gap = gap_closed(c["final_loss"], uniform, oracle) if ok else math.nan
        rows.append(
            {
                "method": c["method"],
                "instance": labels[c["instance"]],
                "seed": c["seed"],
                "budget_scale": c["scale"],
                **{k: c.get(k, math.nan) if ok else math.nan for k in ("final_loss", "params", "budget")},
                "gap_closed": gap,
                **{k: c.get(k, math.nan) if ok else math.nan for k in ("optimizer_steps", "final_steps")},
                "wall_s": round(c.get("wall_s", math.nan), 3),
                "status": c["status"],
                "error": c.get("error", ""),
            }
        )
    return rows


# ---- summary.md ---------------------------------------------------------------------------------------------
def _fmt(mean: float, half: float, digits: str = ".4g") -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:{digits}}" + (f" ± {half:{digits}}" if math.isfinite(half) else "")


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, list[dict[str, Any]]]]:
    grouped: dict[tuple[str, float], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[(row["instance"], row["budget_scale"])][row["method"]].append(row)
    return grouped


def _instance_table(by_method: dict[str, list[dict[str, Any]]]) -> list[str]:
    means = {m: mean_ci([r["final_loss"] for r in rs])[0] for m, rs in by_method.items()}
    compared = {m: v for m, v in means.items() if not METHODS[m].reference and math.isfinite(v)}
    best = min(compared, key=compared.get) if compared else None
    lines = [
        "| method | final loss | gap closed | params / budget | search steps | wall s | cells ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, rs in by_method.items():
        ok = [r for r in rs if r["status"] == "ok"]
        name = f"**{method}**" if method == best else method
        loss = _fmt(*mean_ci([r["final_loss"] for r in ok]))
        gap = _fmt(*mean_ci([r["gap_closed"] for r in ok]), ".3f")
        share = _fmt(*mean_ci([r["params"] / r["budget"] for r in ok]), ".3f")
        steps = _fmt(*mean_ci([r["optimizer_steps"] for r in ok]), ".0f")
        wall = _fmt(*mean_ci([r["wall_s"] for r in ok]), ".1f")
        lines.append(f"| {name} | {loss} | {gap} | {share} | {steps} | {wall} | {len(ok)}/{len(rs)} |")
    return lines


def _held_out_gaps(rows: list[dict[str, Any]]) -> list[str]:
    """Gap closed per method over every held-out planted (instance, seed) at budget scale 1."""
    gaps: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        reference = METHODS[row["method"]].reference
        if row["budget_scale"] == 1.0 and math.isfinite(row["gap_closed"]) and not reference:
            gaps[row["method"]].append(row["gap_closed"])
    if not gaps:
        return []
    lines = [
        "## Gap closed over all held-out planted instances",
        "",
        "Mean and 95% CI over every (instance, seed) cell at budget scale 1.",
        "",
        "| method | gap closed | cells |",
        "|---|---|---|",
    ]
    for method, values in sorted(gaps.items(), key=lambda item: -np.mean(item[1])):
        lines.append(f"| {method} | {_fmt(*mean_ci(values), '.3f')} | {len(values)} |")
    return lines + [""]


def _parameters_to_match(rows: list[dict[str, Any]], planted: set[str]) -> list[str]:
    """Text instances: the fewest parameters (as a share of uniform's) at which a method matches uniform's loss."""
    grouped = _groups(rows)
    lines: list[str] = []
    for instance in dict.fromkeys(r["instance"] for r in rows):
        scales = sorted({s for (i, s) in grouped if i == instance})
        if instance in planted or 1.0 not in scales:
            continue
        uniform = grouped[(instance, 1.0)].get("uniform", [])
        target = mean_ci([r["final_loss"] for r in uniform])[0]
        params = mean_ci([r["params"] for r in uniform])[0]
        if not math.isfinite(target):
            continue
        if not lines:
            lines = [
                "## Parameters needed to match uniform LoRA (no oracle)",
                "",
                f"Smallest budget scale whose mean final loss is at most uniform LoRA's at scale 1, and the "
                f"parameters used there as a share of uniform's; the goal is {MATCH_TARGET}x or fewer.",
                "",
                "| instance | method | loss at scale 1 | matches at scale | params / uniform's | goal met |",
                "|---|---|---|---|---|---|",
            ]
        methods = dict.fromkeys(m for s in scales for m in grouped[(instance, s)])
        for method in methods:
            at_one = _fmt(*mean_ci([r["final_loss"] for r in grouped[(instance, 1.0)].get(method, [])]))
            match = None
            for scale in scales:
                found = grouped[(instance, scale)].get(method, [])
                if found and mean_ci([r["final_loss"] for r in found])[0] <= target:
                    match = (scale, mean_ci([r["params"] for r in found])[0] / params)
                    break
            if match is None:
                lines.append(f"| {instance} | {method} | {at_one} | none | n/a | no |")
            else:
                goal = "yes" if match[1] <= MATCH_TARGET else "no"
                lines.append(f"| {instance} | {method} | {at_one} | {match[0]:g} | {match[1]:.3f} | {goal} |")
    return lines + [""] if lines else []


def summary_markdown(
    config: BenchConfig, rows: list[dict[str, Any]], command: str | None, images: list[str], prefix: str = ""
) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    planted = {
        label
        for label, instance in zip(instance_labels(config), config.test_instances, strict=True)
        if config.env_config(instance).task.name == "planted"
    }
    lines = [
        f"# Benchmark `{config.name}`",
        "",
        f"- Command: `{command or 'strato bench'}`",
        f"- Cells: {len(rows)} ({len(rows) - len(failed)} finished, {len(failed)} failed); seeds {config.seeds}",
        f"- Methods: {', '.join(dict.fromkeys(r['method'] for r in rows))}",
        f"- Search cap: {config.search_steps} optimizer steps per cell; final-quality run: one episode of "
        f"{config.episode_steps} optimizer steps from the cell's seed, for every method",
        "",
        "Final loss: the method's allocation trained statically for one episode. Gap closed = (L_uniform - L) / "
        "(L_uniform - L_oracle) at the same instance, seed and budget (planted instances). Mean ± 95% CI "
        "(Student t) over seeds; **bold**: the best mean final loss per table, references excluded. Policies "
        "(ppo, a2c, maskable_ppo) trained on the train instances and act once on each held-out one; their search "
        "steps include their training.",
        "",
    ]
    for (instance, scale), by_method in _groups(rows).items():
        budgets = {r["budget"] for rs in by_method.values() for r in rs if r["status"] == "ok"}
        budget = f"budget {budgets.pop()}" if len(budgets) == 1 else "budget n/a"
        lines += [f"## {instance} ({budget}, scale {scale:g})", "", *_instance_table(by_method), ""]
    lines += _held_out_gaps(rows)
    lines += _parameters_to_match(rows, planted)
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {r['method']} on {r['instance']}, seed {r['seed']}: {r['error']}" for r in failed]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{Path(name).stem}]({prefix}{name})" for name in images] + [""]
    return "\n".join(lines)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def write_report(
    folder: RunFolder, config: BenchConfig, cells: list[dict[str, Any]], command: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """results.csv, the plots, then summary.md (last, so a summary always comes with its figures).

    Returns the results rows and the plot file names, in the summary's order."""
    labels = instance_labels(config)
    rows = table_rows(config, cells)
    folder.write_csv("results.csv", [{k: row[k] for k in COLUMNS} for row in rows])
    images = ["best_so_far.png", "loss_vs_params.png"]
    folder.save_figure(images[0], best_so_far_plot(config, cells, labels))
    folder.save_figure(images[1], loss_params_plot(cells, labels))
    for index, label in enumerate(labels):
        images.append(f"ranks_{_slug(label)}.png")
        folder.save_figure(images[-1], rank_plot(config, cells, index, label))
    folder.write_text("summary.md", summary_markdown(config, rows, command, images))
    folder.write_json("report.json", {"images": images, "command": command})
    return rows, images


def _machine() -> str:
    memory = ""
    if Path("/proc/meminfo").is_file():
        total = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
        memory = f", {total:.0f} GiB memory"
    import torch

    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores{memory}; Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def publish_results(
    folder: RunFolder,
    config: BenchConfig,
    rows: list[dict[str, Any]],
    images: list[str],
    target: str,
    command: str | None,
) -> Path:
    """Write this benchmark's section of `target`/RESULTS.md (replacing an earlier one) and copy its plots
    (`rows` and `images` as `write_report` returns them)."""
    plots = Path(target) / "results" / str(config.name)
    plots.mkdir(parents=True, exist_ok=True)
    for name in images:
        shutil.copyfile(folder.path / name, plots / name)
    body = summary_markdown(config, rows, command, images, prefix=f"results/{config.name}/")
    title, rest = body.split("\n", 1)
    stamp = f"\n\nRun on {time.strftime('%Y-%m-%d')} on {_machine()}; "
    stamp += f"wall time of the last invocation {folder.wall_seconds:.0f} s.\n"
    section = f"<!-- bench:{config.name} -->\n#{title}{stamp}{rest.replace(chr(10) + '#', chr(10) + '##')}"
    section += f"<!-- /bench:{config.name} -->\n"
    path = Path(target) / "RESULTS.md"
    text = (
        path.read_text()
        if path.is_file()
        else ("# Benchmark results\n\nWritten by `strato bench ... --publish benchmarks`; do not edit by hand.\n\n")
    )
    name = re.escape(str(config.name))
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + section
    write_atomic(path, text)
    return path
