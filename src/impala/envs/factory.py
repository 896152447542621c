"""Building Gymnasium environments by id, with the checks that give users a clear error."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import warnings

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from impala.errors import ConfigError

CORRIDOR_ID = "ShortCorridor-v0"


def register_envs() -> None:
    """Registers the short corridor with Gymnasium (idempotent, like `ale_py`'s registration)."""
    if CORRIDOR_ID not in gym.registry:
        gym.register(id=CORRIDOR_ID, entry_point="impala.envs.corridor:ShortCorridorEnv")


@dataclasses.dataclass(frozen=True)
class EnvInfo:
    """What the networks and the rollout storage need to know about an environment."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    max_episode_steps: int | None


def make_env(env_id: str, *, max_episode_steps: int | None = None) -> gym.Env:
    """Makes one environment; `max_episode_steps` (the seed's `-m`) overrides its time limit.

    `env_id` may be `module:EnvId` (as in Gymnasium): the module, which registers the id, is
    imported first, here and in every explorer process.

    Raises ConfigError for an unknown id, an environment whose code cannot be imported, a
    non-discrete action space or a non-vector observation.
    """
    register_envs()
    name = _import_registering_module(env_id)
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown environment id '{name}'{hint}")
    kwargs = {"disable_env_checker": True}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # old env versions: not our line
            env = gym.make(name, **kwargs)
    except gym.error.Error as exc:  # missing optional dependency, bad kwargs, ...
        raise ConfigError(f"cannot make environment '{env_id}': {_one_line(exc)}") from None
    except ImportError as exc:  # the env's own code imports a package that is not installed
        raise ConfigError(_missing_module(env_id, gym.spec(name), exc)) from None
    _check_spaces(env_id, env)
    return env


def _import_registering_module(env_id: str) -> str:
    """For `module:EnvId`, imports the module (which registers the id); returns the id."""
    module, sep, name = env_id.partition(":")
    if not sep:
        return env_id
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module '{module}' for environment '{env_id}': {_one_line(exc)}"
        ) from None
    return name


def _missing_module(env_id: str, spec: gym.envs.registration.EnvSpec, exc: ImportError) -> str:
    missing = exc.name or _one_line(exc)
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    family = re.match(r"gymnasium\.envs\.(\w+)\.", entry)
    if family:  # Gymnasium's own environments come with an extra per family
        install = f'pip install "gymnasium[{family.group(1).replace("_", "-")}]"'
    else:
        install = f"install the package that provides '{missing.split('.')[0]}'"
    return f"cannot make environment '{env_id}': module '{missing}' is not installed ({install})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_spaces(env_id: str, env: gym.Env) -> None:
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise ConfigError(
            f"environment '{env_id}' has a {type(env.action_space).__name__} action space; "
            "only discrete actions are supported"
        )
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise ConfigError(
            f"environment '{env_id}' has a {type(env.observation_space).__name__} observation "
            "space; only Box observations are supported"
        )


def probe_env(env_id: str, *, max_episode_steps: int | None = None) -> EnvInfo:
    """Makes the environment once to read its spaces, then closes it."""
    env = make_env(env_id, max_episode_steps=max_episode_steps)
    try:
        space = env.observation_space
        spec_steps = env.spec.max_episode_steps if env.spec is not None else None
        return EnvInfo(
            env_id=env_id,
            obs_shape=tuple(space.shape),
            obs_dtype=np.dtype(space.dtype),
            num_actions=int(env.action_space.n),
            max_episode_steps=max_episode_steps if max_episode_steps is not None else spec_steps,
        )
    finally:
        env.close()


def make_vector_env(
    env_id: str, num_envs: int, *, max_episode_steps: int | None = None
) -> SyncVectorEnv:
    """`num_envs` copies stepped together, reset in the same step that ends an episode.

    Same-step autoreset puts the last observation of a finished episode in
    `infos["final_obs"]`, which the explorer needs to bootstrap a truncated episode.
    """
    return SyncVectorEnv(
        [lambda: make_env(env_id, max_episode_steps=max_episode_steps) for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
