"""Encoders: one per part of an observation (`impala.envs.spaces`), their features joined.

As Stable-Baselines3's `MultiInputPolicy` and Sample Factory's encoders do for `Dict`
observations: image parts go through a convolutional torso each (`impala.nets.conv`); the other
parts are encoded as one float vector (`FlatEncoder`: Box vectors flattened and, with
`--obs-norm`, standardised each by its own statistics; discrete values one-hot; binary ones as
0/1) that goes through an MLP (`impala.nets.mlp.MLPTorso`); the features are concatenated and
mixed by a dense layer (`MultiInputTorso`), under the policy and value heads or the LSTM core.

Observations without images (a `Discrete` space, a `Tuple` of them, a `Dict` of vectors) take
the MLP network (`impala.nets.mlp.MLPNet`) over `FlatEncoder`'s vector, so an MLP over a
one-hot `Discrete` observation is what a `Box` of that one-hot vector would get.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from impala.envs.spaces import ObsSpec, Part, TensorObs, part_of
from impala.nets.conv import ImageTorso
from impala.nets.mlp import MLPTorso
from impala.nets.obsnorm import ObsNorm

MERGED_FEATURES = 256  # the width of the dense layer over a multi-input torso's joined features


class OneHot(nn.Module):
    """Discrete values `[N, *shape]` (each entry i in `[starts[i], starts[i] + sizes[i])`) ->
    their one-hot codes side by side, `[N, sum(sizes)]` float32."""

    def __init__(self, sizes: Sequence[int], starts: Sequence[int]) -> None:
        super().__init__()
        self.width = int(sum(sizes))
        offsets = torch.cumsum(torch.tensor([0, *sizes[:-1]], dtype=torch.int64), 0)
        # not saved: they follow from the space (and stay out of the flat weight vector)
        self.register_buffer("shift", offsets - torch.tensor(starts), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        index = values.reshape(values.shape[0], -1).long() + self.shift
        out = torch.zeros(values.shape[0], self.width, device=values.device)
        return out.scatter_(1, index, 1.0)


class Flat(nn.Module):
    """Any array part `[N, ...]` -> `[N, D]` float32 (binary values, small rank-3 Boxes),
    standardised by `obs_norm` if given (a Box vector part with `--obs-norm`)."""

    def __init__(self, obs_norm: ObsNorm | None = None) -> None:
        super().__init__()
        self.obs_norm = obs_norm

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        flat = values.reshape(values.shape[0], -1)
        return flat.float() if self.obs_norm is None else self.obs_norm(flat)


def part_encoder(part: Part, obs_norm: bool = False) -> nn.Module:
    """The encoder of a part that is not an image: `[N, *shape] -> [N, part.flat_size]`."""
    if part.kind == "discrete":
        return OneHot(part.sizes, part.starts)
    if part.kind == "image":
        raise ValueError(f"image part '{part.name}' needs a convolutional torso")
    norm = ObsNorm(part.flat_size, part=part.name) if obs_norm and part.kind == "vector" else None
    return Flat(norm)


class FlatEncoder(nn.Module):
    """The parts `parts` (none an image) of an observation -> one float vector `[N, D]`, D =
    `num_features`: each part by its `part_encoder`, in order, concatenated."""

    def __init__(self, parts: Sequence[Part], obs_norm: bool = False) -> None:
        super().__init__()
        self.names = [p.name for p in parts]
        self.parts = nn.ModuleList(part_encoder(p, obs_norm) for p in parts)
        self.num_features = sum(p.flat_size for p in parts)

    def forward(self, obs: TensorObs) -> torch.Tensor:
        features = [enc(part_of(obs, n)) for n, enc in zip(self.names, self.parts, strict=True)]
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)


ImageTorsoMaker = Callable[..., ImageTorso]


class MultiInputTorso(nn.Module):
    """A Dict or Tuple observation with images -> features `[N, num_features]`: each image part
    through its own torso (`make_image_torso(shape, input_scale=...)`), the other parts through
    `FlatEncoder` and an MLP of `num_layers` x `num_hidden` tanh units, all features
    concatenated, then a dense layer of `num_features` ReLU units (so that the heads and the
    core see the parts together)."""

    def __init__(
        self,
        spec: ObsSpec,
        make_image_torso: ImageTorsoMaker,
        *,
        num_hidden: int = 64,
        num_layers: int = 2,
        obs_norm: bool = False,
        num_features: int = MERGED_FEATURES,
    ) -> None:
        super().__init__()
        self.image_names = [p.name for p in spec.images]
        self.images = nn.ModuleList(
            make_image_torso(p.shape, input_scale=p.scale) for p in spec.images
        )
        width = sum(torso.num_features for torso in self.images)
        self.vectors: MLPTorso | None = None
        if spec.others:
            flat = FlatEncoder(spec.others, obs_norm)
            self.vectors = MLPTorso(
                flat.num_features, num_hidden=num_hidden, num_layers=num_layers, encoder=flat
            )
            width += self.vectors.num_features
        self.merge = nn.Sequential(nn.Linear(width, num_features), nn.ReLU())
        self.num_features = num_features

    def forward(self, obs: TensorObs) -> torch.Tensor:
        """obs (a dict by part name, each `[N, *shape]`) -> features `[N, num_features]`."""
        features = [
            torso(part_of(obs, name))
            for name, torso in zip(self.image_names, self.images, strict=True)
        ]
        if self.vectors is not None:
            features.append(self.vectors(obs))
        return self.merge(torch.cat([f.float() for f in features], dim=-1))
