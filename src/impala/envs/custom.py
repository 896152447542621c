"""Your own environments: `--env package.module:make_env`, a factory called in every process.

`--env` takes three forms, told apart in this order (deterministically, the same in every
process):

1. `package.module:attr` where the module imports and `attr` names a callable (a function or a
   `gymnasium.Env` class): an **environment factory**, called as `attr(**env_kwargs)` (and with
   `render_mode="rgb_array"` when `impala eval --video` records) and expected to return a
   `gymnasium.Env`;
2. `module:EnvId` otherwise: the module is imported (it registers `EnvId` with Gymnasium) and
   `EnvId` is made by `gymnasium.make` (Gymnasium's own convention);
3. a registered id (`CartPole-v1`, `ALE/Pong-v5`, ...).

The factory is named by its reference (`impala.refs`), never passed as an object: the learner's
probe, every explorer process of every runtime, Ray actors, the job form's tasks and `impala
eval` each import and call it themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

from impala import refs
from impala.errors import ConfigError


def factory_of(env_id: str) -> Callable[..., Any] | None:
    """The environment factory `env_id` names (form 1 of the module doc), or None for an id
    (forms 2 and 3). ConfigError, one line, for a module that cannot be imported."""
    parts = refs.split(env_id)
    if parts is None:
        return None
    module_name, attr = parts
    module = refs.import_module(module_name, f"environment '{env_id}'")
    found = refs.lookup(module, attr)
    return found if callable(found) else None


def make_factory_env(
    env_id: str,
    factory: Callable[..., Any],
    *,
    env_kwargs: dict[str, Any] | None = None,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
) -> gym.Env:
    """`factory(**env_kwargs)` (with `render_mode` if given), checked to be a `gymnasium.Env`,
    its episodes cut at `max_episode_steps` if given (Gymnasium's TimeLimit). ConfigError, one
    line, if the factory raises or returns anything else."""
    kwargs = dict(env_kwargs or {})
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code, reported in one line
        text = " ".join(str(exc).split())[:300]
        hint = ""
        if isinstance(exc, TypeError) and render_mode is not None and "render_mode" in text:
            hint = " (--video calls it with render_mode='rgb_array': accept that keyword)"
        raise ConfigError(
            f"environment factory '{env_id}' raised {type(exc).__name__}: {text}{hint}"
        ) from None
    if not isinstance(env, gym.Env):
        raise ConfigError(
            f"environment factory '{env_id}' returned a {type(env).__name__}, not a gymnasium.Env"
        )
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps)
    return env
