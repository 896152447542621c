"""A torso with the policy and value heads on top: the feed-forward agent network."""

from __future__ import annotations

import torch
from torch import nn

from impala.nets.popart import PopArt


def value_head(num_features: int, popart_beta: float | None = None) -> nn.Module:
    """A linear value layer `[N, F] -> [N, 1]`, or PopArt (`[N, F] -> [N]`) if `popart_beta` is
    given; `values` reads either as `[N]`."""
    if popart_beta is not None:
        return PopArt(num_features, popart_beta)
    return nn.Linear(num_features, 1)


def values(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The values `[N]` of a `value_head`."""
    out = head(features)
    return out if isinstance(head, PopArt) else out.squeeze(-1)


class Heads(nn.Module):
    """Policy logits and state value from a feature vector."""

    def __init__(
        self, num_features: int, num_actions: int, popart_beta: float | None = None
    ) -> None:
        super().__init__()
        self.policy = nn.Linear(num_features, num_actions)
        self.value = value_head(num_features, popart_beta)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features `[N, F]` -> logits `[N, A]`, values `[N]`."""
        return self.policy(features), values(self.value, features)


class PolicyValueNet(nn.Module):
    """`torso` (obs `[N, ...]` -> `[N, F]`, with `num_features`) and two linear heads."""

    is_recurrent = False

    def __init__(
        self, torso: nn.Module, num_actions: int, popart_beta: float | None = None
    ) -> None:
        super().__init__()
        self.torso = torso
        self.heads = Heads(torso.num_features, num_actions, popart_beta)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, ...]` -> logits `[N, A]`, values `[N]`."""
        return self.heads(self.torso(obs))

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, ...]` -> logits `[N, A]` (acting needs no value)."""
        return self.heads.policy(self.torso(obs))
