"""The batched LoRA engine: N fine-tuning runs over one frozen base model, one forward pass per step.

`BatchedModel` replaces each target module of a private copy of the base by a `LoraSlot` and each trained
head (a classification head) by a `HeadSlot`. `BatchedLora` holds, for N episodes, every target module's
factors stacked and padded to `r_max`: A (N x r_max x in) and B (N x out x r_max). An episode of rank r
uses slots [0, r); the other slots hold exact zeros and zeros stay zeros: they add nothing to the output,
receive exactly zero gradients and AdamW leaves them at zero, so no mask multiply is needed. One step runs
the base once over the N episodes' batches stacked along the batch dimension (episode-major) and adds each
episode's update `x A^T B^T` with two batched matmuls.

Every module keeps scaling 1 (lora_alpha = r), so a rank change never rescales the update: growing fills
new rows of A (drawn from the episode's generator) with B's columns still zero, leaving B @ A unchanged;
shrinking keeps the truncated SVD of B @ A. Adam moments follow (kept on grow, zeroed on shrink: the kept
directions are a new basis), and AdamW keeps one step count per episode and module, so the stacked update
is exactly N independent `torch.optim.AdamW` optimizers.

peft stays the interchange format: `BatchedLora.export` writes a standard peft LoRA folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from strato_env.files import replace_folder
from strato_env.models import TargetModule, fan_in_fan_out

ADAPTER = "default"
BETAS = (0.9, 0.999)
EPS = 1e-8
"""AdamW's constants, torch's defaults."""


def truncated_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B', A') of rank `rank` with B' @ A' the best rank-`rank` approximation of B @ A.

    Works on the thin QR factors of B and A^T, so the SVD is of an r x r matrix, never out x in.
    """
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T)
    root = S[:rank].sqrt()
    return (Q_b @ U[:, :rank]) * root, root[:, None] * (Vh[:rank] @ Q_a.T)


class LoraSlot(nn.Module):
    """A target module of the base plus the low-rank updates of the adapters installed in its model."""

    def __init__(self, base: nn.Module, index: int, owner: BatchedModel) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.owner = owner  # not an nn.Module: a plain reference

    @property
    def weight(self) -> torch.Tensor:  # read by some models' forward (e.g. T5's dtype check)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self.owner.lora
        if lora is None:
            return y
        xs = x.reshape(lora.episodes, -1, x.shape[-1])
        if lora.active[self.index]:
            A, B = lora.A[self.index], lora.B[self.index]
            y = y + torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)).reshape(y.shape)
        if self.owner.recording is not None:
            if not y.requires_grad:  # nothing trainable upstream: still let dL/dy reach this module
                y.requires_grad_()
            y.register_hook(self._record_weight_gradient(xs.detach()))
        return y

    def _record_weight_gradient(self, xs: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            gs = grad.reshape(xs.shape[0], -1, grad.shape[-1])
            self.owner.recording[:, self.index] = torch.linalg.matrix_norm(torch.bmm(xs.transpose(1, 2), gs))

        return hook


class HeadSlot(nn.Module):
    """A head trained in full (a classification head): one weight and bias per episode."""

    def __init__(self, base: nn.Linear, index: int, owner: BatchedModel) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.owner = owner

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.owner.lora
        if lora is None:
            return self.base(x)
        weight, bias = lora.heads[self.index]
        y = torch.bmm(x.reshape(lora.episodes, -1, x.shape[-1]), weight.transpose(1, 2))
        if bias is not None:
            y = y + bias[:, None]
        return y.reshape(*x.shape[:-1], weight.shape[1])


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class BatchedModel:
    """A private copy of the frozen base with every target module and head replaced by a slot.

    With no adapters installed (`lora` None) it computes the base model exactly."""

    def __init__(self, model: nn.Module, modules: Sequence[TargetModule], heads: Sequence[str] = ()) -> None:
        self.model = model
        self.modules = list(modules)
        self.head_names = list(heads)
        self.lora: BatchedLora | None = None
        self.recording: torch.Tensor | None = None
        self.fan_in_fan_out = fan_in_fan_out(model, self.modules)
        for i, m in enumerate(self.modules):
            _replace(model, m.name, LoraSlot(model.get_submodule(m.name), i, self))
        for i, name in enumerate(self.head_names):
            head = model.get_submodule(name)
            if type(head) is not nn.Linear:
                raise ValueError(f"trained head {name!r} is a {type(head).__name__}; only nn.Linear heads are supported")
            _replace(model, name, HeadSlot(head, i, self))

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device

    def head(self, index: int) -> nn.Linear:
        return self.model.get_submodule(self.head_names[index]).base

    @contextlib.contextmanager
    def using(self, lora: BatchedLora) -> Iterator[nn.Module]:
        """The model with `lora`'s adapters installed, as a callable HF model."""
        previous, self.lora = self.lora, lora
        try:
            yield self.model
        finally:
            self.lora = previous

    @contextlib.contextmanager
    def recording_weight_gradients(self, episodes: int) -> Iterator[torch.Tensor]:
        """While open, a backward pass writes ||dL_e/dW||_F of every target module's frozen weight, per
        episode e, into the yielded (episodes x modules) tensor."""
        self.recording = torch.zeros(episodes, len(self.modules), device=self.device)
        try:
            yield self.recording
        finally:
            self.recording = None


class BatchedLora:
    """The LoRA factors, trained heads and AdamW state of `episodes` episodes over one `BatchedModel`."""

    def __init__(
        self, target: BatchedModel, episodes: int, r_max: int, learning_rate: float, weight_decay: float = 0.0
    ) -> None:
        if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
            raise ValueError(f"episodes={episodes!r} is invalid: allowed: an integer >= 1")
        self.target = target
        self.episodes = episodes
        self.r_max = r_max
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        n, device = episodes, target.device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, requires_grad=True)

        self.A = [zeros(n, r_max, m.in_features) for m in target.modules]
        self.B = [zeros(n, m.out_features, r_max) for m in target.modules]
        self._initial_heads = [
            (target.head(i).weight.detach().clone(), None if target.head(i).bias is None else target.head(i).bias.detach().clone())
            for i in range(len(target.head_names))
        ]
        self.heads = [
            (w.expand(n, *w.shape).clone().requires_grad_(), None if b is None else b.expand(n, *b.shape).clone().requires_grad_())
            for w, b in self._initial_heads
        ]
        self.ranks = np.zeros((n, len(target.modules)), dtype=np.int64)
        self.active = [False] * len(target.modules)
        """Per module: whether any episode adapts it (if none, its forward skips the low-rank term)."""
        self.steps = torch.zeros(n, len(target.modules) + 1, dtype=torch.float64, device=device)
        """AdamW step count per episode and module; the last column counts the heads' steps."""
        self._params: list[tuple[torch.Tensor, int]] = [(p, j) for j in range(len(self.A)) for p in (self.A[j], self.B[j])]
        heads_column = len(target.modules)
        self._params += [(p, heads_column) for pair in self.heads for p in pair if p is not None]
        self._moments = {id(p): (torch.zeros_like(p, requires_grad=False), torch.zeros_like(p, requires_grad=False)) for p, _ in self._params}

    @property
    def extra_params(self) -> int:
        """Trained parameters outside LoRA per episode (e.g. a classification head)."""
        return sum(w[0].numel() + (b[0].numel() if b is not None else 0) for w, b in self.heads)

    @property
    def trains_anything(self) -> bool:
        return any(self.active) or bool(self.heads)

    # ---- rank changes -------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_rank(self, episode: int, module: int, rank: int, generator: torch.Generator | None = None) -> None:
        """Grow (new directions start at zero output) or shrink (truncated SVD of B @ A) one module of one episode."""
        old = int(self.ranks[episode, module])
        if rank == old:
            return
        A, B = self.A[module], self.B[module]
        if rank > old:
            rows = torch.empty(rank - old, A.shape[2], device=A.device)
            nn.init.kaiming_uniform_(rows, a=math.sqrt(5), generator=generator)
            A[episode, old:rank] = rows
        else:
            new_B, new_A = truncated_factors(B[episode, :, :old], A[episode, :old], rank)
            A[episode].zero_()
            B[episode].zero_()
            A[episode, :rank], B[episode, :, :rank] = new_A, new_B
            for p in (A, B):
                for moment in self._moments[id(p)]:
                    moment[episode].zero_()
        self.ranks[episode, module] = rank
        self.active[module] = bool(self.ranks[:, module].any())

    @torch.no_grad()
    def reset(self, episode: int, ranks: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Fresh adapters for one episode at `ranks` (one per module, grown in module order from `generator`),
        the initial head weights and a fresh optimizer state."""
        for p, _ in self._params:
            p[episode].zero_()
            for moment in self._moments[id(p)]:
                moment[episode].zero_()
        for (w, b), (w0, b0) in zip(self.heads, self._initial_heads, strict=True):
            w[episode] = w0
            if b is not None:
                b[episode] = b0
        self.steps[episode] = 0
        self.ranks[episode] = 0
        self.active = [bool(self.ranks[:, j].any()) for j in range(len(self.A))]
        for module, rank in enumerate(ranks):
            self.set_rank(episode, module, int(rank), generator)

    # ---- training -----------------------------------------------------------------------------------------
    def backward_and_step(self, losses: torch.Tensor, training: Sequence[int]) -> None:
        """Backpropagate the sum of the `training` episodes' losses and take one AdamW step for each of them;
        the other episodes are left exactly as they were."""
        if not self.trains_anything or not len(training):
            return
        losses[list(training)].sum().backward()
        mask = torch.zeros(self.episodes, dtype=torch.float64, device=self.steps.device)
        mask[list(training)] = 1.0
        columns = torch.cat([torch.as_tensor(self.ranks > 0, device=mask.device), torch.ones(self.episodes, 1, dtype=torch.bool, device=mask.device)], 1)
        taking = mask[:, None] * columns
        self.steps += taking
        self._adamw(taking)

    @torch.no_grad()
    def _adamw(self, taking: torch.Tensor) -> None:
        """torch.optim.AdamW's update, with a step count per episode and module (`taking`: 1 where a step is
        taken)."""
        beta1, beta2 = BETAS
        lr, decay = self.learning_rate, self.weight_decay
        step = self.steps.clamp(min=1)
        step_size = (lr / (1 - beta1**step)) * taking
        bias2_root = (1 - beta2**step).sqrt()
        for p, column in self._params:
            grad = p.grad
            p.grad = None
            if grad is None or not taking[:, column].any():
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            t = taking[:, column].to(p.dtype).view(shape)
            m, v = self._moments[id(p)]
            if decay:
                p.mul_(1 - lr * decay * t)
            m.lerp_(grad, (1 - beta1) * t)
            v.mul_(1 - (1 - beta2) * t).add_(grad.square().mul_((1 - beta2) * t))
            denom = (v.sqrt() / bias2_root[:, column].to(p.dtype).view(shape)).add_(EPS)
            p.sub_(m / denom * step_size[:, column].to(p.dtype).view(shape))

    # ---- snapshots ----------------------------------------------------------------------------------------
    def snapshot(self, episode: int) -> dict[str, Any]:
        """A copy of one episode's factors, heads, ranks and optimizer state."""
        return {
            "params": [p[episode].detach().clone() for p, _ in self._params],
            "moments": [tuple(m[episode].clone() for m in self._moments[id(p)]) for p, _ in self._params],
            "steps": self.steps[episode].clone(),
            "ranks": self.ranks[episode].copy(),
        }

    @torch.no_grad()
    def restore(self, episode: int, snapshot: dict[str, Any]) -> None:
        for (p, _), value, moments in zip(self._params, snapshot["params"], snapshot["moments"], strict=True):
            p[episode] = value
            for moment, saved in zip(self._moments[id(p)], moments, strict=True):
                moment[episode] = saved
        self.steps[episode] = snapshot["steps"]
        self.ranks[episode] = snapshot["ranks"]
        self.active = [bool(self.ranks[:, j].any()) for j in range(len(self.A))]

    # ---- export -------------------------------------------------------------------------------------------
    def lora_config(self, episode: int) -> LoraConfig:
        """A standard peft config with one exact `rank_pattern` key per adapted module (scaling 1)."""
        ranks = {m.name: int(r) for m, r in zip(self.target.modules, self.ranks[episode], strict=True) if r > 0}
        pattern = {re.escape(name): r for name, r in ranks.items()}
        default = max(set(ranks.values()), key=list(ranks.values()).count)
        return LoraConfig(
            r=default,
            lora_alpha=default,
            lora_dropout=0.0,
            target_modules=sorted(ranks),
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            fan_in_fan_out=self.target.fan_in_fan_out,
            modules_to_save=list(self.target.head_names) or None,
            inference_mode=True,
        )

    def peft_model(self, episode: int, base: nn.Module, base_model_name_or_path: str) -> nn.Module:
        """`base` (a fresh copy of the frozen base model) wrapped by peft with this episode's adapter."""
        if not self.ranks[episode].any():
            raise ValueError("the allocation adapts no module (all ranks are 0): there is no adapter to export")
        with warnings.catch_warnings():  # peft reads a transformers attribute that transformers deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, self.lora_config(episode))
        model.peft_config[ADAPTER].base_model_name_or_path = base_model_name_or_path
        inner = model.base_model.model
        with torch.no_grad():
            for m, rank, A, B in zip(self.target.modules, self.ranks[episode], self.A, self.B, strict=True):
                if rank:
                    layer = inner.get_submodule(m.name)
                    layer.lora_A[ADAPTER].weight.copy_(A[episode, :rank])
                    layer.lora_B[ADAPTER].weight.copy_(B[episode, :, :rank])
            for name, (weight, bias) in zip(self.target.head_names, self.heads, strict=True):
                head = inner.get_submodule(name).modules_to_save[ADAPTER]
                head.weight.copy_(weight[episode])
                if bias is not None:
                    head.bias.copy_(bias[episode])
        model.eval()
        return model

    def export(self, episode: int, path: str | os.PathLike, base: nn.Module, base_model_name_or_path: str) -> None:
        """Write one episode's adapter as a peft folder (adapter_config.json + adapter_model.safetensors),
        atomically. `base` is a fresh copy of the frozen base model."""
        model = self.peft_model(episode, base, base_model_name_or_path)
        state = {key: value.detach().cpu().contiguous() for key, value in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
        try:
            config = self.lora_config(episode)  # peft may rewrite its own copy's target_modules as suffixes
            config.base_model_name_or_path = base_model_name_or_path
            config.save_pretrained(staging)
            save_file(state, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
            replace_folder(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
