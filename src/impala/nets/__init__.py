"""Policy-value networks: observations `[N, *obs_shape]` (a dict of such by part name for Dict
and Tuple spaces, see `impala.envs.spaces`) in, `(logits [N, A], values [N])` out; recurrent ones
(`is_recurrent`) unroll over time from a state (`impala.nets.recurrent`)."""

from impala.nets.factory import NET_NAMES, build_net, resolve_net, resolve_obs_norm
from impala.nets.heads import PolicyValueNet, constrain_parameters
from impala.nets.mlp import MLPNet, SeedNet
from impala.nets.recurrent import RecurrentNet

__all__ = [
    "NET_NAMES",
    "MLPNet",
    "PolicyValueNet",
    "RecurrentNet",
    "SeedNet",
    "build_net",
    "constrain_parameters",
    "resolve_net",
    "resolve_obs_norm",
]
