"""An example of your own network: `impala train --env CartPole-v1 --net
impala.examples.custom_net:build`.

`build(observation_space, action_spec, config, **net_kwargs)` returns a module that obeys the
network contract (`impala.nets.contract`): `action_spec` and `is_recurrent` attributes,
`forward(obs) -> (policy_params [N, P], values [N])` and `policy_logits(obs) -> [N, P]`. Here: a
policy tower and a value tower of ReLU units over flat vector observations, their widths set by
`--net-kwargs '{"hidden": 128}'`. The policy's output layer comes from `impala.nets.heads`
(`policy_head`: logits for discrete actions, a Gaussian's means and log standard deviations for a
Box), so this network takes every action space.
"""

from __future__ import annotations

import math

import gymnasium as gym
import torch
from torch import nn

from impala.distributions import ActionSpec
from impala.nets.heads import init_policy_head, policy_head


class TwoTowerMLP(nn.Module):
    """Separate policy and value towers over observations `[N, obs_dim]`."""

    is_recurrent = False

    def __init__(self, obs_dim: int, action_spec: ActionSpec, hidden: int, num_tasks: int) -> None:
        super().__init__()
        self.action_spec = action_spec
        self.policy = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            policy_head(hidden, action_spec),
        )
        self.value = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_tasks),  # one value per task of a multi-task run
        )
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
                nn.init.zeros_(layer.bias)
        init_policy_head(self.policy[-1])  # a first policy near uniform

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, obs_dim]` -> policy parameters `[N, P]`, values `[N]` (`[N, K]`)."""
        x = obs.float()
        values = self.value(x)
        return self.policy(x), values.squeeze(-1) if values.shape[-1] == 1 else values

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, obs_dim]` -> policy parameters `[N, P]` (acting skips the value tower)."""
        return self.policy(obs.float())


def build(
    observation_space: gym.Space, action_spec: ActionSpec, config, *, hidden: int = 64
) -> TwoTowerMLP:
    """The network for a flat Box observation space (`config`: the run's impala Config)."""
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(f"needs a flat vector observation, got {observation_space}")
    return TwoTowerMLP(observation_space.shape[0], action_spec, hidden, config.num_tasks)
