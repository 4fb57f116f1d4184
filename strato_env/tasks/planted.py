"""Planted instances: the teacher is the base model plus low-rank updates of known ranks; the optimum is known.

The student (base + LoRA) learns to match the teacher's outputs on random token sequences: KL on the
next-token distribution for causal LMs, on the decoder's distribution for encoder-decoders (random encoder
inputs and decoder targets), MSE on the last hidden states for encoders. The oracle
allocation gives each perturbed module exactly its planted rank.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from strato_env.config import TaskConfig
from strato_env.models import TargetModule, is_causal_lm, is_seq2seq
from strato_env.tasks.base import (
    Batch,
    TaskData,
    distillation_kl_loss,
    hidden_state_mse_loss,
    seq2seq_distillation_kl_loss,
)


def planted_ranks(modules: Sequence[TargetModule], profile: str, rank: int, seed: int) -> dict[str, int]:
    """The teacher's rank per module (0 = unperturbed) for a rank-profile family."""
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


def _planted_update(
    weight: torch.Tensor, shape: tuple[int, int], rank: int, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """out x in update with `rank` equal singular values and Frobenius norm scale * ||weight||."""
    out_features, in_features = shape
    U, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator))
    return (U @ V.T) * (scale * weight.norm() / rank**0.5)


def _perturbed_copy(
    model: nn.Module,
    modules: Sequence[TargetModule],
    ranks: dict[str, int],
    config: TaskConfig,
    generator: torch.Generator,
) -> nn.Module:
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for module in modules:
            if ranks[module.name] == 0:
                continue
            layer = teacher.get_submodule(module.name)
            delta = _planted_update(
                layer.weight,
                (module.out_features, module.in_features),
                ranks[module.name],
                config.planted_scale,
                generator,
            )
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta
    return teacher


@torch.no_grad()
def _teacher_targets(teacher: nn.Module, inputs: Batch, hidden: bool, chunk: int = 32) -> torch.Tensor:
    """The teacher's log-probabilities (causal LMs, encoder-decoders) or last hidden states (encoders)."""
    outputs = []
    for start in range(0, len(inputs["input_ids"]), chunk):
        result = teacher(**{k: v[start : start + chunk] for k, v in inputs.items()})
        outputs.append(result.last_hidden_state.float() if hidden else torch.log_softmax(result.logits.float(), -1))
    return torch.cat(outputs)


def build_planted(model: nn.Module, modules: Sequence[TargetModule], config: TaskConfig) -> TaskData:
    generator = torch.Generator().manual_seed(config.data_seed)
    ranks = planted_ranks(modules, config.profile, config.planted_rank, config.data_seed)
    teacher = _perturbed_copy(model, modules, ranks, config, generator)
    seq2seq = is_seq2seq(model.config)
    hidden = not seq2seq and not is_causal_lm(model.config)
    vocab = model.config.vocab_size
    total = config.train_examples + config.eval_examples
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
    return TaskData.split(inputs, config.train_examples, loss, oracle_ranks=ranks)
