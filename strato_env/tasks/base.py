"""What every task provides: a training pool, a fixed evaluation set and a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class TaskData:
    """Tensors of one instance's task. Episodes draw training batches from `train` in a seeded order
    and define their loss on all of `eval`."""

    train: Batch
    eval: Batch
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    oracle_ranks: dict[str, int] | None = None
    """Planted tasks: the ranks of the teacher's updates, i.e. the optimal allocation."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full besides LoRA (a classification head)."""

    @classmethod
    def split(cls, rows: Batch, n_train: int, loss: Callable[[nn.Module, Batch], torch.Tensor], **fields) -> TaskData:
        """The first `n_train` rows of every tensor for training, the rest for evaluation."""
        train = {k: v[:n_train] for k, v in rows.items()}
        return cls(train=train, eval={k: v[n_train:] for k, v in rows.items()}, loss=loss, **fields)

    @property
    def train_size(self) -> int:
        return len(next(iter(self.train.values())))


def distillation_kl_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """KL(teacher || student) over next-token distributions, averaged over tokens."""
    logits = model(input_ids=batch["input_ids"]).logits
    student = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    teacher = batch["teacher_logprobs"].flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def seq2seq_distillation_kl_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """KL(teacher || student) over an encoder-decoder's decoder distributions, averaged over decoder tokens."""
    logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
    student = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    teacher = batch["teacher_logprobs"].flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The encoder-decoder's own loss on its labels (padding labels are -100)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def hidden_state_mse_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's last hidden states."""
    hidden = model(input_ids=batch["input_ids"]).last_hidden_state
    return F.mse_loss(hidden.float(), batch["teacher_hidden"])


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
