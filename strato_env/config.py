"""Typed, validated configuration of an instance (model + task) and of the rank-allocation env."""

from __future__ import annotations

import ast
import inspect
import os
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from strato_env.validation import check_choice, check_int, check_number, fail, is_int

PLANTED_PROFILES = ("top-heavy", "bottom-heavy", "attention-only", "mlp-only", "random-sparse", "generated")
TASK_NAMES = ("planted", "causal_lm", "classification", "seq2seq")
PROBES = ("single", "joint")


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys by name (prefixed by `where`)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key {where}{unknown[0]}; allowed keys: {sorted(known)}")
    return cls(**values)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and of its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for statement, following in zip(body, body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


MAX_DECISIONS = 256


def check_device(device: Any) -> None:
    """A torch device string whose accelerator is present on this machine."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", device, "expected a torch device such as 'cpu', 'cuda' or 'cuda:1'")
    if parsed.type == "cpu":
        return
    module = getattr(torch, parsed.type, None)
    available = module is not None and hasattr(module, "is_available") and module.is_available()
    count = module.device_count() if available and hasattr(module, "device_count") else int(available)
    if not available or (parsed.index is not None and parsed.index >= count):
        fail(
            "device",
            device,
            f"this machine has {count} {parsed.type} device(s); allowed: 'cpu'"
            + (f" or {parsed.type}:0 to {parsed.type}:{count - 1}" if count else ""),
        )


@dataclass(frozen=True)
class TrainingProtocol:
    """The settings that, with the instance, fix what training an allocation gives (keys of the result caches)."""

    rank_ladder: tuple[int, ...]
    decisions: int
    inner_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float


@dataclass
class TaskConfig:
    """What the student is trained on. One config covers the three task families."""

    name: str = "planted"
    """Task family: 'planted' (known optimum), 'causal_lm' (next-token loss on text), 'classification' or
    'seq2seq' (encoder-decoder models: source -> target pairs)."""
    profile: str = "top-heavy"
    """planted: where the teacher's low-rank updates sit (one of PLANTED_PROFILES); 'generated' draws a procedural
    instance from data_seed (random support, mixed ranks, decaying spectra, per-module scales)."""
    planted_rank: int = 16
    """planted: rank of each planted update ('generated': the largest; the others halve it up to twice)."""
    planted_scale: float = 0.5
    """planted: Frobenius norm of each planted update relative to the norm of the weight it perturbs
    ('generated': its median)."""
    data: str | None = None
    """causal_lm / classification / seq2seq: a local file or folder (text for causal_lm; CSV, or JSONL for
    seq2seq) or a hub dataset id."""
    dataset_config: str | None = None
    """Hub dataset configuration name, e.g. 'wikitext-2-raw-v1' or 'sst2'."""
    text_column: str = "text"
    """classification: column that holds the text."""
    label_column: str = "label"
    """classification: column that holds the integer label."""
    source_column: str = "source"
    """seq2seq: column that holds the input text."""
    target_column: str = "target"
    """seq2seq: column that holds the output text."""
    seq_len: int = 32
    """Tokens per sequence."""
    train_examples: int = 256
    """Size of the training pool that episodes draw batches from."""
    eval_examples: int = 32
    """Size of the validation set: the fixed evaluation set that defines the env's loss and reward."""
    test_examples: int = 32
    """Size of the held-out test set, disjoint from the training pool and the validation set: no reward and no
    search reads it; final numbers do (`evaluate_allocations(..., split='test')`)."""
    data_seed: int = 0
    """Seed of the instance itself: planted updates, synthetic inputs, data subsets. Not the episode seed."""

    def __post_init__(self) -> None:
        check_choice("task.name", self.name, TASK_NAMES)
        check_choice("task.profile", self.profile, PLANTED_PROFILES)
        for name in ("planted_rank", "seq_len", "train_examples", "eval_examples", "test_examples"):
            check_int(f"task.{name}", getattr(self, name), 1)
        check_number("task.planted_scale", self.planted_scale, 0, low_open=True)
        if self.name != "planted" and not self.data:
            fail("task.data", self.data, f"task {self.name!r} needs a local path or a hub dataset id")


def generated_ranks(task: TaskConfig) -> tuple[int, ...]:
    """The ranks a generated planted update may have: planted_rank halved up to twice (at least 1)."""
    return tuple(sorted({max(1, task.planted_rank >> k) for k in range(3)}))


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
    probe_steps: int = 80
    """Optimizer steps of the once-per-instance probe behind the importance feature (0: no probe, importance is
    the plain gradient norm). 80 joint steps were chosen on the bench_planted train and validation instances
    (README, "The joint probe"); the single probe was measured at 10 steps per module."""
    probe: str = "joint"
    """How the probe measures what each module can gain. 'single': a rank-r_max update on each module alone,
    trained for `probe_steps` steps; the gain is the relative drop of the evaluation loss (`probe_steps` optimizer
    steps per module). 'joint': one rank-r_max update on every module at once, trained for `probe_steps` steps;
    a module's gain is the relative rise of the evaluation loss when its update alone is removed (`probe_steps`
    optimizer steps in all, and one evaluation per module), so modules are judged alongside the others."""
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
            fail("model", self.model, "expected a preset name, hub id or local directory")
        ladder = tuple(self.rank_ladder)
        if (
            len(ladder) < 2
            or not all(is_int(r) for r in ladder)
            or ladder[0] != 0
            or any(b <= a for a, b in zip(ladder, ladder[1:], strict=False))
        ):
            fail(
                "rank_ladder",
                self.rank_ladder,
                "expected strictly increasing integers starting at 0, e.g. (0, 1, 2, 4, 8)",
            )
        self.rank_ladder = ladder
        if self.budget is not None:
            check_int("budget", self.budget, 1)
        check_int("decisions", self.decisions, 1, MAX_DECISIONS)
        for name in ("inner_steps", "max_modules", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_number("learning_rate", self.learning_rate, 0, low_open=True)
        check_int("probe_steps", self.probe_steps, 0)
        check_choice("probe", self.probe, PROBES)
        for name in ("cost_weight", "weight_decay", "divergence_penalty"):
            check_number(name, getattr(self, name), 0)
        check_number("importance_smoothing", self.importance_smoothing, 0, 1, high_open=True)
        if self.task.name == "planted":
            if self.task.profile == "generated" and not set(generated_ranks(self.task)) <= set(ladder):
                fail(
                    "task.planted_rank",
                    self.task.planted_rank,
                    f"a generated instance plants ranks {list(generated_ranks(self.task))}, all of which must be "
                    f"on rank_ladder {list(ladder)}",
                )
            if self.task.planted_rank not in ladder:
                fail("task.planted_rank", self.task.planted_rank, f"expected a rank on rank_ladder {list(ladder)}")
        if self.initial_rank not in ladder:
            fail("initial_rank", self.initial_rank, f"expected a rank on rank_ladder {list(ladder)}")
        check_device(self.device)

    @property
    def r_max(self) -> int:
        return self.rank_ladder[-1]

    @property
    def label(self) -> str:
        """A readable name of the instance, e.g. 'llama-tiny/planted/top-heavy' or 'gpt2-tiny/causal_lm/a.txt' (a
        local model folder by its last part)."""
        task = self.task
        if task.name != "planted":
            detail = os.path.basename(str(task.data).rstrip("/"))
        else:
            detail = f"generated-{task.data_seed}" if task.profile == "generated" else task.profile
        from strato_env.models import is_tiny_preset

        model = self.model if is_tiny_preset(self.model) else os.path.basename(self.model.rstrip("/")) or self.model
        return f"{model}/{task.name}/{detail}"

    def probe_optimizer_steps(self, modules: int) -> int:
        """Optimizer steps of the probe on a model with `modules` target modules."""
        return self.probe_steps * (1 if self.probe == "joint" else modules)

    @property
    def protocol(self) -> TrainingProtocol:
        """What, besides the instance, fixes the result of training an allocation."""
        return TrainingProtocol(
            self.rank_ladder, self.decisions, self.inner_steps, self.batch_size, self.learning_rate, self.weight_decay
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["rank_ladder"] = list(self.rank_ladder)
        return values
