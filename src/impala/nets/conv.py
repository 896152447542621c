"""The paper's convolutional networks (Espeholt et al. 2018, Fig. 3) and a MinAtar-sized one.

Each takes image observations `[N, C, H, W]` (uint8 frames or 0/1 planes, converted to float
here, so that explorers and slots keep the compact type) and returns `(logits [N, A],
values [N])` like the dense networks. `torso(obs) -> [N, F]` is exposed separately so that a
recurrent core can sit between the torso and the heads.
"""

from __future__ import annotations

import torch
from torch import nn


class _Heads(nn.Module):
    """Policy logits and state value from a feature vector."""

    def __init__(self, num_features: int, num_actions: int) -> None:
        super().__init__()
        self.policy = nn.Linear(num_features, num_actions)
        self.value = nn.Linear(num_features, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(features), self.value(features).squeeze(-1)


class _ImageNet(nn.Module):
    """Common part: input scaling, torso, heads."""

    torso_net: nn.Module

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def torso(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, C, H, W]` -> features `[N, F]`."""
        return self.torso_net(obs.float() * self.scale)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, C, H, W]` -> logits `[N, A]`, values `[N]`."""
        return self.heads(self.torso(obs))

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.heads.policy(self.torso(obs))


def _flat_size(module: nn.Module, obs_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *obs_shape)).shape[1])


class AtariShallowNet(_ImageNet):
    """Fig. 3, left: conv 16 8x8 /4, ReLU, conv 32 4x4 /2, ReLU, dense 256, ReLU."""

    def __init__(self, obs_shape: tuple[int, int, int], num_actions: int, scale=1 / 255) -> None:
        super().__init__(scale)
        channels = obs_shape[0]
        convs = nn.Sequential(
            nn.Conv2d(channels, 16, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.torso_net = nn.Sequential(
            convs, nn.Linear(_flat_size(convs, obs_shape), 256), nn.ReLU()
        )
        self.heads = _Heads(256, num_actions)


class _ResidualBlock(nn.Module):
    """x + conv(ReLU(conv(ReLU(x)))), 3x3 convolutions keeping the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


def _section(in_channels: int, channels: int) -> nn.Sequential:
    """conv 3x3 /1, max-pool 3x3 /2 (TensorFlow's SAME padding), two residual blocks."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
        _ResidualBlock(channels),
        _ResidualBlock(channels),
    )


class AtariDeepNet(_ImageNet):
    """Fig. 3, right: three sections of 16, 32, 32 channels, ReLU, dense 256, ReLU."""

    def __init__(
        self,
        obs_shape: tuple[int, int, int],
        num_actions: int,
        channels: tuple[int, ...] = (16, 32, 32),
        scale=1 / 255,
    ) -> None:
        super().__init__(scale)
        sections: list[nn.Module] = []
        in_channels = obs_shape[0]
        for out_channels in channels:
            sections.append(_section(in_channels, out_channels))
            in_channels = out_channels
        convs = nn.Sequential(*sections, nn.ReLU(), nn.Flatten())
        self.torso_net = nn.Sequential(
            convs, nn.Linear(_flat_size(convs, obs_shape), 256), nn.ReLU()
        )
        self.heads = _Heads(256, num_actions)


class MinAtarNet(_ImageNet):
    """For MinAtar's 10x10 planes: conv 16 3x3 /1, ReLU, dense 128, ReLU (the network of
    MinAtar's own baselines, Young & Tian 2019)."""

    def __init__(self, obs_shape: tuple[int, int, int], num_actions: int, scale=1.0) -> None:
        super().__init__(scale)
        convs = nn.Sequential(nn.Conv2d(obs_shape[0], 16, 3), nn.ReLU(), nn.Flatten())
        self.torso_net = nn.Sequential(
            convs, nn.Linear(_flat_size(convs, obs_shape), 128), nn.ReLU()
        )
        self.heads = _Heads(128, num_actions)
