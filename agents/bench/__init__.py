"""`strato bench`: methods x held-out instances x seeds at equal budget and equal cost.

`config` (BenchConfig), `cells` (the grid and what one cell does), `executors` (serial, process pool, Ray),
`run` (resumable run folder), `report` (results.csv, summary.md, RESULTS.md) and `plots`.
"""

from agents.bench.config import BenchConfig, load_bench_config
from agents.bench.run import run_bench

__all__ = ["BenchConfig", "load_bench_config", "run_bench"]
