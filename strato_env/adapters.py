"""peft LoRA whose per-module ranks change during training, with an optimizer that follows the changes.

Every module keeps scaling 1 (lora_alpha = r), so a rank change never rescales the update:
growing appends rows of A (random) and columns of B (zero), leaving B @ A unchanged; shrinking keeps
the truncated SVD of B @ A. Rank 0 disables the module's adapter (peft's per-layer switch).
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from strato_env.files import replace_folder
from strato_env.models import TargetModule, fan_in_fan_out

ADAPTER = "default"


def truncated_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B', A') of rank `rank` with B' @ A' the best rank-`rank` approximation of B @ A.

    Works on the thin QR factors of B and A^T, so the SVD is of an r x r matrix, never out x in.
    """
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T)
    root = S[:rank].sqrt()
    return (Q_b @ U[:, :rank]) * root, root[:, None] * (Vh[:rank] @ Q_a.T)


class DynamicLora:
    """A peft LoRA model over `modules` with per-module ranks that may change, and its AdamW optimizer."""

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[TargetModule],
        learning_rate: float,
        weight_decay: float = 0.0,
        modules_to_save: Sequence[str] | None = None,
    ) -> None:
        self.modules = list(modules)
        config = LoraConfig(
            r=1,
            lora_alpha=1,
            lora_dropout=0.0,
            target_modules=[m.name for m in self.modules],
            fan_in_fan_out=fan_in_fan_out(model, self.modules),
            modules_to_save=list(modules_to_save) if modules_to_save else None,
        )
        with warnings.catch_warnings():  # peft reads a transformers attribute that transformers deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft_model = get_peft_model(model, config)
        self.layers: dict[str, LoraLayer] = {
            m.name: self.peft_model.base_model.model.get_submodule(m.name) for m in self.modules
        }
        self.extra_parameters = [
            p for n, p in self.peft_model.named_parameters() if p.requires_grad and ".lora_" not in n
        ]
        self._initial_extra = [p.detach().clone() for p in self.extra_parameters]
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optimizer = self._new_optimizer()

    @property
    def device(self) -> torch.device:
        return next(iter(self.peft_model.parameters())).device

    # ---- shapes -------------------------------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.lora_A[ADAPTER].weight.shape[0] for name, layer in self.layers.items()}

    @property
    def extra_params(self) -> int:
        """Trained parameters outside LoRA (e.g. a classification head), constant over an episode."""
        return sum(p.numel() for p in self.extra_parameters)

    def _trainable(self) -> list[nn.Parameter]:
        factors = []
        for layer in self.layers.values():
            factors += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        return factors + self.extra_parameters

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self._trainable(), lr=self.learning_rate, weight_decay=self.weight_decay)

    # ---- rank changes -------------------------------------------------------------------------------------
    def _set_factors(self, name: str, B: torch.Tensor, A: torch.Tensor, moments: Any) -> None:
        """Install new factors for one module and carry its Adam moments with `moments(old, new_shape)`."""
        layer = self.layers[name]
        for linear, weight in ((layer.lora_A[ADAPTER], A), (layer.lora_B[ADAPTER], B)):
            old = linear.weight
            new = nn.Parameter(weight.contiguous())
            linear.weight = new
            group = self.optimizer.param_groups[0]["params"]
            group[next(i for i, p in enumerate(group) if p is old)] = new
            state = self.optimizer.state.pop(old, None)
            if state:
                self.optimizer.state[new] = {
                    key: moments(value, weight.shape) if key.startswith("exp_avg") else value
                    for key, value in state.items()
                }
        rank = A.shape[0]
        layer.lora_A[ADAPTER].out_features = rank
        layer.lora_B[ADAPTER].in_features = rank
        layer.r[ADAPTER] = max(rank, 1)  # peft's bookkeeping; the factor shapes are the truth
        layer.enable_adapters(rank > 0)

    def set_rank(self, name: str, rank: int, generator: torch.Generator | None = None) -> None:
        """Grow (new directions start at zero output) or shrink (truncated SVD of B @ A) one module."""
        layer = self.layers[name]
        A, B = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        old = A.shape[0]
        if rank == old:
            return
        with torch.no_grad():
            if rank > old:
                new_rows = torch.empty(rank - old, A.shape[1], dtype=A.dtype, device=A.device)
                nn.init.kaiming_uniform_(new_rows, a=math.sqrt(5), generator=generator)
                new_A = torch.cat([A, new_rows])
                new_B = torch.cat([B, B.new_zeros(B.shape[0], rank - old)], dim=1)

                def moments(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
                    grown = value.new_zeros(shape)
                    grown[tuple(slice(0, n) for n in value.shape)] = value
                    return grown
            else:
                new_B, new_A = truncated_factors(B, A, rank) if rank else (B[:, :0], A[:0])

                def moments(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
                    return value.new_zeros(shape)  # the kept directions are a new basis

        self._set_factors(name, new_B, new_A, moments)

    def set_ranks(self, ranks: Mapping[str, int], generator: torch.Generator | None = None) -> None:
        for name, rank in ranks.items():
            self.set_rank(name, rank, generator)

    def reinitialize(self, ranks: Mapping[str, int], generator: torch.Generator | None = None) -> None:
        """Fresh adapters at `ranks` (A random, B zero), the initial head weights and a fresh optimizer."""
        for name in self.layers:
            self.set_rank(name, 0)
        self.set_ranks(ranks, generator)
        with torch.no_grad():
            for parameter, value in zip(self.extra_parameters, self._initial_extra, strict=True):
                parameter.copy_(value)
        self.optimizer = self._new_optimizer()

    # ---- snapshots ----------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A deep copy of factors, head weights and optimizer state."""
        return {
            "factors": {
                name: (
                    layer.lora_B[ADAPTER].weight.detach().clone(),
                    layer.lora_A[ADAPTER].weight.detach().clone(),
                )
                for name, layer in self.layers.items()
            },
            "extra": [p.detach().clone() for p in self.extra_parameters],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        for name, (B, A) in snapshot["factors"].items():
            self._set_factors(name, B.clone(), A.clone(), lambda value, shape: value)
        with torch.no_grad():
            for parameter, value in zip(self.extra_parameters, snapshot["extra"], strict=True):
                parameter.copy_(value)
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))

    # ---- export -------------------------------------------------------------------------------------------
    def lora_config(self, base_model_name_or_path: str) -> LoraConfig:
        """A standard peft config with one exact `rank_pattern` key per adapted module (scaling 1)."""
        ranks = {name: r for name, r in self.ranks.items() if r > 0}
        pattern = {re.escape(name): r for name, r in ranks.items()}
        default = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
        config = copy.deepcopy(self.peft_model.peft_config[ADAPTER])
        config.r, config.lora_alpha = default, default
        config.target_modules = sorted(ranks)
        config.rank_pattern, config.alpha_pattern = pattern, dict(pattern)
        config.base_model_name_or_path = base_model_name_or_path
        config.inference_mode = True
        return config

    def export(self, path: str | os.PathLike, base_model_name_or_path: str) -> None:
        """Write a peft adapter folder (adapter_config.json + adapter_model.safetensors), atomically."""
        ranks = self.ranks
        if not any(ranks.values()) and not self.extra_parameters:
            raise ValueError("the allocation adapts no module (all ranks are 0): there is no adapter to export")
        nonempty = {k: v for k, v in self.peft_model.state_dict().items() if v.numel() > 0}  # rank-0 factors
        state = {
            key: value.detach().cpu().contiguous()
            for key, value in get_peft_model_state_dict(self.peft_model, state_dict=nonempty).items()
        }
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
        try:
            self.lora_config(base_model_name_or_path).save_pretrained(staging)
            save_file(state, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
            replace_folder(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
