"""Time of `env.step` against a plain peft training loop doing the same optimizer steps and evaluation.

Both run side by side in one process on the same model, data, allocation and batch order; the ratio
(env / plain) is printed last. Usage: python benchmarks/env_overhead.py [--model gpt2-tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from strato_env.engine import keep_freed_memory
from strato_env.env import KEEP, RankAllocationEnv
from strato_env.models import fan_in_fan_out


def plain_peft_decision(model, optimizer, env: RankAllocationEnv, rows: np.ndarray) -> float:
    """What one decision costs without the env: `inner_steps` AdamW steps, then the evaluation loss."""
    size = env.config.batch_size
    for step in range(env.config.inner_steps):
        index = torch.as_tensor(rows[step * size : (step + 1) * size])
        loss = env.data.loss(model, {k: v[index] for k, v in env.data.train.items()})[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        eval_size = len(env.data.eval["input_ids"])
        total = sum(
            env.data.loss(model, {k: v[s : s + size] for k, v in env.data.eval.items()})[0] * min(size, eval_size - s)
            for s in range(0, eval_size, size)
        )
    return float(total / eval_size)


def plain_peft_model(env: RankAllocationEnv, allocation: dict[str, int]) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """A peft LoRA model of the env's base with `allocation`'s ranks (scaling 1, as the env), and its AdamW."""
    adapted = {name: r for name, r in allocation.items() if r > 0}
    pattern = {re.escape(n): r for n, r in adapted.items()}
    base = env.fresh_base_model()
    config = LoraConfig(
        r=1,
        lora_alpha=1,
        target_modules=sorted(adapted),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=fan_in_fan_out(base, env.modules),
    )
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=env.config.learning_rate)
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--repeats", type=int, default=5, help="episodes per side (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    keep_freed_memory()  # as the strato command does
    if args.threads:
        torch.set_num_threads(args.threads)

    env = RankAllocationEnv(model=args.model)
    allocation = env.oracle_allocation
    adapted = {name: r for name, r in allocation.items() if r > 0}
    plain, optimizer = plain_peft_model(env, allocation)
    keep = np.full(env.action_space.shape, KEEP)
    per_decision = env.config.inner_steps * env.config.batch_size

    env_times, plain_times = [], []
    for repeat in range(args.repeats + 1):  # the first round warms up both sides and is not counted
        env.reset(seed=repeat, options={"allocation": allocation})
        order = env.data_order
        for decision in range(env.config.decisions):
            start = time.perf_counter()
            env.step(keep)
            env_time = time.perf_counter() - start
            start = time.perf_counter()
            plain_peft_decision(plain, optimizer, env, order[decision * per_decision : (decision + 1) * per_decision])
            plain_time = time.perf_counter() - start
            if repeat:
                env_times.append(env_time)
                plain_times.append(plain_time)

    env_ms, plain_ms = 1e3 * statistics.median(env_times), 1e3 * statistics.median(plain_times)
    print(
        f"model={args.model} modules={len(env.modules)} adapted={len(adapted)} "
        f"inner_steps={env.config.inner_steps} batch={env.config.batch_size}x{env.config.task.seq_len} "
        f"threads={torch.get_num_threads()} decisions timed={len(env_times)}"
    )
    print(f"env.step        median {env_ms:8.2f} ms per decision")
    print(f"plain peft loop median {plain_ms:8.2f} ms per decision")
    print(f"ratio env/plain: {env_ms / plain_ms:.3f}")


if __name__ == "__main__":
    main()
