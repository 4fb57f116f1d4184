"""Running a benchmark's tasks: in this process, in a process pool, or as Ray tasks."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from agents.bench.cells import run_task

BACKENDS = ("process", "ray")
OnResult = Callable[[dict[str, Any], dict[str, Any]], None]


def execute(tasks: list[dict[str, Any]], workers: int, backend: str, on_result: OnResult) -> None:
    """Run `tasks`, calling `on_result(task, result)` in this process as each one finishes."""
    if not tasks:
        return
    if backend == "ray":
        _execute_ray(tasks, workers, on_result)
    elif workers == 1:
        for task in tasks:
            on_result(task, run_task(task))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_task, task | {"threads": threads}): task for task in tasks}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as error:  # the worker process died
                    result = {"status": "error", "error": f"worker failed: {type(error).__name__}: {error}"}
                on_result(futures[future], result)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install 'strato-peft[ray]'") from None
    return ray


def _execute_ray(tasks: list[dict[str, Any]], workers: int, on_result: OnResult) -> None:
    """Each task a Ray task of one CPU; uses the running Ray (or RAY_ADDRESS's cluster), else starts a local one."""
    ray = import_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_task)
    pending = {remote.remote(task | {"threads": 1}): task for task in tasks}
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done)
        try:
            result = ray.get(done)
        except Exception as error:  # the Ray worker died
            result = {"status": "error", "error": f"worker failed: {type(error).__name__}: {error}"}
        on_result(task, result)
