"""STRATO-PEFT's environment: LoRA rank allocation as a Gymnasium env.

`import strato_env` registers `strato_env/RankAllocation-v3`: `gym.make` gives one episode
(`RankAllocationEnv`), `gym.make_vec(..., vectorization_mode="vector_entry_point")` N episodes trained together
on one base model (`RankAllocationVecEnv`).
"""

from gymnasium.envs.registration import register

from strato_env.config import MAX_DECISIONS, EnvConfig, TaskConfig

register(
    id="strato_env/RankAllocation-v3",
    entry_point="strato_env.env:RankAllocationEnv",
    vector_entry_point="strato_env.vector:RankAllocationVecEnv",
    max_episode_steps=MAX_DECISIONS,  # a safety net; the env truncates itself after `decisions` steps
)

__all__ = ["EnvConfig", "TaskConfig"]
