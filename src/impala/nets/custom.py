"""Your own networks: `--net package.module:build`, or a name registered with `register_net`.

A custom network is named by a reference (`impala.refs`): every process that needs the network
(the learner, each explorer process, Ray actors, the job form's tasks, `impala eval`, loading a
checkpoint) imports the module and calls `build(observation_space, action_spec, config,
**net_kwargs)` itself, so all of them build the same network. `register_net("name", build)`
records the reference of `build` under a name for this Python process; a run settles the name
into its reference before anything is started or written (`config.json` holds the reference),
so spawned processes and later readers need no registry. What `build` must return is the
contract of `impala.nets.contract`, checked when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
from torch import nn

from impala import refs
from impala.distributions import ActionSpec
from impala.errors import ConfigError
from impala.nets.contract import check_network

# name -> reference of its build function; this process's registrations (see register_net)
_REGISTERED: dict[str, str] = {}


def register_net(name: str, build: Callable[..., nn.Module] | str) -> str:
    """Registers `build` (a function or class at the top level of an importable module, or its
    reference `"package.module:attr"`) as network `name`, for `Config(net=name)` in this
    process; returns the reference. Registering a name again replaces it. ConfigError, one line,
    for a name that is no identifier or a built-in's, or a `build` that
    other processes could not import (a lambda, a nested function, a script's object)."""
    from impala.nets.factory import NET_NAMES

    if not isinstance(name, str) or not name.isidentifier() or name in NET_NAMES:
        raise ConfigError(
            f"register_net: {name!r} cannot be a network's name (a Python identifier, none of "
            f"{', '.join(NET_NAMES)})"
        )
    what = f"network '{name}'"
    reference = build if isinstance(build, str) else refs.reference_to(build, what)
    _check_build(refs.resolve(reference, what), what)
    _REGISTERED[name] = reference
    return reference


def registered_nets() -> dict[str, str]:
    """This process's registered names and their references (a copy)."""
    return dict(_REGISTERED)


def is_custom(net: str) -> bool:
    """Whether `net` names a custom network: a reference, or a name registered here."""
    return refs.is_reference(net) or net in _REGISTERED


def reference_of(net: str) -> str:
    """The reference of a custom network (a registered name's, or the reference itself)."""
    return _REGISTERED.get(net, net)


def _check_build(build: Any, what: str) -> None:
    if not callable(build):
        raise ConfigError(
            f"{what}: it names a {type(build).__name__}, not a function build(observation_space, "
            "action_spec, config) -> torch.nn.Module"
        )


def resolve_builder(net: str) -> Callable[..., nn.Module]:
    """The build function of custom network `net`, imported (ConfigError, one line, if it cannot
    be: a missing module or attribute, or no callable)."""
    what = f"network '{net}'"
    build = refs.resolve(reference_of(net), what)
    _check_build(build, what)
    return build


def build_custom_net(
    net: str,
    observation_space: gym.Space,
    action_spec: ActionSpec,
    config: Any,
    *,
    net_kwargs: dict[str, Any] | None = None,
    num_tasks: int = 1,
    core_size: int | None = None,
    popart: bool = False,
) -> nn.Module:
    """Custom network `net` built for a run (`config`, its Config) and checked against the
    contract (`impala.nets.contract.check_network`). ConfigError, one line, if `build` raises
    or returns something that breaks the contract."""
    what = f"network '{net}'"
    build = resolve_builder(net)
    try:
        model = build(observation_space, action_spec, config, **(net_kwargs or {}))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code, reported in one line
        text = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{what}: build raised {type(exc).__name__}: {text}") from None
    check_network(
        model,
        observation_space,
        action_spec,
        num_tasks=num_tasks,
        core_size=core_size,
        popart=popart,
        where=what,
    )
    return model


def observation_space_of(env: Any) -> gym.Space:
    """The observation space a network of environment `env` (an `impala.envs.EnvInfo`)
    receives (`impala.envs.spaces`): images `[C, H, W]` (Gymnasium's `[H, W, C]` pixels
    transposed), a multi-task run's padded frames, and for a `Dict`/`Tuple` a flat `Dict` keyed
    by part name (nested names joined with ".")."""
    return env.obs.network_space()
