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
import ctypes
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
from transformers.activations import NewGELUActivation

from strato_env.files import replace_folder
from strato_env.models import TargetModule, fan_in_fan_out

ADAPTER = "default"
BETAS = (0.9, 0.999)
EPS = 1e-8
"""AdamW's constants, torch's defaults."""


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks instead of returning them to the system (process-wide).

    A training step allocates and frees the same large activation buffers every time; by default glibc maps
    each one afresh and the kernel faults its pages back in (about 500,000 page faults per second of training
    at 16 episodes on gpt2-tiny). Raising the mmap and trim thresholds keeps them: about 7% more decisions per
    second there. The `strato` command and the benchmarks call this; a library user may. Returns whether it
    applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD of malloc.h
    return bool(libc.mallopt(mmap_threshold, 1 << 30)) and bool(libc.mallopt(trim_threshold, (1 << 31) - 1))


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: the driver's count; CPU: the kernel's MemAvailable), or
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def episode_bytes(modules: Sequence[TargetModule], r_max: int, config: Any, rows: int, tokens: int) -> int:
    """An estimate of the memory one more episode needs: its adapter state (values, gradients and two Adam
    moments of every factor at r_max) and the activations of one training step (about 34 floats per token,
    layer and hidden unit for a transformer block's saved activations, and 4 per token and vocabulary entry
    for logits, their softmax and gradients)."""
    state = 4 * 4 * r_max * sum(m.params_per_rank for m in modules)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0)
    layers += getattr(config, "num_decoder_layers", 0) or 0
    vocab = getattr(config, "vocab_size", 0) or 0
    return state + 4 * rows * tokens * (34 * layers * hidden + 4 * vocab)


def check_width_fits(episodes: int, each: int, device: torch.device, where: str = "num_envs") -> None:
    """A ValueError, before anything is allocated, when `episodes` episodes of `each` bytes cannot fit in the
    memory free on `device` (90% of it, leaving room for the base model's own buffers)."""
    free = free_memory(device)
    if free is None or episodes * each <= 0.9 * free:
        return
    fits = max(int(0.9 * free // each), 1)
    raise ValueError(
        f"{where}={episodes} is too wide for {device}: about {episodes * each / 2**30:.1f} GiB for {episodes} episodes "
        f"({each / 2**20:.1f} MiB each), {free / 2**30:.1f} GiB free; allowed: {where} <= {fits}"
    )


def truncated_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B', A') of rank `rank` with B' @ A' the best rank-`rank` approximation of B @ A.

    Works on the thin QR factors of B and A^T, so the SVD is of an r x r matrix, never out x in.
    """
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T)
    root = S[:rank].sqrt()
    return (Q_b @ U[:, :rank]) * root, root[:, None] * (Vh[:rank] @ Q_a.T)


class _Slot(nn.Module):
    """A module of the base that its model's installed adapters act on (`owner.lora`)."""

    def __init__(self, base: nn.Module, index: int, owner: BatchedModel) -> None:
        super().__init__()
        self.base = base
        self.index = index
        self.owner = owner  # not an nn.Module: a plain reference

    @property
    def weight(self) -> torch.Tensor:  # read by some models' forward (e.g. T5's dtype check)
        return self.base.weight


class LoraSlot(_Slot):
    """A target module of the base plus the low-rank updates of the installed adapters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora = self.owner.lora
        if lora is None:
            return y
        xs = x.reshape(lora.episodes, -1, x.shape[-1])
        if lora.active[self.index]:
            A, B = lora.A[self.index], lora.B[self.index]
            low = torch.bmm(xs, A.transpose(1, 2))
            y = torch.baddbmm(y.reshape(lora.episodes, -1, y.shape[-1]), low, B.transpose(1, 2)).reshape(y.shape)
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


class HeadSlot(_Slot):
    """A head trained in full (a classification head): one weight and bias per episode."""

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
    """A private copy of the frozen base with every target module and head replaced by a slot, and
    activations written as chains of elementwise ops replaced by torch's fused kernel of the same function.

    With no adapters installed (`lora` None) it computes the base model (the fused GELU to float rounding)."""

    def __init__(self, model: nn.Module, modules: Sequence[TargetModule], heads: Sequence[str] = ()) -> None:
        self.model = model
        self.modules = list(modules)
        self.head_names = list(heads)
        self.lora: BatchedLora | None = None
        self.recording: torch.Tensor | None = None
        self.fan_in_fan_out = fan_in_fan_out(model, self.modules)
        for name, module in list(model.named_modules()):
            if type(module) is NewGELUActivation:  # GPT-2's tanh GELU as five elementwise ops: the same in one
                _replace(model, name, nn.GELU(approximate="tanh"))
        for i, m in enumerate(self.modules):
            _replace(model, m.name, LoraSlot(model.get_submodule(m.name), i, self))
        for i, name in enumerate(self.head_names):
            head = model.get_submodule(name)
            if type(head) is not nn.Linear:
                raise ValueError(
                    f"trained head {name!r} is a {type(head).__name__}; only nn.Linear heads are supported"
                )
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
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        n, device = episodes, target.device
        shapes = [(r_max, m.in_features) for m in target.modules] + [(m.out_features, r_max) for m in target.modules]
        columns = list(range(len(target.modules))) * 2
        self._initial_heads = []
        for i in range(len(target.head_names)):
            head = target.head(i)
            self._initial_heads += [head.weight.detach().clone()] + (
                [head.bias.detach().clone()] if head.bias is not None else []
            )
        shapes += [tuple(w.shape) for w in self._initial_heads]
        columns += [len(target.modules)] * len(self._initial_heads)
        sizes = [math.prod(shape) for shape in shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._slices = [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

        # One flat (episodes x parameters) buffer each for values, gradients and the two Adam moments; the
        # factors and heads are views into it, so the optimizer is a handful of ops over all of them.
        self.values = torch.zeros(n, int(offsets[-1]), device=device)
        self.grads = torch.zeros_like(self.values)
        self.exp_avg = torch.zeros_like(self.values)
        self.exp_avg_sq = torch.zeros_like(self.values)
        self._params = []
        for where, shape in zip(self._slices, shapes, strict=True):
            param = self.values[:, where].view(n, *shape).requires_grad_()
            param.grad = self.grads[:, where].view(n, *shape)  # backward accumulates in place, into `grads`
            self._params.append(param)
        self._columns = torch.as_tensor(np.repeat(columns, sizes), device=device)
        """Per flat parameter: its module, or len(modules) for the heads (the column of `steps`)."""
        m = len(target.modules)
        self.A, self.B, heads = self._params[:m], self._params[m : 2 * m], iter(self._params[2 * m :])
        self.heads = [
            (next(heads), next(heads) if target.head(i).bias is not None else None)
            for i in range(len(target.head_names))
        ]
        self.ranks = np.zeros((n, m), dtype=np.int64)
        self.active = [False] * m
        """Per module: whether any episode adapts it (if none, its forward skips the low-rank term)."""
        self.steps = torch.zeros(n, m + 1, dtype=torch.float64, device=device)
        """AdamW step count per episode and module (steps it was adapted in); the last column counts the heads'."""
        for episode in range(n):
            self._initial_head_values(episode)

    @property
    def extra_params(self) -> int:
        """Trained parameters outside LoRA per episode (e.g. a classification head)."""
        return sum(w.numel() for w in self._initial_heads)

    @property
    def trains_anything(self) -> bool:
        return any(self.active) or bool(self.heads)

    @torch.no_grad()
    def _initial_head_values(self, episode: int) -> None:
        for param, value in zip(self._params[2 * len(self.A) :], self._initial_heads, strict=True):
            param[episode] = value

    def _refresh_active(self) -> None:
        self.active = self.ranks.any(axis=0).tolist()

    def _module_slices(self, module: int) -> list[slice]:
        return [self._slices[module], self._slices[len(self.A) + module]]

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
            if rank:  # rank 0 keeps nothing, so needs no SVD (nor finite factors)
                new_B, new_A = truncated_factors(B[episode, :, :old], A[episode, :old], rank)
            A[episode].zero_()
            B[episode].zero_()
            if rank:
                A[episode, :rank], B[episode, :, :rank] = new_A, new_B
            for where in self._module_slices(module):  # the kept directions are a new basis
                self.exp_avg[episode, where] = 0
                self.exp_avg_sq[episode, where] = 0
        self.ranks[episode, module] = rank
        self._refresh_active()

    @torch.no_grad()
    def reset(self, episode: int, ranks: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Fresh adapters for one episode at `ranks` (one per module, grown in module order from `generator`),
        the initial head weights and a fresh optimizer state."""
        for buffer in (self.values, self.exp_avg, self.exp_avg_sq):
            buffer[episode] = 0
        self._initial_head_values(episode)
        self.steps[episode] = 0
        self.ranks[episode] = 0
        self._refresh_active()
        for module, rank in enumerate(ranks):
            self.set_rank(episode, module, int(rank), generator)

    # ---- training -----------------------------------------------------------------------------------------
    def backward_and_step(self, losses: torch.Tensor, training: Sequence[int]) -> None:
        """Backpropagate the sum of the `training` episodes' losses and take one AdamW step for each of them;
        the other episodes are left exactly as they were."""
        training = list(training)
        if not self.trains_anything or not training:
            return
        self.grads.zero_()
        with warnings.catch_warnings():  # the gradients are views into `grads`: a layout torch may warn about
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            losses[training].sum().backward()
        adapted = torch.as_tensor(np.concatenate([self.ranks > 0, np.ones((self.episodes, 1), bool)], 1))
        if len(training) < self.episodes:
            adapted[[e for e in range(self.episodes) if e not in training]] = False
        self.steps += adapted.to(self.steps)
        self._adamw(None if len(training) == self.episodes else training)

    @torch.no_grad()
    def _adamw(self, training: list[int] | None) -> None:
        """torch.optim.AdamW's update over the flat buffers, with a step count per episode and module (its bias
        corrections). Unused rank slots hold zeros with zero gradients and moments, so they stay zero; episodes
        not in `training` (None: all) are left as they were."""
        beta1, beta2 = BETAS
        lr, decay = self.learning_rate, self.weight_decay
        step = self.steps.clamp(min=1)
        step_size = torch.index_select((lr / (1 - beta1**step)).float(), 1, self._columns)  # per flat parameter
        bias2_root = torch.index_select((1 - beta2**step).sqrt().float(), 1, self._columns)
        values, grads, m, v = self.values, self.grads, self.exp_avg, self.exp_avg_sq
        if training is None:
            if decay:
                values.mul_(1 - lr * decay)
            m.lerp_(grads, 1 - beta1)
            v.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        else:
            t = torch.zeros(self.episodes, 1, device=values.device)
            t[training] = 1.0
            step_size *= t
            if decay:
                values.mul_(1 - lr * decay * t)
            m.lerp_(grads, (1 - beta1) * t)
            v.mul_(1 - (1 - beta2) * t).addcmul_(grads, grads * ((1 - beta2) * t))
        denom = v.sqrt().div_(bias2_root).add_(EPS)
        values.addcdiv_(step_size.mul_(m), denom, value=-1)

    # ---- snapshots ----------------------------------------------------------------------------------------
    def snapshot(self, episode: int) -> dict[str, Any]:
        """A copy of one episode's factors, heads, ranks and optimizer state."""
        return {
            "values": self.values[episode].clone(),
            "exp_avg": self.exp_avg[episode].clone(),
            "exp_avg_sq": self.exp_avg_sq[episode].clone(),
            "steps": self.steps[episode].clone(),
            "ranks": self.ranks[episode].copy(),
        }

    @torch.no_grad()
    def restore(self, episode: int, snapshot: dict[str, Any]) -> None:
        self.values[episode] = snapshot["values"]
        self.exp_avg[episode] = snapshot["exp_avg"]
        self.exp_avg_sq[episode] = snapshot["exp_avg_sq"]
        self.steps[episode] = snapshot["steps"]
        self.ranks[episode] = snapshot["ranks"]
        self._refresh_active()

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
        state = {
            key: value.detach().cpu().contiguous()
            for key, value in get_peft_model_state_dict(model, save_embedding_layers=False).items()
        }
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
