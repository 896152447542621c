"""Choosing a network by name for an environment."""

from __future__ import annotations

import math

from torch import nn

from impala.envs import EnvInfo
from impala.errors import ConfigError
from impala.nets.mlp import MLPNet, SeedNet

NET_NAMES = ("seed", "mlp")


def build_net(name: str, env: EnvInfo, *, num_hidden: int, num_layers: int = 2) -> nn.Module:
    """Builds network `name` ('seed' or 'mlp') for `env`'s observation and action spaces."""
    if len(env.obs_shape) != 1:
        raise ConfigError(
            f"network '{name}' needs a flat vector observation; '{env.env_id}' has shape "
            f"{env.obs_shape}"
        )
    obs_dim = math.prod(env.obs_shape)
    if name == "seed":
        return SeedNet(num_hidden, obs_dim=obs_dim, num_actions=env.num_actions)
    if name == "mlp":
        return MLPNet(obs_dim, env.num_actions, num_hidden=num_hidden, num_layers=num_layers)
    raise ConfigError(f"unknown network '{name}' (choose from {', '.join(NET_NAMES)})")
