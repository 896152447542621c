"""A torso with the policy and value heads on top: the feed-forward agent network."""

from __future__ import annotations

import torch
from torch import nn


class Heads(nn.Module):
    """Policy logits and state value from a feature vector."""

    def __init__(self, num_features: int, num_actions: int) -> None:
        super().__init__()
        self.policy = nn.Linear(num_features, num_actions)
        self.value = nn.Linear(num_features, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features `[N, F]` -> logits `[N, A]`, values `[N]`."""
        return self.policy(features), self.value(features).squeeze(-1)


class PolicyValueNet(nn.Module):
    """`torso` (obs `[N, ...]` -> `[N, F]`, with `num_features`) and two linear heads."""

    is_recurrent = False

    def __init__(self, torso: nn.Module, num_actions: int) -> None:
        super().__init__()
        self.torso = torso
        self.heads = Heads(torso.num_features, num_actions)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, ...]` -> logits `[N, A]`, values `[N]`."""
        return self.heads(self.torso(obs))

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, ...]` -> logits `[N, A]` (acting needs no value)."""
        return self.heads.policy(self.torso(obs))
