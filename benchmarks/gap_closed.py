"""Share of the uniform-to-oracle gap that Go-Explore and a trained policy close on planted instances.

gap closed = (L_uniform - L_method) / (L_uniform - L_oracle), every allocation trained statically for one
episode from seed 0 at the same budget and the same optimizer steps (the policy also by its own episode).

    python benchmarks/gap_closed.py --go-explore-seeds 3 --go-explore-steps 3200
    python benchmarks/gap_closed.py --policy runs/RUN/policy.zip --go-explore-seeds 0
    python benchmarks/gap_closed.py --go-explore-policy runs/RUN/policy.zip   # Go-Explore explores with a policy
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agents.evaluation import gap_closed, uniform_loss
from agents.go_explore import GoExplore, GoExploreConfig
from agents.ppo.train import load_policy, run_policy_episode
from strato_env.engine import keep_freed_memory
from strato_env.env import RankAllocationEnv
from strato_env.observation import slots_of

HELD_OUT = [
    {"model": "llama-tiny"},
    {"model": "bert-tiny"},
    {"model": "gpt2-tiny", "task": {"profile": "bottom-heavy"}},
    {"model": "gpt2-tiny", "task": {"profile": "mlp-only"}},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--go-explore-seeds", type=int, default=3)
    parser.add_argument("--go-explore-steps", type=int, default=3200, help="search budget in optimizer steps")
    parser.add_argument(
        "--go-explore-parallel", type=int, default=GoExploreConfig.parallel, help="explorations run together"
    )
    parser.add_argument("--policy", default=None, help="policy.zip from `strato train` to evaluate")
    parser.add_argument(
        "--go-explore-policy", default=None, help="policy.zip to explore with (default: random group moves)"
    )
    args = parser.parse_args()
    keep_freed_memory()  # as the strato command does
    explorer = load_policy(args.go_explore_policy) if args.go_explore_policy else None

    env = RankAllocationEnv()
    uniform, oracle = uniform_loss(env), env.oracle_loss
    print(f"default instance {env.config.label}: uniform {uniform:.5f}  oracle {oracle:.5f}  budget {env.budget}")

    gaps = []
    for seed in range(args.go_explore_seeds):
        start = time.perf_counter()
        config = GoExploreConfig(max_optimizer_steps=args.go_explore_steps, parallel=args.go_explore_parallel)
        result = GoExplore(config, policy=explorer).run(env, seed=seed)
        static = env.evaluate_allocation(result.allocation, seed=0)
        gaps.append(gap_closed(static, uniform, oracle))
        print(
            f"go_explore seed {seed}: search {result.optimizer_steps} steps, {time.perf_counter() - start:.0f} s; "
            f"static loss {static:.5f}  gap closed {gaps[-1]:.3f}  params {env.params_of(result.allocation)}"
        )
    if gaps:
        print(f"go_explore mean gap closed over {len(gaps)} seeds: {np.mean(gaps):.3f}")

    if args.policy:
        policy = load_policy(args.policy)
        slots = slots_of(policy.observation_space)
        for overrides in [{}, *HELD_OUT]:
            target = env if not overrides else RankAllocationEnv(max_modules=slots, **overrides)
            episode = run_policy_episode(policy, target, seed=0)
            uniform_t, oracle_t = uniform_loss(target), target.oracle_loss
            static = target.evaluate_allocation(episode["allocation"], seed=0)
            print(
                f"policy on {target.config.label:<30} episode loss {episode['loss']:.5f} "
                f"(gap {gap_closed(episode['loss'], uniform_t, oracle_t):6.3f})  static {static:.5f} "
                f"(gap {gap_closed(static, uniform_t, oracle_t):6.3f})  uniform {uniform_t:.5f}  oracle {oracle_t:.5f}"
            )


if __name__ == "__main__":
    main()
