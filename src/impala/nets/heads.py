"""A torso with the policy and value heads on top: the feed-forward agent network."""

from __future__ import annotations

import torch
from torch import nn

from impala.distributions import ActionSpec, as_spec
from impala.nets.popart import PopArt

# A Gaussian policy's log standard deviations are kept within these (std 0.007 to 7.4 in
# normalised action units): beyond them a step can make a log-probability overflow.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


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


class GaussianPolicy(nn.Module):
    """A diagonal Gaussian's parameters from features, `[N, F] -> [N, 2d]`: means from a linear
    layer, then log standard deviations that are parameters of their own (not of the state), as
    in PPO's usual continuous policy (see `impala.distributions`)."""

    def __init__(self, num_features: int, dim: int, log_std_init: float = 0.0) -> None:
        super().__init__()
        self.mean = nn.Linear(num_features, dim)
        self.log_std = nn.Parameter(torch.full((dim,), float(log_std_init)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mean = self.mean(features)
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).to(mean.dtype)
        return torch.cat([mean, log_std.expand_as(mean)], dim=-1)


def policy_head(num_features: int, action: int | ActionSpec) -> nn.Module:
    """The policy's output layer for an action space, `[N, F] -> [N, P]` (P its parameters'
    width): logits for discrete spaces, a Gaussian's means and log standard deviations for a
    Box."""
    action = as_spec(action)
    if action.kind == "box":
        return GaussianPolicy(num_features, action.dim)
    return nn.Linear(num_features, action.params_size)


def init_policy_head(head: nn.Module, gain: float = 0.01) -> None:
    """Orthogonal weights with a small gain, zero biases: a first policy near uniform (near zero
    means for a Gaussian)."""
    linear = head.mean if isinstance(head, GaussianPolicy) else head
    nn.init.orthogonal_(linear.weight, gain=gain)
    nn.init.zeros_(linear.bias)


class Heads(nn.Module):
    """Policy parameters (logits for discrete actions) and state value from a feature vector."""

    def __init__(
        self, num_features: int, action: int | ActionSpec, popart_beta: float | None = None
    ) -> None:
        super().__init__()
        self.policy = policy_head(num_features, action)
        self.value = value_head(num_features, popart_beta)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features `[N, F]` -> policy parameters (logits for discrete actions) `[N, P]`, values
        `[N]`."""
        return self.policy(features), values(self.value, features)


class PolicyValueNet(nn.Module):
    """`torso` (obs `[N, ...]` -> `[N, F]`, with `num_features`), a policy head for the action
    space `action` (an int: that many discrete actions) and a value head."""

    is_recurrent = False

    def __init__(
        self, torso: nn.Module, action: int | ActionSpec, popart_beta: float | None = None
    ) -> None:
        super().__init__()
        self.action_spec = as_spec(action)
        self.torso = torso
        self.heads = Heads(torso.num_features, self.action_spec, popart_beta)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, ...]` -> policy parameters `[N, P]` (logits `[N, A]` for discrete actions),
        values `[N]`."""
        return self.heads(self.torso(obs))

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, ...]` -> policy parameters `[N, P]` (acting needs no value)."""
        return self.heads.policy(self.torso(obs))
