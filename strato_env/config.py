"""Typed, validated configuration of an instance (model + task) and of the rank-allocation env."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PLANTED_PROFILES = ("top-heavy", "bottom-heavy", "attention-only", "mlp-only", "random-sparse")
TASK_NAMES = ("planted", "causal_lm", "classification")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field_name}={value!r} is invalid: {allowed}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(name, value, "expected an integer >= 1")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        _fail(name, value, "expected a finite number > 0")


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key {where}{unknown[0]!r}; allowed keys: {sorted(known)}")
    return cls(**values)


@dataclass
class TaskConfig:
    """What the student is trained on. One config covers the three task families."""

    name: str = "planted"
    """Task family: 'planted' (known optimum), 'causal_lm' (next-token loss on text) or 'classification'."""
    profile: str = "top-heavy"
    """planted: where the teacher's low-rank updates sit (one of PLANTED_PROFILES)."""
    planted_rank: int = 16
    """planted: rank of each planted update."""
    planted_scale: float = 0.5
    """planted: Frobenius norm of each planted update relative to the norm of the weight it perturbs."""
    data: str | None = None
    """causal_lm / classification: a local file or folder (text, or CSV for classification) or a hub dataset id."""
    dataset_config: str | None = None
    """Hub dataset configuration name, e.g. 'wikitext-2-raw-v1' or 'sst2'."""
    text_column: str = "text"
    """classification: column that holds the text."""
    label_column: str = "label"
    """classification: column that holds the integer label."""
    seq_len: int = 32
    """Tokens per sequence."""
    train_examples: int = 256
    """Size of the training pool that episodes draw batches from."""
    eval_examples: int = 32
    """Size of the fixed evaluation set that defines the env's loss."""
    data_seed: int = 0
    """Seed of the instance itself: planted updates, synthetic inputs, data subsets. Not the episode seed."""

    def __post_init__(self) -> None:
        if self.name not in TASK_NAMES:
            _fail("task.name", self.name, f"allowed: {list(TASK_NAMES)}")
        if self.profile not in PLANTED_PROFILES:
            _fail("task.profile", self.profile, f"allowed: {list(PLANTED_PROFILES)}")
        for name in ("planted_rank", "seq_len", "train_examples", "eval_examples"):
            _check_positive_int(f"task.{name}", getattr(self, name))
        _check_positive_float("task.planted_scale", self.planted_scale)
        if self.name != "planted" and not self.data:
            _fail("task.data", self.data, f"task {self.name!r} needs a local path or a hub dataset id")


@dataclass
class EnvConfig:
    """Everything that defines one RankAllocation environment."""

    model: str = "gpt2-tiny"
    """A tiny preset ('gpt2-tiny', 'llama-tiny', 'bert-tiny'), a hub id or a local model directory."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task the LoRA student is trained on."""
    target_modules: list[str] | str | None = None
    """Override module discovery: a list of module-name suffixes or one regex over full names."""
    rank_ladder: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    """Allowed ranks, strictly increasing, starting at 0 (0 = module not adapted)."""
    budget: int | None = None
    """Parameter budget B (trainable LoRA parameters). None: the oracle's count on planted tasks,
    uniform rank 4 otherwise."""
    cost_weight: float = 0.001
    """lambda in the reward r_t = (L_{t-1} - L_t) / L_0 - lambda * P_t / B. The budget is a hard limit, so
    lambda only breaks ties: at 0.01 a full budget cost more return than the whole uniform-to-oracle gap."""
    decisions: int = 8
    """Rank decisions per episode (truncation)."""
    inner_steps: int = 20
    """Optimizer steps between two decisions."""
    initial_rank: int = 0
    """Rank of every module at reset (must be on the ladder and fit the budget)."""
    max_modules: int = 64
    """Observation/action slots; models with more target modules are rejected."""
    batch_size: int = 8
    """Training batch size."""
    learning_rate: float = 1e-2
    """AdamW learning rate of the LoRA factors."""
    weight_decay: float = 0.0
    """AdamW weight decay of the LoRA factors."""
    divergence_penalty: float = 1.0
    """Reward subtracted on the step where the loss becomes NaN/inf (the episode then terminates)."""
    probe_steps: int = 10
    """Optimizer steps of the once-per-instance probe of each module alone (0: no probe, importance is the
    plain gradient norm)."""
    importance_smoothing: float = 0.7
    """Weight of the previous importance in its exponential moving average."""
    device: str = "cpu"
    """Torch device for the model and every tensor of the episode."""
    model_seed: int = 0
    """Seed for the random weights of tiny presets."""

    def __post_init__(self) -> None:
        if isinstance(self.task, dict):
            self.task = from_dict(TaskConfig, self.task, where="task.")
        if not isinstance(self.model, str) or not self.model:
            _fail("model", self.model, "expected a preset name, hub id or local directory")
        ladder = tuple(self.rank_ladder)
        if (
            len(ladder) < 2
            or any(isinstance(r, bool) or not isinstance(r, int) for r in ladder)
            or ladder[0] != 0
            or any(b <= a for a, b in zip(ladder, ladder[1:], strict=False))
        ):
            _fail(
                "rank_ladder",
                self.rank_ladder,
                "expected strictly increasing integers starting at 0, e.g. (0, 1, 2, 4, 8)",
            )
        self.rank_ladder = ladder
        if self.budget is not None:
            _check_positive_int("budget", self.budget)
        for name in ("decisions", "inner_steps", "max_modules", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_float("learning_rate", self.learning_rate)
        if isinstance(self.probe_steps, bool) or not isinstance(self.probe_steps, int) or self.probe_steps < 0:
            _fail("probe_steps", self.probe_steps, "expected an integer >= 0")
        for name in ("cost_weight", "weight_decay", "divergence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                _fail(name, value, "expected a number >= 0")
        if not 0 <= self.importance_smoothing < 1:
            _fail("importance_smoothing", self.importance_smoothing, "expected a number in [0, 1)")
        if self.task.name == "planted" and self.task.planted_rank not in ladder:
            _fail("task.planted_rank", self.task.planted_rank, f"is not on rank_ladder {list(ladder)}")
        if self.initial_rank not in ladder:
            _fail("initial_rank", self.initial_rank, f"must be on the rank ladder {list(ladder)}")

    @property
    def r_max(self) -> int:
        return self.rank_ladder[-1]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["rank_ladder"] = list(self.rank_ladder)
        return values
