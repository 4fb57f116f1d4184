"""An actor-critic whose weights are shared across module slots, so it runs on models of any size.

Each module slot is encoded by the same MLP. The slots then see each other in one of two ways
(`architecture`): `attention`, a small transformer encoder over the slot tokens and a global token (the env's
global features), padding slots masked out of attention; or `mean`, a masked mean of the slot encodings. A
context vector (the global token, or the mean with the global features) gives the value; every slot's action
logits come from the same head applied to [slot, context]. Padding slots can only keep: their shrink and grow
logits are masked, so they add nothing to the log-probability or the entropy. With `prior='greedy_iterative'`
every slot also reads whether iterative greedy would grow it now (computed from the observation, as
`agents.baselines.iterative_greedy_grows`), so the policy can learn where to depart from that rule (a residual
on a heuristic) instead of relearning it. With `start='greedy'` (or 'greedy_gain') the policy's episodes start
from that baseline's allocation (the policy refines it) instead of the env's initial rank; the policy carries
that setting, so it is applied the way it was trained. Plugged into SB3 through a policy subclass (for PPO, A2C,
TRPO and sb3-contrib's MaskablePPO), not a fork of the algorithm.
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from agents.baselines import iterative_greedy_grows
from strato_env.observation import GLOBAL_FEATURES, MODULE_FEATURES, PRESENT, module_table, slots_of

ARCHITECTURES = ("attention", "mean")
PRIORS = ("greedy_iterative", "none")
STARTS = ("empty", "greedy", "greedy_gain")
HEADS = 4
"""Attention heads of the `attention` architecture (`hidden` must be a multiple)."""
LAYERS = 2
"""Transformer encoder layers of the `attention` architecture."""
MASKED_LOGIT = -1e8
"""The shrink and grow logits of a padding slot (probability 0; keep has probability 1)."""


class SlotFeatures(BaseFeaturesExtractor):
    """Concatenates the env's Dict observation as [global, modules] without changing it."""

    def __init__(self, observation_space: spaces.Dict) -> None:
        super().__init__(observation_space, features_dim=GLOBAL_FEATURES + observation_space["modules"].shape[0])

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([observations["global"], observations["modules"]], dim=1)


class SlotNetwork(nn.Module):
    """Per-slot encoder, slot mixing and context; SB3's `mlp_extractor` role.

    The actor latent holds, per slot, `hidden` features and the slot's present flag (which `SlotActionHead`
    reads to mask padding); the critic latent is the context.
    """

    def __init__(self, hidden: int = 64, architecture: str = "attention", prior: str = "none") -> None:
        super().__init__()
        self.hidden = hidden
        self.architecture = architecture
        self.prior = prior
        extra = int(prior != "none")  # the prior's move, read by the encoder and the head
        self.encoder = nn.Sequential(
            nn.Linear(MODULE_FEATURES + extra, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        if architecture == "attention":
            self.global_token = nn.Sequential(nn.Linear(GLOBAL_FEATURES, hidden), nn.Tanh())
            layer = nn.TransformerEncoderLayer(
                hidden, HEADS, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True
            )
            self.mixer = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.context = nn.Sequential(nn.Linear(hidden + GLOBAL_FEATURES, hidden), nn.Tanh())
        self.slot_head = nn.Sequential(nn.Linear(2 * hidden + extra, hidden), nn.Tanh())
        self.latent_dim_vf = hidden
        self.latent_dim_pi = 0  # set per observation width by `SlotPolicyMixin`; the head works per slot

    def _encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot encodings, context, present flags) of a batch of [global, modules] features; with a prior, each
        slot's encoding ends with the prior's move (1: grow)."""
        global_ = features[:, :GLOBAL_FEATURES]
        slots = module_table(features[:, GLOBAL_FEATURES:])
        present = slots[..., PRESENT]
        if self.prior != "none":
            slots = torch.cat([slots, iterative_greedy_grows(slots, global_)[..., None].to(slots)], dim=2)
        encoded = self.encoder(slots)
        if self.architecture == "attention":
            tokens = torch.cat([self.global_token(global_)[:, None], encoded], dim=1)
            padding = torch.cat([torch.zeros_like(present[:, :1]), 1 - present], dim=1).bool()
            with sdpa_kernel(SDPBackend.MATH):  # twice differentiable (TRPO's Hessian-vector products)
                mixed = self.mixer(tokens, src_key_padding_mask=padding)
            encoded, pooled = mixed[:, 1:], mixed[:, 0]
        else:
            weights = present[..., None]
            pooled = (encoded * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.prior != "none":
            encoded = torch.cat([encoded, slots[..., -1:]], dim=2)
        return encoded, self.context(torch.cat([pooled, global_], dim=1)), present

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        encoded, context, present = self._encode(features)
        joint = torch.cat([encoded, context[:, None].expand(-1, encoded.shape[1], -1)], dim=2)
        return torch.cat([self.slot_head(joint), present[..., None]], dim=2).flatten(1)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self._encode(features)[1]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class SlotActionHead(nn.Module):
    """The same linear map from a slot's latent to its 3 logits (shrink, keep, grow), for every slot; a padding
    slot's shrink and grow are masked."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.linear = nn.Linear(hidden, 3)
        nn.init.orthogonal_(self.linear.weight, gain=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        per_slot = latent.reshape(len(latent), -1, self.hidden + 1)
        logits = self.linear(per_slot[..., : self.hidden])
        moves = torch.tensor([True, False, True], device=latent.device)  # shrink and grow
        padding = per_slot[..., self.hidden :] < 0.5
        return logits.masked_fill(padding & moves, MASKED_LOGIT).flatten(1)


class SlotPolicyMixin:
    """Builds the slot network and the per-slot action head in place of SB3's MLPs."""

    def __init__(
        self,
        *args,
        hidden: int = 64,
        architecture: str = "attention",
        prior: str = "none",
        start: str = "empty",
        **kwargs,
    ) -> None:
        self.hidden = hidden
        self.architecture = architecture
        self.prior = prior
        self.start = start
        """Where the policy's episodes start (`STARTS`); the network does not read it."""
        kwargs.setdefault("features_extractor_class", SlotFeatures)
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = SlotNetwork(self.hidden, self.architecture, self.prior)
        self.mlp_extractor.latent_dim_pi = slots_of(self.observation_space) * (self.hidden + 1)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.action_net = SlotActionHead(self.hidden)
        # the optimizer built by super() holds the replaced head's parameters, not the new ones
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict:
        own = {"hidden": self.hidden, "architecture": self.architecture, "prior": self.prior, "start": self.start}
        return {**super()._get_constructor_parameters(), **own}


class SlotPolicy(SlotPolicyMixin, ActorCriticPolicy):
    """For SB3 PPO / A2C and sb3-contrib TRPO."""


class MaskableSlotPolicy(SlotPolicyMixin, MaskableActorCriticPolicy):
    """For sb3-contrib MaskablePPO."""
