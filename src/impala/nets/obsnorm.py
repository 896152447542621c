"""Observation normalisation: running mean and variance of vector observations.

Inputs of very different scales (MountainCar's velocity is a hundredth of its position; MiniGrid's
codes run to 10; LunarLander's leg contacts are 0/1 beside unbounded speeds) slow a tanh network
down or saturate it. `ObsNorm` feeds the network `clip((x - mean) / sqrt(var + eps), -c, c)`
per observation dimension, as Stable-Baselines3's VecNormalize does for its vector tasks, with the
statistics of every observation the learner has learned from, merged batch by batch (Chan et
al.'s parallel form of Welford's algorithm):

    n' = n + m        mean' = mean + (mean_b - mean) m / n'
    var' = (var n + var_b m + (mean_b - mean)^2 n m / n') / n'

The statistics are parameters that take no gradient, so explorers get the learner's with the
weights from the parameter store (acting and learning see the same inputs) and checkpoints keep
them. They are updated from each batch before the learner's forward pass; a replayed unroll counts
again each time it is drawn.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-8


class ObsNorm(nn.Module):
    """`[N, D] -> [N, D]` float: observations standardised by running statistics.

    `part`: the part of a Dict or Tuple observation it standardises (its name, see
    `impala.envs.spaces`); None for a lone space's whole observation. The learner updates each
    ObsNorm of a network from that part of every batch, flattened to `[..., D]`."""

    def __init__(self, dim: int, clip: float = 5.0, part: str | None = None) -> None:
        super().__init__()
        if clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.clip = clip
        self.part = part or None
        self.mean = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.var = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.count = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        scaled = (obs.float() - self.mean.detach()) / torch.sqrt(self.var.detach() + EPS)
        return scaled.clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        """Merges the batch `obs` (`[..., D]`) into the statistics."""
        batch = obs.detach().reshape(-1, self.mean.shape[0]).to(self.mean.device, torch.float64)
        m = batch.shape[0]
        if m == 0:
            return
        mean_b = batch.mean(0)
        var_b = batch.var(0, unbiased=False)
        n = self.count.double()
        total = n + m
        delta = mean_b - self.mean.double()
        mean = self.mean.double() + delta * m / total
        var = (self.var.double() * n + var_b * m + delta**2 * n * m / total) / total
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.copy_(total)
