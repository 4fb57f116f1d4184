"""Task families: planted (known optimum), causal_lm and classification; one interface, `TaskData`."""

from strato_env.tasks.base import TaskData
from strato_env.tasks.planted import build_planted, planted_ranks

__all__ = ["TaskData", "build_planted", "planted_ranks"]
