"""Solvers of the rank-allocation problem: PPO policies, Go-Explore and baselines."""
