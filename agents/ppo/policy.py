"""An actor-critic whose weights are shared across module slots, so it runs on models of any size.

Each module slot is encoded by the same MLP; a masked mean over present slots plus the env's global
features gives a context vector; every slot's action logits come from the same head applied to
[slot encoding, context], and the value from the context alone. Plugged into SB3 through a policy
subclass (for PPO and for sb3-contrib's MaskablePPO), not a fork of the algorithm.
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from strato_env.observation import GLOBAL_FEATURES, MODULE_FEATURES, PRESENT, module_table, slots_of


class SlotFeatures(BaseFeaturesExtractor):
    """Concatenates the env's Dict observation as [global, modules] without changing it."""

    def __init__(self, observation_space: spaces.Dict) -> None:
        super().__init__(observation_space, features_dim=GLOBAL_FEATURES + observation_space["modules"].shape[0])

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([observations["global"], observations["modules"]], dim=1)


class SlotNetwork(nn.Module):
    """Per-slot encoder and pooled context; SB3's `mlp_extractor` role."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.Sequential(
            nn.Linear(MODULE_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.context = nn.Sequential(nn.Linear(hidden + GLOBAL_FEATURES, hidden), nn.Tanh())
        self.slot_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh())
        self.latent_dim_vf = hidden
        self.latent_dim_pi = 0  # set per observation width by `SlotPolicyMixin`; the head works per slot

    def _encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        global_ = features[:, :GLOBAL_FEATURES]
        slots = module_table(features[:, GLOBAL_FEATURES:])
        encoded = self.encoder(slots)
        present = slots[..., PRESENT : PRESENT + 1]
        pooled = (encoded * present).sum(1) / present.sum(1).clamp(min=1.0)
        return encoded, self.context(torch.cat([pooled, global_], dim=1))

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        encoded, context = self._encode(features)
        joint = torch.cat([encoded, context[:, None].expand(-1, encoded.shape[1], -1)], dim=2)
        return self.slot_head(joint).flatten(1)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self._encode(features)[1]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class SlotActionHead(nn.Module):
    """The same linear map from a slot's latent to its 3 logits (shrink, keep, grow), for every slot.

    `grow_bias` starts the grow logit that much above shrink and keep, so that the untrained policy's ranks
    drift upward and its episodes fill the budget (unbiased, a slot's rank is a random walk that stays low).
    """

    def __init__(self, hidden: int, grow_bias: float = 0.0) -> None:
        super().__init__()
        self.hidden = hidden
        self.linear = nn.Linear(hidden, 3)
        nn.init.orthogonal_(self.linear.weight, gain=0.01)
        with torch.no_grad():
            self.linear.bias.copy_(torch.tensor([0.0, 0.0, grow_bias]))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.linear(latent.reshape(len(latent), -1, self.hidden)).flatten(1)


class SlotPolicyMixin:
    """Builds the slot network and the per-slot action head in place of SB3's MLPs."""

    def __init__(self, *args, hidden: int = 64, grow_bias: float = 0.0, **kwargs) -> None:
        self.hidden = hidden
        self.grow_bias = grow_bias
        kwargs.setdefault("features_extractor_class", SlotFeatures)
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = SlotNetwork(self.hidden)
        self.mlp_extractor.latent_dim_pi = slots_of(self.observation_space) * self.hidden

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.action_net = SlotActionHead(self.hidden, self.grow_bias)
        # the optimizer built by super() holds the replaced head's parameters, not the new ones
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict:
        return {**super()._get_constructor_parameters(), "hidden": self.hidden, "grow_bias": self.grow_bias}


class SlotPolicy(SlotPolicyMixin, ActorCriticPolicy):
    """For SB3 PPO / A2C."""


class MaskableSlotPolicy(SlotPolicyMixin, MaskableActorCriticPolicy):
    """For sb3-contrib MaskablePPO."""
