"""Calibration of the generated planted instances: how often the oracle's loss is at most half uniform LoRA's.

Each instance (`task.profile=generated`, one per family and generator seed) is trained statically for one
episode with the oracle allocation and with uniform LoRA at the oracle's parameter count, from seed 0; the
figure is the share of instances with L_oracle / L_uniform <= 0.5 (the aim: >= 90%).

    python benchmarks/planted_calibration.py --seeds 100-129 --models gpt2-tiny llama-tiny bert-tiny

Use generator seeds apart from the bench's instance sets when tuning the generator.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm.auto import tqdm

from agents.evaluation import calibration_ratio
from strato_env.engine import keep_freed_memory
from strato_env.env import RankAllocationEnv

THRESHOLD = 0.5


def seed_range(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_range, default=seed_range("100-119"), help="generator seeds, e.g. 100-119")
    parser.add_argument("--models", nargs="+", default=["gpt2-tiny", "llama-tiny", "bert-tiny"])
    args = parser.parse_args()
    keep_freed_memory()
    start = time.perf_counter()
    rows = []
    cases = [(model, seed) for model in args.models for seed in args.seeds]
    for model, seed in tqdm(cases, desc="calibration", unit="instance"):
        env = RankAllocationEnv(model=model, task={"profile": "generated", "data_seed": seed}, probe_steps=0)
        planted = [r for r in env.oracle_allocation.values() if r]
        rows.append((model, seed, len(planted), len(env.modules), env.budget, calibration_ratio(env)))
    print(f"{'model':<12} {'seed':>5} {'planted':>8} {'budget':>7} {'oracle/uniform':>15}")
    for model, seed, planted, modules, budget, ratio in rows:
        print(f"{model:<12} {seed:>5} {planted:>4}/{modules:<3} {budget:>7} {ratio:>15.3f}")
    ratios = np.array([row[-1] for row in rows])
    share = float(np.mean(ratios <= THRESHOLD))
    print(
        f"\n{share:.0%} of {len(rows)} instances have L_oracle <= {THRESHOLD} x L_uniform (median ratio "
        f"{np.median(ratios):.3f}, worst {ratios.max():.3f}); {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
