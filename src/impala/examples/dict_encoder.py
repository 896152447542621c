"""An example encoder for a `Dict` observation (an image part and a vector part, say): one
encoder per part, their features concatenated, then a shared layer and the policy and value
heads. `impala train --env yourpkg.envs:make_env --net impala.examples.dict_encoder:build`.

Observations arrive as the contract says (`impala.nets.contract`): a `dict[str, Tensor]` keyed by
the Dict's part names, each `[N, *part_shape]` of the part's dtype. The parts are read from the
observation space `build` is given:

- images (a Box of rank 3, uint8 frames; they arrive channels-first, `[C, H, W]`, as the
  contract says, but the encoder also takes `[H, W, C]` for use outside impala: the smaller end
  axis is taken as the channels) -> two small convolutions;
- vectors (a Box of rank 1, or MultiBinary) -> a dense layer;
- `Discrete(n)` parts -> one-hot, then a dense layer.
"""

from __future__ import annotations

import gymnasium as gym
import torch
import torch.nn.functional as F
from torch import nn

from impala.distributions import ActionSpec
from impala.nets.heads import init_policy_head, policy_head


class ImageEncoder(nn.Module):
    """Frames `[N, H, W, C]` (or `[N, C, H, W]`) -> features `[N, F]`."""

    def __init__(self, shape: tuple[int, int, int], features: int) -> None:
        super().__init__()
        self.channels_last = shape[-1] < shape[0]
        channels = shape[-1] if self.channels_last else shape[0]
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, *self._chw(shape))).shape[1]
        self.dense = nn.Sequential(nn.Linear(flat, features), nn.ReLU())

    def _chw(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[-1], *shape[:-1]) if self.channels_last else tuple(shape)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.dense(self.convs(x))


class VectorEncoder(nn.Module):
    """Vectors `[N, D]` (or Discrete indices `[N]`, one-hot first) -> features `[N, F]`."""

    def __init__(self, size: int, features: int, one_hot: bool = False) -> None:
        super().__init__()
        self.size, self.one_hot = size, one_hot
        self.dense = nn.Sequential(nn.Linear(size, features), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_hot:
            x = F.one_hot(x.long(), self.size)
        return self.dense(x.float().flatten(1))


def part_encoder(space: gym.Space, features: int) -> nn.Module:
    """The encoder of one part of the observation."""
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 3:
        return ImageEncoder(space.shape, features)
    if isinstance(space, gym.spaces.Box | gym.spaces.MultiBinary) and len(space.shape) == 1:
        return VectorEncoder(space.shape[0], features)
    if isinstance(space, gym.spaces.Discrete):
        return VectorEncoder(int(space.n), features, one_hot=True)
    raise ValueError(f"no encoder here for the part {space}")


class DictEncoderNet(nn.Module):
    """An encoder per part, concatenated, a dense layer, policy and value heads."""

    is_recurrent = False

    def __init__(
        self, space: gym.spaces.Dict, action_spec: ActionSpec, features: int, num_tasks: int
    ) -> None:
        super().__init__()
        self.action_spec = action_spec
        self.encoders = nn.ModuleDict({k: part_encoder(s, features) for k, s in space.items()})
        self.trunk = nn.Sequential(nn.Linear(features * len(self.encoders), features), nn.ReLU())
        self.policy = policy_head(features, action_spec)
        self.value = nn.Linear(features, num_tasks)
        init_policy_head(self.policy)

    def features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """obs {part: `[N, ...]`} -> features `[N, F]`."""
        return self.trunk(torch.cat([enc(obs[k]) for k, enc in self.encoders.items()], dim=-1))

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """obs {part: `[N, ...]`} -> policy parameters `[N, P]`, values `[N]` (`[N, K]`)."""
        x = self.features(obs)
        values = self.value(x)
        return self.policy(x), values.squeeze(-1) if values.shape[-1] == 1 else values

    def policy_logits(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.policy(self.features(obs))


def build(
    observation_space: gym.Space, action_spec: ActionSpec, config, *, features: int = 64
) -> DictEncoderNet:
    """The network for a Dict observation space (`config`: the run's impala Config)."""
    if not isinstance(observation_space, gym.spaces.Dict):
        raise ValueError(f"needs a Dict observation space, got {observation_space}")
    return DictEncoderNet(observation_space, action_spec, features, config.num_tasks)
