"""Planted instances: the teacher is the base model plus low-rank updates of known ranks; the optimum is known.

The student (base + LoRA) learns to match the teacher's outputs on random token sequences: KL on the
next-token distribution for causal LMs, on the decoder's distribution for encoder-decoders (random encoder
inputs and decoder targets), MSE on the hidden states after every layer for encoders (layer-wise
distillation). The oracle allocation gives each perturbed module exactly its planted rank.

Two kinds of teacher:

- the five named profiles (fixed instances): whole layers or whole module kinds perturbed, every update of
  rank `planted_rank` with a flat spectrum and the same relative norm `planted_scale`;
- `profile='generated'`, procedural instances drawn from `data_seed`: a random subset of modules of random
  size (not aligned to layers or kinds), each with its own rank (drawn from `planted_rank` / 1, 2, 4),
  its own relative norm (`planted_scale` times a log-uniform factor) and a decaying spectrum
  (sigma_i ~ i^-alpha, alpha drawn once per instance), so that no fill rule is optimal by construction.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from strato_env.config import TaskConfig, generated_ranks
from strato_env.models import TargetModule, is_causal_lm, is_seq2seq
from strato_env.tasks.base import (
    Batch,
    TaskData,
    distillation_kl_loss,
    hidden_state_mse_loss,
    layer_hidden_states,
    seq2seq_distillation_kl_loss,
)

GENERATED_SUPPORT = (0.15, 0.35)
"""profile='generated': the share of modules perturbed is drawn uniformly from this range."""
GENERATED_SCALE = (0.5, 2.0)
"""profile='generated': each update's relative norm is planted_scale times a log-uniform factor in this range."""
GENERATED_DECAY = (0.0, 0.5)
"""profile='generated': the spectrum exponent alpha (sigma_i ~ i^-alpha) is drawn uniformly from this range."""


@dataclass(frozen=True)
class PlantedUpdate:
    """One module's planted update."""

    rank: int
    scale: float
    """Frobenius norm relative to the norm of the weight it perturbs."""
    decay: float = 0.0
    """Singular values sigma_i ~ i^-decay (0: a flat spectrum)."""


def planted_updates(modules: Sequence[TargetModule], config: TaskConfig) -> dict[str, PlantedUpdate]:
    """The teacher's update per perturbed module (unperturbed modules are absent), drawn from `data_seed`."""
    if config.profile != "generated":
        ranks = planted_ranks(modules, config.profile, config.planted_rank, config.data_seed)
        return {name: PlantedUpdate(rank, config.planted_scale) for name, rank in ranks.items() if rank}
    rng = np.random.default_rng([config.data_seed, 7])
    n = len(modules)
    size = max(1, round(n * rng.uniform(*GENERATED_SUPPORT)))
    chosen = sorted(rng.choice(n, size=size, replace=False).tolist())
    decay = float(rng.uniform(*GENERATED_DECAY))
    low, high = np.log(GENERATED_SCALE)
    ranks = generated_ranks(config)
    return {
        modules[j].name: PlantedUpdate(
            int(rng.choice(ranks)), config.planted_scale * float(np.exp(rng.uniform(low, high))), decay
        )
        for j in chosen
    }


def planted_ranks(modules: Sequence[TargetModule], profile: str, rank: int, seed: int) -> dict[str, int]:
    """The teacher's rank per module (0 = unperturbed) for a named rank-profile family."""
    n_layers = max(m.layer for m in modules) + 1
    quarter = max(1, n_layers // 4)
    if profile == "top-heavy":
        chosen = [m.layer >= n_layers - quarter for m in modules]
    elif profile == "bottom-heavy":
        chosen = [m.layer < quarter for m in modules]
    elif profile == "attention-only":
        chosen = [m.kind.startswith("attention") for m in modules]
    elif profile == "mlp-only":
        chosen = [m.kind.startswith("mlp") for m in modules]
    elif profile == "random-sparse":
        rng = np.random.default_rng(seed)
        chosen = list(rng.random(len(modules)) < 0.25)
        if not any(chosen):
            chosen[int(rng.integers(len(modules)))] = True
    else:
        raise ValueError(f"task.profile={profile!r} is unknown")
    return {m.name: rank if keep else 0 for m, keep in zip(modules, chosen, strict=True)}


def _planted_delta(
    weight: torch.Tensor, shape: tuple[int, int], update: PlantedUpdate, generator: torch.Generator
) -> torch.Tensor:
    """out x in update of rank `update.rank`, singular values ~ i^-decay, Frobenius norm scale * ||weight||."""
    out_features, in_features = shape
    U, _ = torch.linalg.qr(torch.randn(out_features, update.rank, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(in_features, update.rank, generator=generator))
    sigma = torch.arange(1, update.rank + 1, dtype=weight.dtype) ** -update.decay
    sigma = sigma / sigma.norm()
    return (U * sigma) @ V.T * (update.scale * weight.norm())


def _perturbed_copy(
    model: nn.Module, modules: Sequence[TargetModule], updates: dict[str, PlantedUpdate], generator: torch.Generator
) -> nn.Module:
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for module in modules:
            if module.name not in updates:
                continue
            layer = teacher.get_submodule(module.name)
            shape = (module.out_features, module.in_features)
            delta = _planted_delta(layer.weight, shape, updates[module.name], generator)
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta
    return teacher


@torch.no_grad()
def _teacher_targets(teacher: nn.Module, inputs: Batch, hidden: bool, chunk: int = 32) -> torch.Tensor:
    """The teacher's log-probabilities (causal LMs, encoder-decoders) or hidden states after every layer
    (encoders)."""
    outputs = []
    for start in range(0, len(inputs["input_ids"]), chunk):
        part = {k: v[start : start + chunk] for k, v in inputs.items()}
        if hidden:
            outputs.append(layer_hidden_states(teacher, part).float())
        else:
            outputs.append(torch.log_softmax(teacher(**part).logits.float(), -1))
    return torch.cat(outputs)


def build_planted(model: nn.Module, modules: Sequence[TargetModule], config: TaskConfig) -> TaskData:
    generator = torch.Generator().manual_seed(config.data_seed)
    updates = planted_updates(modules, config)
    ranks = {m.name: updates[m.name].rank if m.name in updates else 0 for m in modules}
    teacher = _perturbed_copy(model, modules, updates, generator)
    seq2seq = is_seq2seq(model.config)
    hidden = not seq2seq and not is_causal_lm(model.config)
    vocab = model.config.vocab_size
    total = config.train_examples + config.eval_examples + config.test_examples
    device = next(model.parameters()).device
    inputs = {"input_ids": torch.randint(0, vocab, (total, config.seq_len), generator=generator).to(device)}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (total, config.seq_len), generator=generator).to(device)
    inputs["teacher_hidden" if hidden else "teacher_logprobs"] = _teacher_targets(teacher, inputs, hidden)
    del teacher
    if seq2seq:
        loss = seq2seq_distillation_kl_loss
    else:
        loss = hidden_state_mse_loss if hidden else distillation_kl_loss
    return TaskData.split(inputs, config.train_examples, config.eval_examples, loss, oracle_ranks=ranks)
