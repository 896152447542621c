"""Choosing a network by name (or by the observation's type) for an environment."""

from __future__ import annotations

import math

from torch import nn

from impala.envs import EnvInfo
from impala.errors import ConfigError
from impala.nets.conv import deep_torso, minatar_torso, shallow_torso
from impala.nets.custom import is_custom, reference_of
from impala.nets.encoders import FlatEncoder, MultiInputTorso
from impala.nets.heads import PolicyValueNet
from impala.nets.mlp import MLPNet, MLPTorso, SeedNet
from impala.nets.recurrent import RecurrentNet

NET_NAMES = ("auto", "seed", "mlp", "shallow", "deep", "minatar")
IMAGE_NETS = ("shallow", "deep", "minatar")
VECTOR_NETS = ("seed", "mlp")
# Images at least this high and wide are Atari-sized (the shallow net's strides need 36).
ATARI_SIZED = 36


def resolve_net(name: str, env: EnvInfo) -> str:
    """The network 'auto' stands for, by the observation's parts (`impala.envs.spaces`): 'mlp'
    without images (vectors, discrete values, Dict and Tuple of them), else 'shallow' where every
    image is Atari-sized and 'minatar' where one is smaller (a Dict or Tuple with images gets
    that torso per image part, see `impala.nets.encoders`). Raises ConfigError for a network
    that does not take the environment's observations. A custom network (`--net module:build`,
    or a name registered with `impala.register_net`) resolves to its reference (it takes what
    its build function says; checked when built, see `impala.nets.contract`)."""
    if is_custom(name):
        return reference_of(name)
    spec = env.obs
    images = spec.images
    smallest = min((min(p.shape[1:]) for p in images), default=None)
    if name == "auto":
        if not images:
            return "mlp"
        return "shallow" if smallest >= ATARI_SIZED else "minatar"
    if name not in NET_NAMES:
        raise ConfigError(f"unknown network '{name}' (choose from {', '.join(NET_NAMES)})")
    if name in VECTOR_NETS and images:
        raise ConfigError(
            f"network '{name}' needs a flat vector observation (or parts without images); "
            f"'{env.env_id}' has images: {spec.describe()} (use --net {' or '.join(IMAGE_NETS)})"
        )
    single = spec.single
    if name == "seed" and not (single and single.kind == "vector" and len(single.shape) == 1):
        raise ConfigError(
            f"network 'seed' needs a flat vector observation; '{env.env_id}' has "
            f"{spec.describe()} (use --net mlp)"
        )
    if name in IMAGE_NETS and not images:
        raise ConfigError(
            f"network '{name}' needs image observations ([C, H, W] or [H, W, C]); "
            f"'{env.env_id}' has {spec.describe()} (use --net mlp)"
        )
    if name in ("shallow", "deep") and smallest < ATARI_SIZED:
        raise ConfigError(
            f"network '{name}' needs images of at least {ATARI_SIZED}x{ATARI_SIZED}; "
            f"'{env.env_id}' has {spec.describe()} (use --net minatar)"
        )
    return name


def resolve_obs_norm(obs_norm: str, net: str, env: EnvInfo | None = None) -> str:
    """'on' or 'off' for `--obs-norm` with the resolved network `net` for `env`: standardised are
    the Box vector parts of the observation (`impala.envs.spaces`: not images, not discrete
    values), each by its own statistics, in the built-in networks but the seed's. 'auto' is 'on'
    where there are such parts; ConfigError for 'on' where there are none. Without `env`, the
    MLP is taken to have them and the others not."""
    if env is None:
        takes = net == "mlp"
    else:
        takes = net in NET_NAMES and net != "seed" and bool(env.obs.vectors)
    if obs_norm == "on" and not takes:
        raise ConfigError(
            f"--obs-norm on standardises vector observations (Box parts that are not images) for "
            f"the built-in networks; '{net}' does not take it here (images and discrete values "
            "are not standardised; use --obs-norm auto or off)"
        )
    if obs_norm == "auto":
        return "on" if takes else "off"
    return obs_norm


def build_net(
    name: str,
    env: EnvInfo,
    *,
    num_hidden: int,
    num_layers: int = 2,
    core: str = "ff",
    core_size: int = 256,
    popart_beta: float | None = None,
    obs_norm: str = "off",
) -> nn.Module:
    """Network `name` (see NET_NAMES) for `env`, feed-forward (`core='ff'`) or with an LSTM
    core (`core='lstm'`), with a PopArt value head if `popart_beta` is given and standardised
    vector inputs with `obs_norm` 'on' or 'auto' (see `resolve_obs_norm`). Observations of
    several parts (Dict, Tuple) get an encoder per part (`impala.nets.encoders`)."""
    name = resolve_net(name, env)
    normalise = resolve_obs_norm(obs_norm, name, env) == "on"
    spec, single = env.obs, env.obs.single
    if name == "seed":
        if env.num_tasks > 1:
            raise ConfigError("a multi-task run needs a value output per task; use --net mlp")
        if env.action.kind != "discrete":
            raise ConfigError(
                f"the seed network has discrete actions only; '{env.env_id}' has "
                f"{env.action.describe()} actions (use --net mlp)"
            )
        if core != "ff":
            raise ConfigError("the seed network has no torso for an LSTM core; use --net mlp")
        if popart_beta is not None:
            raise ConfigError("--value-norm popart needs a value head; the seed network has none")
        return SeedNet(num_hidden, obs_dim=single.shape[0], num_actions=env.num_actions)
    if name == "mlp":
        # A flat vector as before; other parts (discrete, Dict, Tuple, other ranks) encoded as one
        encoder = None
        if not (single and single.kind == "vector" and len(single.shape) == 1):
            encoder = FlatEncoder(spec.parts, obs_norm=normalise)
        obs_dim = encoder.num_features if encoder is not None else math.prod(single.shape)
        if core == "ff":
            return MLPNet(
                obs_dim,
                env.action,
                num_hidden=num_hidden,
                num_layers=num_layers,
                popart_beta=popart_beta,
                obs_norm=normalise,
                num_tasks=env.num_tasks,
                encoder=encoder,
            )
        torso = MLPTorso(
            obs_dim,
            num_hidden=num_hidden,
            num_layers=num_layers,
            obs_norm=normalise,
            encoder=encoder,
        )
    else:
        make = {"shallow": shallow_torso, "deep": deep_torso, "minatar": minatar_torso}[name]
        if single is not None:  # one image, [C, H, W] as the network receives it
            torso = make(single.shape, input_scale=single.scale)
        else:
            torso = MultiInputTorso(
                spec, make, num_hidden=num_hidden, num_layers=num_layers, obs_norm=normalise
            )
    if core == "lstm":
        return RecurrentNet(
            torso,
            env.action,
            core_size=core_size,
            popart_beta=popart_beta,
            num_tasks=env.num_tasks,
        )
    return PolicyValueNet(torso, env.action, popart_beta=popart_beta, num_tasks=env.num_tasks)
