"""Choosing a network by name (or by the observation's type) for an environment."""

from __future__ import annotations

import math

from torch import nn

from impala.envs import EnvInfo
from impala.errors import ConfigError
from impala.nets.conv import deep_torso, minatar_torso, shallow_torso
from impala.nets.custom import is_custom, reference_of
from impala.nets.heads import PolicyValueNet
from impala.nets.mlp import MLPNet, MLPTorso, SeedNet
from impala.nets.recurrent import RecurrentNet

NET_NAMES = ("auto", "seed", "mlp", "shallow", "deep", "minatar")
IMAGE_NETS = ("shallow", "deep", "minatar")
VECTOR_NETS = ("seed", "mlp")
# Images at least this high and wide are Atari-sized (the shallow net's strides need 36).
ATARI_SIZED = 36


def resolve_net(name: str, env: EnvInfo) -> str:
    """The network 'auto' stands for: 'mlp' for vectors, 'shallow' for Atari-sized images
    `[C, H, W]`, 'minatar' for small ones; a custom network's reference (a registered name's,
    see `impala.nets.custom`). Raises ConfigError for observations no network takes and for a
    network that does not take the environment's."""
    if is_custom(name):  # it takes what its build function says (checked when built)
        return reference_of(name)
    rank = len(env.obs_shape)
    if rank not in (1, 3):
        raise ConfigError(
            f"'{env.env_id}' has observations of shape {env.obs_shape}, which no network takes "
            "(vectors [N] go to 'mlp', images [C, H, W] to 'shallow', 'deep' or 'minatar')"
        )
    if name == "auto":
        if rank == 1:
            return "mlp"
        return "shallow" if min(env.obs_shape[1:]) >= ATARI_SIZED else "minatar"
    if name in VECTOR_NETS and rank != 1:
        raise ConfigError(
            f"network '{name}' needs a flat vector observation; '{env.env_id}' has images of "
            f"shape {env.obs_shape} (use --net {' or '.join(IMAGE_NETS)})"
        )
    if name in IMAGE_NETS and rank != 3:
        raise ConfigError(
            f"network '{name}' needs image observations [C, H, W]; '{env.env_id}' has shape "
            f"{env.obs_shape} (use --net mlp)"
        )
    if name in ("shallow", "deep") and min(env.obs_shape[1:]) < ATARI_SIZED:
        raise ConfigError(
            f"network '{name}' needs images of at least {ATARI_SIZED}x{ATARI_SIZED}; "
            f"'{env.env_id}' has {env.obs_shape[1]}x{env.obs_shape[2]} (use --net minatar)"
        )
    if name not in NET_NAMES:
        raise ConfigError(f"unknown network '{name}' (choose from {', '.join(NET_NAMES)})")
    return name


def resolve_obs_norm(obs_norm: str, net: str) -> str:
    """'on' or 'off' for `--obs-norm` with the resolved network `net`: 'auto' is 'on' for the
    MLP (vector observations), 'off' for the others. ConfigError for 'on' with another network."""
    if obs_norm == "on" and net != "mlp":
        raise ConfigError(
            f"--obs-norm on standardises vector observations for the mlp network; '{net}' "
            "does not take it (images are not standardised; use --obs-norm auto or off)"
        )
    if obs_norm == "auto":
        return "on" if net == "mlp" else "off"
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
    inputs with `obs_norm` 'on' (the MLP only) or 'auto' (where the network is the MLP)."""
    name = resolve_net(name, env)
    normalise = resolve_obs_norm(obs_norm, name) == "on"
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
        return SeedNet(num_hidden, obs_dim=env.obs_shape[0], num_actions=env.num_actions)
    if name == "mlp":
        obs_dim = math.prod(env.obs_shape)
        if core == "ff":
            return MLPNet(
                obs_dim,
                env.action,
                num_hidden=num_hidden,
                num_layers=num_layers,
                popart_beta=popart_beta,
                obs_norm=normalise,
                num_tasks=env.num_tasks,
            )
        torso = MLPTorso(obs_dim, num_hidden=num_hidden, num_layers=num_layers, obs_norm=normalise)
    else:
        make = {"shallow": shallow_torso, "deep": deep_torso, "minatar": minatar_torso}[name]
        torso = make(env.obs_shape)
    if core == "lstm":
        return RecurrentNet(
            torso,
            env.action,
            core_size=core_size,
            popart_beta=popart_beta,
            num_tasks=env.num_tasks,
        )
    return PolicyValueNet(torso, env.action, popart_beta=popart_beta, num_tasks=env.num_tasks)
