"""What every task provides: a training pool, a validation set, a held-out test set and a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]
SPLITS = ("eval", "test")
"""Evaluation splits: 'eval' (validation: the env's loss and reward) and 'test' (held out, final numbers)."""
Loss = Callable[..., torch.Tensor]


@dataclass
class TaskData:
    """Tensors of one instance's task. Episodes draw training batches from `train` in a seeded order and define
    their loss (the env's reward, and whatever searches select on) on all of `eval`, the validation set; `test`
    is held out from all of that, for final numbers only."""

    train: Batch
    eval: Batch
    loss: Loss
    """The loss of `model` on `batch`, per episode: `loss(model, batch, episodes)` has shape (episodes,), the
    batch holding the episodes' rows stacked in order."""
    oracle_ranks: dict[str, int] | None = None
    """Planted tasks: the ranks of the teacher's updates, i.e. the optimal allocation."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full besides LoRA (a classification head)."""
    test: Batch = field(default_factory=dict)
    """The held-out test set, disjoint from `train` and `eval`."""

    @classmethod
    def split(cls, rows: Batch, n_train: int, n_eval: int, loss: Loss, **fields) -> TaskData:
        """The first `n_train` rows of every tensor for training, the next `n_eval` for validation, the rest for
        the test set."""

        def cut(start: int, stop: int | None) -> Batch:
            return {k: v[start:stop] for k, v in rows.items()}

        end = n_train + n_eval
        return cls(train=cut(0, n_train), eval=cut(n_train, end), test=cut(end, None), loss=loss, **fields)

    def rows(self, split: str) -> Batch:
        """The evaluation rows of `split`: 'eval' (validation) or 'test'."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid; allowed: {list(SPLITS)}")
        return getattr(self, split)

    @property
    def train_size(self) -> int:
        return len(next(iter(self.train.values())))


def per_episode(values: torch.Tensor, episodes: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` (rows first, the episodes' rows stacked in order) per episode: shape (episodes,).
    With `weights` (same shape, 0 or 1) a weighted mean, e.g. over the tokens that count."""
    values = values.reshape(episodes, -1)
    if weights is None:
        return values.mean(1)
    weights = weights.reshape(episodes, -1).to(values.dtype)
    return (values * weights).sum(1) / weights.sum(1)


def _kl_per_token(logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    student = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(student, teacher_logprobs, log_target=True, reduction="none").sum(-1)


def distillation_kl_loss(model: nn.Module, batch: Batch, episodes: int = 1) -> torch.Tensor:
    """KL(teacher || student) over next-token distributions, averaged over tokens."""
    logits = model(input_ids=batch["input_ids"]).logits
    return per_episode(_kl_per_token(logits, batch["teacher_logprobs"]), episodes)


def seq2seq_distillation_kl_loss(model: nn.Module, batch: Batch, episodes: int = 1) -> torch.Tensor:
    """KL(teacher || student) over an encoder-decoder's decoder distributions, averaged over decoder tokens."""
    logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
    return per_episode(_kl_per_token(logits, batch["teacher_logprobs"]), episodes)


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none", ignore_index=-100)


def seq2seq_loss(model: nn.Module, batch: Batch, episodes: int = 1) -> torch.Tensor:
    """The encoder-decoder's token cross-entropy on its labels (padding labels are -100), as the model's own loss."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    return per_episode(_token_cross_entropy(logits, labels), episodes, labels != -100)


def layer_hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The hidden states after every layer, (batch, layers, tokens, hidden)."""
    return torch.stack(model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1:], 1)


def hidden_state_mse_loss(model: nn.Module, batch: Batch, episodes: int = 1) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's hidden states after every layer
    (`teacher_hidden`, (batch, layers, tokens, hidden)): layer-wise distillation."""
    return per_episode((layer_hidden_states(model, batch).float() - batch["teacher_hidden"]).square(), episodes)


def causal_lm_loss(model: nn.Module, batch: Batch, episodes: int = 1) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the predicted tokens."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    return per_episode(_token_cross_entropy(logits[:, :-1], ids[:, 1:]), episodes)


def classification_loss(model: nn.Module, batch: Batch, episodes: int = 1) -> torch.Tensor:
    """Cross-entropy of the sequence label (squared error for a single-output head, as transformers does)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return per_episode((logits.squeeze(-1) - labels.float()).square(), episodes)
    return per_episode(F.cross_entropy(logits, labels, reduction="none"), episodes)
