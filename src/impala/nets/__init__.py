"""Policy-value networks: observations `[N, *obs_shape]` in, `(logits [N, A], values [N])` out."""

from impala.nets.factory import build_net
from impala.nets.mlp import MLPNet, SeedNet

__all__ = ["MLPNet", "SeedNet", "build_net"]
