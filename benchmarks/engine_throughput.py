"""Decisions per second of the batched engine against a plain peft training loop, side by side in one run.

Same model, data, allocation (every target module at rank `--rank`), batch order and steps on every side:
(a) a plain peft LoRA loop with torch AdamW (`inner_steps` steps, then the evaluation loss: one decision),
(b) the single env (`RankAllocationEnv.step`), (c) the vector env at N = 1, 4, 16, 64 (`RankAllocationVecEnv.step`,
N decisions per call). Also: achieved GFLOP/s from exact FLOP counts (torch's FlopCounterMode) against a
plain torch matmul measured in the same run, the LoRA training step against the frozen base's forward +
backward, and the resident memory. (d) bounds every engine: the same decisions' passes of the frozen base
alone over the N episodes' stacked batches, with no LoRA work at all. The N=16 speedup is printed last.

Usage: python benchmarks/engine_throughput.py [--model gpt2-tiny] [--widths 1,4,16,64] [--decisions 4]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from env_overhead import plain_peft_decision, plain_peft_model  # this script's folder
from torch.utils.flop_counter import FlopCounterMode

from strato_env.engine import BatchedLora, keep_freed_memory
from strato_env.env import KEEP, RankAllocationEnv
from strato_env.episodes import evaluate_losses, stack, train_step
from strato_env.vector import RankAllocationVecEnv


def rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """The machine's roofline here: GFLOP/s of a plain float32 matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def decision_flops(envs: RankAllocationVecEnv) -> int:
    """Exact FLOPs of one vector-env decision: `inner_steps` training steps and one evaluation pass."""
    batch = envs.batch
    rows = [batch.training_batch(sub.data, sub.episode.order, 0) for sub in batch.subs]
    snapshot = [batch.lora.snapshot(i) for i in range(batch.size)]
    with FlopCounterMode(display=False) as counter:
        train_step(batch.target, batch.lora, batch.loss, rows, range(batch.size))
    step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        evaluate_losses(batch.target, batch.lora, [s.data for s in batch.subs], batch.config.batch_size)
    for i, state in enumerate(snapshot):
        batch.lora.restore(i, state)
    return batch.config.inner_steps * step + counter.get_total_flops()


def frozen_decision(envs: RankAllocationVecEnv):
    """A function running one decision's passes of the frozen base alone over the N episodes' stacked batches:
    `inner_steps` forward + backward passes of the task's loss (gradients of the activations only, the part of
    a backward pass LoRA cannot skip) and the evaluation's forward passes. An engine adds LoRA's work to this,
    so N over its time bounds the decisions per second of any engine at width N."""
    batch = envs.batch
    model = batch.target.model
    stacked = stack([batch.training_batch(sub.data, sub.episode.order, 0) for sub in batch.subs])
    no_adapters = BatchedLora(batch.target, batch.size, batch.ladder[-1], learning_rate=0.0)
    datas = [sub.data for sub in batch.subs]

    def run() -> None:
        hook = model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_())
        try:
            for _ in range(batch.config.inner_steps):
                batch.loss(model, stacked, batch.size).sum().backward()
        finally:
            hook.remove()
        evaluate_losses(batch.target, no_adapters, datas, batch.config.batch_size)

    return run


def timed(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def base_versus_lora(env: RankAllocationEnv, repeats: int) -> tuple[float, float, float]:
    """(seconds of the frozen base's forward + backward, seconds of one LoRA training step, the LoRA step's FLOPs
    over the frozen pass's) on one batch."""
    batch = env.batch
    rows = [batch.training_batch(batch.subs[0].data, batch.subs[0].episode.order, 0)]
    model = env.fresh_base_model()
    embeddings = model.get_input_embeddings()

    def frozen() -> None:  # activations' gradients through every layer, no weight gradients: LoRA's floor
        inputs = embeddings(rows[0]["input_ids"]).detach().requires_grad_()
        out = model(inputs_embeds=inputs)
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().square().mean().backward()

    def lora() -> None:
        train_step(batch.target, batch.lora, batch.loss, rows, [0])

    flops = []
    for function in (frozen, lora):
        with FlopCounterMode(display=False) as counter:
            function()
        flops.append(counter.get_total_flops())
    return timed(frozen, repeats), timed(lora, repeats), flops[1] / flops[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--rank", type=int, default=16, help="rank of every target module (on the ladder)")
    parser.add_argument("--widths", default="1,4,16,64", help="vector-env widths N")
    parser.add_argument("--decisions", type=int, default=4, help="timed decisions per side (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    keep_freed_memory()  # as the strato command does
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"model": args.model, "budget": 10**9, "probe_steps": 0, "device": args.device}

    env = RankAllocationEnv(**settings)
    allocation = {m.name: args.rank for m in env.modules}
    env.reset(seed=0, options={"allocation": allocation})
    keep = np.full(env.action_space.shape, KEEP)
    c = env.config
    print(
        f"model={args.model} modules={len(env.modules)} rank={args.rank} inner_steps={c.inner_steps} "
        f"batch={c.batch_size}x{env.data.train['input_ids'].shape[1]} threads={torch.get_num_threads()} "
        f"device={args.device}"
    )
    roofline = matmul_gflops()
    print(f"roofline: plain float32 matmul {roofline:.1f} GFLOP/s")

    plain, optimizer = plain_peft_model(env, allocation)
    order = env.data_order
    per_decision = c.inner_steps * c.batch_size
    rows = order[:per_decision]
    rates: dict[str, float] = {}
    plain_s = timed(lambda: plain_peft_decision(plain, optimizer, env, rows), args.decisions)
    rates["(a) plain peft loop"] = 1 / plain_s

    def single_step() -> None:
        if env.decisions_made >= c.decisions:
            env.reset(seed=0, options={"allocation": allocation})
        env.step(keep)

    rates["(b) single env"] = 1 / timed(single_step, args.decisions)
    frozen_s, lora_s, flop_ratio = base_versus_lora(env, 10)

    flops: dict[str, float] = {}
    memory: dict[int, float] = {}
    for width in [int(w) for w in args.widths.split(",")]:
        envs = RankAllocationVecEnv(num_envs=width, **settings)
        envs.reset(seed=0, options={"allocation": allocation})
        actions = np.full(envs.action_space.shape, KEEP)

        def vector_step(envs: RankAllocationVecEnv = envs, actions: np.ndarray = actions) -> None:
            if envs.batch.subs[0].episode.decision >= c.decisions:  # as the single env: the same allocation again
                envs.reset(seed=0, options={"allocation": allocation})
            envs.step(actions)

        name = f"(c) vector env N={width}"
        seconds = timed(vector_step, args.decisions)
        rates[name] = width / seconds
        flops[name] = decision_flops(envs) / seconds / 1e9
        memory[width] = rss_gib()
        if width == 16:
            frozen_rate = width / timed(frozen_decision(envs), args.decisions)
        del envs
    if 16 in memory:
        rates["(d) frozen base alone N=16"] = frozen_rate

    print(f"\n{'side':<26}{'decisions/s':>12}{'speedup':>10}{'GFLOP/s':>10}{'of roofline':>13}")
    for name, rate in rates.items():
        gflops = f"{flops[name]:10.1f}{flops[name] / roofline:12.0%}" if name in flops else ""
        print(f"{name:<26}{rate:12.2f}{rate / rates['(a) plain peft loop']:9.2f}x{gflops}")
    print(
        f"\nLoRA training step {lora_s * 1e3:.1f} ms vs frozen base forward + backward {frozen_s * 1e3:.1f} ms: "
        f"{lora_s / frozen_s:.2f}x (its FLOPs: {flop_ratio:.2f}x)"
    )
    print("peak RSS after each width: " + ", ".join(f"N={w}: {gib:.2f} GiB" for w, gib in memory.items()))
    if "(c) vector env N=16" in rates:
        speedup = rates["(c) vector env N=16"] / rates["(a) plain peft loop"]
        bound = rates["(d) frozen base alone N=16"] / rates["(a) plain peft loop"]
        print(f"vector env N=16 speedup over the plain peft loop: {speedup:.2f}x (any engine: at most {bound:.2f}x)")


if __name__ == "__main__":
    main()
