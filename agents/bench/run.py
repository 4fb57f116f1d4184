"""`strato bench`: run (or resume) a grid of methods x held-out instances x seeds (x budget scales) at equal
budget and equal cost, then write its report.

Cells run in this process (`workers=1`), in a process pool, or on Ray (`backend="ray"`). Each finished cell is
written to `cells/` at once, so an interrupted benchmark resumes where it stopped; a cell that fails is
recorded with its error and the grid goes on.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from agents.bench.cells import Cell, grid
from agents.bench.config import BenchConfig
from agents.bench.executors import BACKENDS, execute, import_ray
from agents.bench.report import publish_results, write_report
from agents.methods import METHODS
from agents.runs import RunFolder
from strato_env.files import write_atomic
from strato_env.validation import check_choice, check_int


class BenchFolder(RunFolder):
    """The benchmark's run folder: config.yaml, cells/*.json, policies/*, then results.csv, summary.md, plots.

    An existing folder of the same benchmark (identical config.yaml) is resumed; another one is refused.
    """

    def __init__(self, config: BenchConfig) -> None:
        path = Path(config.runs_dir) / str(config.name)
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        resume = path.is_dir() and any(path.iterdir())
        if resume and (not (path / "config.yaml").is_file() or (path / "config.yaml").read_text() != text):
            raise ValueError(
                f"run folder {path} holds another benchmark (its config.yaml differs); "
                "choose another name=... or remove the folder"
            )
        super().__init__(config.runs_dir, str(config.name), resume=resume)
        if not resume:
            self.write_text("config.yaml", text)

    def finished_cell(self, cell: Cell) -> dict[str, Any] | None:
        path = self.path / "cells" / f"{cell.key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def policy(self, method: str, seed: int) -> dict[str, Any] | None:
        meta = self.path / "policies" / f"{method}-s{seed}.json"
        if not meta.is_file():
            return None
        values = json.loads(meta.read_text())
        if values["status"] == "ok":
            values["policy"] = (self.path / "policies" / f"{method}-s{seed}.zip").read_bytes()
        return values


def run_bench(
    config: BenchConfig,
    workers: int = 1,
    backend: str = "process",
    command: str | None = None,
    publish: str | None = None,
) -> Path:
    """Run (or resume) the grid and write the run folder; returns its path."""
    check_int("workers", workers, 1)
    check_choice("backend", backend, BACKENDS)
    if backend == "ray":
        import_ray()
    folder = BenchFolder(config)
    values = config.to_dict()
    cells = grid(config)
    rows: dict[str, dict[str, Any]] = {}
    policies: dict[str, dict[str, Any]] = {}
    try:
        config.pretrain_bases()
        for cell in cells:
            if (done := folder.finished_cell(cell)) is not None and done["status"] == "ok":
                rows[cell.key] = done
        for method in config.policies:
            for seed in config.seeds:
                if (done := folder.policy(method, seed)) is not None and done["status"] == "ok":
                    policies[f"{method}-s{seed}"] = done
        todo = [c for c in cells if c.key not in rows]
        policy_tasks = [
            {"kind": "policy", "config": values, "method": m, "seed": s}
            for m in config.policies
            for s in config.seeds
            if f"{m}-s{s}" not in policies and any(c.policy_key == f"{m}-s{s}" for c in todo)
        ]
        first = [t for t in todo if not METHODS[t.method].learned]
        bar = tqdm(total=len(todo) + len(policy_tasks), desc=f"bench {config.name}", unit="task")

        def on_result(task: dict[str, Any], result: dict[str, Any]) -> None:
            if task["kind"] == "policy":
                key = f"{task['method']}-s{task['seed']}"
                if result["status"] == "ok":
                    write_atomic(folder.path / "policies" / f"{key}.zip", result["policy"])
                meta = {k: v for k, v in result.items() if k != "policy"}
                write_atomic(folder.path / "policies" / f"{key}.json", json.dumps(meta, indent=2))
                policies[key] = result
                bar.update()
            else:  # one result per cell, or the group's error for each
                results = result.get("results") or [result] * len(task["cells"])
                for cell_values, cell_result in zip(task["cells"], results, strict=True):
                    cell = Cell(**cell_values)
                    row = asdict(cell) | cell_result
                    write_atomic(folder.path / "cells" / f"{cell.key}.json", json.dumps(row, indent=2))
                    rows[cell.key] = row
                    bar.set_postfix_str(f"{cell.key}: {cell_result['status']}")
                    bar.update()

        def cell_tasks(group_cells: list[Cell]) -> list[dict[str, Any]]:
            """One task per held-out instance, budget scale and seed: its final retrains run together."""
            groups: dict[tuple[int, float, int], list[Cell]] = {}
            for cell in group_cells:
                groups.setdefault((cell.instance, cell.scale, cell.seed), []).append(cell)
            return [
                {
                    "kind": "cells",
                    "config": values,
                    "cells": [asdict(c) for c in members],
                    "policies": {c.policy_key: policies[c.policy_key] for c in members if METHODS[c.method].learned},
                }
                for members in groups.values()
            ]

        execute(policy_tasks + cell_tasks(first), workers, backend, on_result)
        ready = []
        for cell in (c for c in todo if METHODS[c.method].learned):
            policy = policies.get(cell.policy_key, {"status": "error", "error": "policy training did not run"})
            if policy["status"] != "ok":
                on_result(
                    {"kind": "cells", "cells": [asdict(cell)]},
                    {"status": "error", "error": f"policy training failed: {policy['error']}", "wall_s": 0.0},
                )
            else:
                ready.append(cell)
        execute(cell_tasks(ready), workers, backend, on_result)
        bar.close()
        results, images = write_report(folder, config, [rows[c.key] for c in cells], command)
        if publish is not None:
            publish_results(folder, config, results, images, publish, command)
    except BaseException as error:
        folder.mark_interrupted(f"{type(error).__name__}: {error}")
        raise
    folder.finish()
    return folder.path
