"""What a benchmark writes once its cells are done: results.csv, summary.md (the search and amortized tracks with
paired statistics, then per-instance tables), the plots, and its section of a published RESULTS.md."""

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
from agents.bench.plots import anytime_plot, loss_params_plot, rank_plot
from agents.evaluation import gap_closed, mean_ci, paired_bootstrap
from agents.methods import METHODS
from agents.runs import RunFolder
from strato_env.files import write_atomic

COLUMNS = (
    "method",
    "instance",
    "seed",
    "budget_scale",
    "search_steps",
    "final_loss",
    "static_loss",
    "params",
    "budget",
    "gap_closed",
    "gap_reference",
    "optimizer_steps",
    "meta_steps",
    "meta_wall_s",
    "final_steps",
    "wall_s",
    "status",
    "error",
)
MATCH_TARGET = 0.7
"""Text instances: the goal is uniform LoRA's loss at this share of its parameters, or fewer."""
ONE_SHOT = ("uniform", "greedy", "greedy_iterative", "linear_depth", "adalora")
"""Methods without a search that the amortized track compares policies with."""
RANK_PLOTS = 4
"""Rank plots are drawn for the first test instances only."""


def instance_labels(config: BenchConfig) -> list[str]:
    """A readable, unique label per test instance, e.g. 'llama-tiny/planted/top-heavy'."""
    labels: list[str] = []
    for instance in config.test_instances:
        label = config.env_config(instance).label
        labels.append(label if label not in labels else f"{label}#{len(labels)}")
    return labels


def method_label(row: dict[str, Any]) -> str:
    """'random@800' for a search-track cell with a step cap, else the method's name."""
    return f"{row['method']}@{row['search_steps']}" if row.get("search_steps") else row["method"]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def table_rows(config: BenchConfig, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One results.csv row per cell. Gap closed is measured against uniform LoRA and the oracle of the same
    instance, seed and budget scale where the oracle exists (planted, scale 1), else against the best final loss
    any method reached there ('best found'). A finished cell whose final loss is not finite is a failure."""
    labels = instance_labels(config)
    ok = [c for c in cells if c["status"] == "ok" and _finite(c.get("final_loss"))]
    reference: dict[tuple, float] = {}
    best: dict[tuple, float] = {}
    for c in ok:
        where = (c["instance"], c["seed"], c["scale"])
        if c["method"] in ("uniform", "oracle"):
            reference[(c["method"], *where)] = c["final_loss"]
        best[where] = min(best.get(where, math.inf), c["final_loss"])
    rows = []
    for c in cells:
        where = (c["instance"], c["seed"], c["scale"])
        status, error = c["status"], c.get("error", "")
        if status == "ok" and not _finite(c.get("final_loss")):
            status, error = "non-finite", f"final loss {c.get('final_loss')}"
        good = status == "ok"
        oracle = reference.get(("oracle", *where))
        target = oracle if oracle is not None else best.get(where)
        uniform = reference.get(("uniform", *where))
        gap = gap_closed(c["final_loss"], uniform, target) if good else math.nan
        rows.append(
            {
                "method": c["method"],
                "instance": labels[c["instance"]],
                "seed": c["seed"],
                "budget_scale": c["scale"],
                "search_steps": c.get("steps", 0),
                **{k: c.get(k, math.nan) if good else math.nan for k in ("final_loss", "static_loss", "params")},
                "budget": c.get("budget", math.nan) if good else math.nan,
                "gap_closed": gap,
                "gap_reference": "oracle" if oracle is not None else "best found",
                **{
                    k: c.get(k, math.nan) if good else math.nan
                    for k in ("optimizer_steps", "meta_steps", "meta_wall_s", "final_steps")
                },
                "wall_s": round(c.get("wall_s", math.nan), 3),
                "status": status,
                "error": error,
            }
        )
    return rows


# ---- statistics over test instances -------------------------------------------------------------------------
def _by_label(rows: list[dict[str, Any]], scale: float) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["budget_scale"] == scale:
            grouped[method_label(row)].append(row)
    return grouped


def _per_instance(rows: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        values[row["instance"]].append(row[key])
    return values


def _paired(rows: list[dict[str, Any]], against: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per instance, the relative final-loss differences (L - L_ref) / L_ref of cells paired by seed."""
    reference = {(r["instance"], r["seed"]): r["final_loss"] for r in against}
    differences: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        ref = reference.get((row["instance"], row["seed"]))
        if ref is not None and _finite(ref) and _finite(row["final_loss"]) and ref > 0:
            differences[row["instance"]].append((row["final_loss"] - ref) / ref)
    return differences


def _interval(mean: float, low: float, high: float, digits: str = ".3f", percent: bool = False) -> str:
    if not math.isfinite(mean):
        return "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    text = f"{mean * scale:+{digits}}{unit} [{low * scale:+{digits}}, {high * scale:+{digits}}]"
    if percent and (high < 0 or low > 0):  # a paired interval that excludes 0: a claim
        text = f"**{text}**"
    return text


def _failures(rows: list[dict[str, Any]]) -> str:
    failed = sum(r["status"] != "ok" for r in rows)
    return f"{len(rows) - failed}/{len(rows)}"


def _track_table(
    labels: list[str],
    grouped: dict[str, list[dict[str, Any]]],
    uniform: list[dict[str, Any]],
    greedy: list[dict[str, Any]],
    extra: dict[str, str] | None = None,
) -> list[str]:
    """One row per method label: gap closed and paired Δ loss (bootstrap intervals), mean steps per instance,
    the `extra` columns (title -> row key, means) and the cells that finished."""
    extra = extra or {}
    head = "| method | gap closed | vs uniform: Δ loss | vs greedy: Δ loss | steps per instance |"
    lines = [head + "".join(f" {title} |" for title in extra) + " cells ok |", "|---" * (6 + len(extra)) + "|"]
    for label in labels:
        rs = grouped[label]
        good = [r for r in rs if r["status"] == "ok"]
        gap = _interval(*paired_bootstrap(_per_instance(good, "gap_closed")))
        vs_uniform = _interval(*paired_bootstrap(_paired(good, uniform)), ".1f", percent=True)
        vs_greedy = _interval(*paired_bootstrap(_paired(good, greedy)), ".1f", percent=True)
        row = f"| {label} | {gap} | {vs_uniform} | {vs_greedy} |"
        for key in ["optimizer_steps", *extra.values()]:
            value = np.mean([r[key] for r in good]) if good else math.nan
            row += f" {value:.0f} |" if math.isfinite(value) else " n/a |"
        lines.append(row + f" {_failures(rs)} |")
    return lines


STATISTICS = (
    "Gap closed = (L_uniform - L) / (L_uniform - L_ref), L_ref the planted oracle's loss (or, where there is none, "
    "the best final loss any method reached on that instance, seed and scale). Δ loss = (L - L_ref) / L_ref paired "
    "by instance and seed against uniform LoRA or greedy (negative: better). Every figure is the mean over test "
    "instances of the mean over seeds, with a 95% bootstrap interval resampling instances and seeds within them; "
    "**bold**: a paired interval that excludes 0, the only case a win (or a loss) is claimed. Failed and "
    "non-finite cells are counted in 'cells ok' and left out of the means."
)


def _search_track(rows: list[dict[str, Any]]) -> list[str]:
    grouped = _by_label(rows, 1.0)
    uniform, greedy = grouped.get("uniform", []), grouped.get("greedy", [])
    labels = [k for k in grouped if not METHODS[grouped[k][0]["method"]].learned]
    if not labels:
        return []
    order = list(METHODS)
    labels.sort(key=lambda k: (order.index(grouped[k][0]["method"]), grouped[k][0]["search_steps"]))
    return [
        "## Search track (test instances, budget scale 1)",
        "",
        "Each method searches each test instance on its own; `method@N` is a search capped at N optimizer steps "
        "(its anytime curve), charged its probe if it reads one. The allocation found is trained statically for "
        "one episode and scored on the test set.",
        "",
        *_track_table(labels, grouped, uniform, greedy),
        "",
    ]


def _amortized_track(rows: list[dict[str, Any]]) -> list[str]:
    grouped = _by_label(rows, 1.0)
    policies = [k for k in grouped if METHODS[grouped[k][0]["method"]].learned]
    if not policies:
        return []
    uniform, greedy = grouped.get("uniform", []), grouped.get("greedy", [])
    labels = policies + [m for m in ONE_SHOT if m in grouped]
    lines = [
        "## Amortized track (test instances, budget scale 1)",
        "",
        "Policies are meta-trained once per seed on the train instances (meta steps and wall seconds, apart), then "
        "act for one episode on each test instance: steps per instance = probe + that episode, and the score is "
        "the test loss of the adapter that episode trained. One-shot methods for comparison: uniform LoRA's "
        "episode, greedy (probe + one episode), iterative greedy (probe + its episode, its allocation retrained), "
        "linear-in-depth, AdaLoRA (one run).",
        "",
        *_track_table(labels, grouped, uniform, greedy, {"meta steps": "meta_steps", "meta wall s": "meta_wall_s"}),
        "",
    ]
    searches = [k for k in grouped if METHODS[grouped[k][0]["method"]].anytime]
    if searches:
        lines += [
            "Break-even: the number of test instances after which meta-training plus the policy's per-instance "
            "steps cost fewer optimizer steps than the search on each; with the policy's paired Δ loss against it.",
            "",
            "| policy | search | Δ loss vs search | break-even instances |",
            "|---|---|---|---|",
        ]
        for policy in policies:
            good = [r for r in grouped[policy] if r["status"] == "ok"]
            if not good:
                continue
            meta = np.mean([r["meta_steps"] for r in good])
            own = np.mean([r["optimizer_steps"] for r in good])
            for search in searches:
                theirs = [r for r in grouped[search] if r["status"] == "ok"]
                delta = _interval(*paired_bootstrap(_paired(good, theirs)), ".1f", percent=True)
                cost = np.mean([r["optimizer_steps"] for r in theirs]) if theirs else math.nan
                even = f"{math.ceil(meta / (cost - own))}" if cost > own else "never (the search is cheaper)"
                lines.append(f"| {policy} | {search} | {delta} | {even} |")
        lines.append("")
    return lines


def _instance_table(by_method: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| method | final loss | gap closed | params / budget | steps | wall s | cells ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, rs in by_method.items():
        ok = [r for r in rs if r["status"] == "ok"]
        loss = _fmt(*mean_ci([r["final_loss"] for r in ok]))
        gap = _fmt(*mean_ci([r["gap_closed"] for r in ok]), ".3f")
        share = _fmt(*mean_ci([r["params"] / r["budget"] for r in ok]), ".3f")
        steps = _fmt(*mean_ci([r["optimizer_steps"] for r in ok]), ".0f")
        wall = _fmt(*mean_ci([r["wall_s"] for r in ok]), ".1f")
        lines.append(f"| {method} | {loss} | {gap} | {share} | {steps} | {wall} | {_failures(rs)} |")
    return lines


def _fmt(mean: float, half: float, digits: str = ".4g") -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:{digits}}" + (f" ± {half:{digits}}" if math.isfinite(half) else "")


def _parameters_to_match(rows: list[dict[str, Any]], planted: set[str]) -> list[str]:
    """Text instances: the fewest parameters (as a share of uniform's) at which a method matches uniform's loss."""
    lines: list[str] = []
    for instance in dict.fromkeys(r["instance"] for r in rows):
        mine = [r for r in rows if r["instance"] == instance]
        scales = sorted({r["budget_scale"] for r in mine})
        if instance in planted or 1.0 not in scales:
            continue
        uniform = [r for r in mine if r["method"] == "uniform" and r["budget_scale"] == 1.0]
        target = mean_ci([r["final_loss"] for r in uniform])[0]
        params = mean_ci([r["params"] for r in uniform])[0]
        if not math.isfinite(target):
            continue
        if not lines:
            lines = [
                "## Parameters needed to match uniform LoRA (no oracle)",
                "",
                f"Smallest budget scale whose mean test loss is at most uniform LoRA's at scale 1, and the "
                f"parameters used there as a share of uniform's; the goal is {MATCH_TARGET}x or fewer.",
                "",
                "| instance | method | loss at scale 1 | matches at scale | params / uniform's | goal met |",
                "|---|---|---|---|---|---|",
            ]
        for label in dict.fromkeys(method_label(r) for r in mine):
            at = {s: [r for r in mine if method_label(r) == label and r["budget_scale"] == s] for s in scales}
            at_one = _fmt(*mean_ci([r["final_loss"] for r in at[1.0]]))
            match = next(
                (
                    (s, mean_ci([r["params"] for r in at[s]])[0] / params)
                    for s in scales
                    if at[s] and mean_ci([r["final_loss"] for r in at[s]])[0] <= target
                ),
                None,
            )
            if match is None:
                lines.append(f"| {instance} | {label} | {at_one} | none | n/a | no |")
            else:
                goal = "yes" if match[1] <= MATCH_TARGET else "no"
                lines.append(f"| {instance} | {label} | {at_one} | {match[0]:g} | {match[1]:.3f} | {goal} |")
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
    sets = ", ".join(
        f"{len(getattr(config, key))} {key.split('_')[0]}"
        for key in ("train_instances", "validation_instances", "test_instances")
    )
    lines = [
        f"# Benchmark `{config.name}`",
        "",
        f"- Command: `{command or 'strato bench'}`",
        f"- Instances: {sets}. Every figure below comes from the test instances, scored on their held-out test "
        "data (searches and policies select on validation data only), with final runs from seeds no search used.",
        f"- Cells: {len(rows)} ({len(rows) - len(failed)} finished, {len(failed)} failed or non-finite); "
        f"seeds {config.seeds}",
        f"- Search caps: {config.search_steps} optimizer steps; final-quality run: one episode of "
        f"{config.episode_steps} optimizer steps",
        "",
        STATISTICS,
        "",
    ]
    lines += _search_track(rows)
    lines += _amortized_track(rows)
    lines += _parameters_to_match(rows, planted)
    lines += ["## Per test instance", "", "Mean ± 95% CI (Student t) over seeds.", ""]
    grouped: dict[tuple[str, float], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[(row["instance"], row["budget_scale"])][method_label(row)].append(row)
    for (instance, scale), by_method in grouped.items():
        budgets = {r["budget"] for rs in by_method.values() for r in rs if r["status"] == "ok"}
        budget = f"budget {budgets.pop():.0f}" if len(budgets) == 1 else "budget n/a"
        lines += [f"### {instance} ({budget}, scale {scale:g})", "", *_instance_table(by_method), ""]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {method_label(r)} on {r['instance']}, seed {r['seed']}: {r['error']}" for r in failed]
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
    images = ["anytime.png", "loss_vs_params.png"]
    folder.save_figure(images[0], anytime_plot(rows))
    folder.save_figure(images[1], loss_params_plot(rows))
    for index, label in enumerate(labels[:RANK_PLOTS]):
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
    shutil.rmtree(plots, ignore_errors=True)  # no plot of an earlier run stays behind
    plots.mkdir(parents=True)
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
