"""Building Gymnasium environments by id, with the checks that give users a clear error."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import re
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv

from impala import refs
from impala.distributions import ActionSpec
from impala.envs import atari, minatar, minigrid, spaces
from impala.envs.atari import AtariProtocol
from impala.envs.custom import factory_of, make_factory_env
from impala.errors import ConfigError

CORRIDOR_ID = "ShortCorridor-v0"
CARTPOLE_NO_VELOCITY_ID = "CartPoleNoVelocity-v1"


def register_envs() -> None:
    """Registers the project's environments with Gymnasium (idempotent): the short corridor and
    CartPole with its velocities hidden (a memory task)."""
    if CORRIDOR_ID not in gym.registry:
        gym.register(id=CORRIDOR_ID, entry_point="impala.envs.corridor:ShortCorridorEnv")
    if CARTPOLE_NO_VELOCITY_ID not in gym.registry:
        gym.register(
            id=CARTPOLE_NO_VELOCITY_ID,
            entry_point="impala.envs.masked:cartpole_no_velocity",
            max_episode_steps=500,
        )


@dataclasses.dataclass(frozen=True)
class EnvInfo:
    """What the networks and the rollout storage need to know about an environment."""

    env_id: str
    obs_shape: tuple[int, ...]
    """The environment's observations' shape (a Box's; `()` for Dict and Tuple spaces)."""
    obs_dtype: np.dtype
    action: ActionSpec
    max_episode_steps: int | None
    family: str = "gymnasium"
    """'atari' (the paper's protocol applies), 'minatar' or 'gymnasium'."""
    tasks: tuple[str, ...] = ()
    """A multi-task run's ids (`--env A,B,...`; empty for one task): explorer i plays task
    i % len(tasks), observations padded to one shape (`obs_shape`)."""
    observation_space: gym.Space | None = dataclasses.field(default=None, compare=False, repr=False)
    """The environment's observation space (of the first task in a multi-task run)."""

    @functools.cached_property
    def obs(self) -> spaces.ObsSpec:
        """The observations as parts (`impala.envs.spaces`): what the networks receive and the
        rollout storage holds. A Box's comes from `obs_shape` and `obs_dtype` (a multi-task
        run's padded frames)."""
        space = self.observation_space
        if space is None or isinstance(space, gym.spaces.Box):
            space = _box_of(space, self.obs_shape, self.obs_dtype)
        return spaces.describe(space, self.env_id)

    @property
    def num_tasks(self) -> int:
        return max(1, len(self.tasks))

    def task_id(self, explorer: int) -> str:
        """The id explorer `explorer` plays."""
        return self.tasks[explorer % len(self.tasks)] if self.tasks else self.env_id

    @property
    def is_image(self) -> bool:
        """Observations that are one image, `[C, H, W]` or `[H, W, C]` (`impala.envs.spaces`)."""
        return not self.obs.structured and self.obs.parts[0].is_image

    @property
    def padded_shape(self) -> tuple[int, ...] | None:
        """A multi-task run's `[C, H, W]` frame shape, to which each task's frames are padded
        (`PadChannels`); None where nothing is padded."""
        if self.tasks and self.is_image and not self.obs.parts[0].channels_last:
            return self.obs_shape
        return None

    @property
    def num_actions(self) -> int:
        """The number of actions of a Discrete action space."""
        return self.action.num_actions


def _box_of(space: gym.Space | None, shape: tuple[int, ...], dtype: np.dtype) -> gym.spaces.Box:
    """`space` if it is a Box of `shape`, else a Box of `shape` and `dtype` with its bounds
    (those of the dtype without one)."""
    if isinstance(space, gym.spaces.Box) and tuple(space.shape) == tuple(shape):
        return space
    dtype = np.dtype(dtype)
    if isinstance(space, gym.spaces.Box) and space.dtype == dtype:
        low, high = np.min(space.low), np.max(space.high)
    elif dtype == np.bool_:
        low, high = 0, 1
    elif np.issubdtype(dtype, np.integer):
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    else:
        low, high = -np.inf, np.inf
    return gym.spaces.Box(low, high, tuple(shape), dtype)


def action_spec(space: gym.Space) -> ActionSpec | None:
    """The ActionSpec of a Gymnasium action space, or None for a space no policy here takes
    (Discrete, MultiDiscrete with one axis, and Box with one axis are taken)."""
    if isinstance(space, gym.spaces.Discrete):
        if space.start != 0:
            return None
        return ActionSpec.discrete(int(space.n))
    if isinstance(space, gym.spaces.MultiDiscrete):
        if space.nvec.ndim != 1 or np.any(space.start != 0):
            return None
        return ActionSpec("multi_discrete", tuple(int(n) for n in space.nvec))
    if isinstance(space, gym.spaces.Box):
        if len(space.shape) != 1 or not np.issubdtype(space.dtype, np.floating):
            return None
        low, high = (tuple(float(x) for x in bound) for bound in (space.low, space.high))
        return ActionSpec("box", low=low, high=high)
    return None


def _spec_of(env_id: str) -> tuple[str, gym.envs.registration.EnvSpec]:
    """The registered id and spec for `env_id` (`module:EnvId` imports the module first); the
    Atari and MinAtar ids are registered on demand, with the install line when their extra is
    missing."""
    register_envs()
    name = _import_registering_module(env_id)
    if name not in gym.registry:
        if atari.looks_like_atari(name) and not atari.register():
            raise ConfigError(
                f"'{name}' is an Atari game and ale-py is not installed: {atari.ATARI_EXTRA}"
            )
        if minatar.looks_like_minatar(name) and not minatar.register():
            raise ConfigError(
                f"'{name}' is a MinAtar game and MinAtar is not installed: {minatar.MINATAR_EXTRA}"
            )
        if minigrid.looks_like_minigrid(name) and not minigrid.register():
            raise ConfigError(
                f"'{name}' is a MiniGrid task and MiniGrid is not installed: "
                f"{minigrid.MINIGRID_EXTRA}"
            )
        if name not in gym.registry:
            atari.register()  # other ale-py ids (Pong-v4, ...), when it is installed
    if name not in gym.registry:
        if refs.is_reference(env_id):  # module:attr, and no such callable attr
            raise ConfigError(
                f"module '{env_id.partition(':')[0]}' has no environment factory '{name}' (a "
                f"callable) and registers no environment id '{name}'"
            )
        close = difflib.get_close_matches(name, list(gym.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown environment id '{name}'{hint}")
    return name, gym.spec(name)


def env_family(env_id: str) -> str:
    """'atari', 'minatar' or 'gymnasium' for a registered id ('gymnasium' for a factory)."""
    if factory_of(env_id) is not None:
        return "gymnasium"
    _, spec = _spec_of(env_id)
    if atari.atari_game(spec) is not None:
        return "atari"
    return "minatar" if minatar.is_minatar(spec) else "gymnasium"


def make_env(
    env_id: str,
    *,
    max_episode_steps: int | None = None,
    atari_protocol: AtariProtocol | None = None,
    render_mode: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> gym.Env:
    """Makes one environment; `max_episode_steps` (the seed's `-m`) overrides its time limit.

    `env_id` may be an environment factory `package.module:make_env`, called with `env_kwargs`,
    or `module:EnvId` (as in Gymnasium): the module, which registers the id, is imported first,
    here and in every explorer process (see `impala.envs.custom` for how the two are told
    apart). A registered id is made with `env_kwargs` too. Atari ids get `atari_protocol` (the
    paper's by default, see `impala.envs.atari`), MinAtar ids channel-first uint8 planes,
    MiniGrid ids one flat uint8 vector (`impala.envs.minigrid`).

    Raises ConfigError for an unknown id, a missing extra or ROM, an environment whose code
    cannot be imported, a factory that raises or returns no Env, an action space no policy
    takes (see `action_spec`) or a non-Box observation.
    """
    factory = factory_of(env_id)
    if factory is not None:
        env = make_factory_env(
            env_id,
            factory,
            env_kwargs=env_kwargs,
            max_episode_steps=max_episode_steps,
            render_mode=render_mode,
        )
        _check_spaces(env_id, env)
        return env
    name, spec = _spec_of(env_id)
    game = atari.atari_game(spec)
    if game is not None:
        _no_atari_kwargs(env_id, env_kwargs)
        atari.check_rom(name, game)
        protocol = _with_frame_cap(atari_protocol or AtariProtocol(), max_episode_steps)
        env = atari.make_atari_env(name, protocol, render_mode=render_mode)
        _check_spaces(env_id, env)
        return env
    kwargs: dict = {**(env_kwargs or {}), "disable_env_checker": True}
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # old env versions: not our line
            env = gym.make(name, **kwargs)
    except gym.error.Error as exc:  # missing optional dependency, bad kwargs, ...
        raise ConfigError(f"cannot make environment '{env_id}': {_one_line(exc)}") from None
    except TypeError as exc:  # a keyword argument the environment does not take
        if not env_kwargs:
            raise
        raise ConfigError(
            f"cannot make environment '{env_id}' with --env-kwargs: {_one_line(exc)}"
        ) from None
    except ImportError as exc:  # the env's own code imports a package that is not installed
        raise ConfigError(_missing_module(env_id, spec, exc)) from None
    if minatar.is_minatar(spec):
        env = minatar.channels_first(env)
    elif minigrid.is_minigrid(spec):
        env = minigrid.flat_observations(env)
    _check_spaces(env_id, env)
    return env


def _no_atari_kwargs(env_id: str, env_kwargs: dict[str, Any] | None) -> None:
    if env_kwargs:
        raise ConfigError(
            f"--env-kwargs is not taken by Atari games ('{env_id}'): their settings are the "
            "Atari options (--sticky-actions, --full-action-space, --noop-max)"
        )


def _with_frame_cap(protocol: AtariProtocol, max_episode_steps: int | None) -> AtariProtocol:
    """An Atari episode cap given in agent steps becomes one in frames."""
    if max_episode_steps is None:
        return protocol
    return dataclasses.replace(
        protocol, max_frames_per_episode=max_episode_steps * protocol.frame_skip
    )


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
    if action_spec(env.action_space) is None:
        env.close()
        raise ConfigError(
            f"environment '{env_id}' has the action space {env.action_space}, which no policy "
            "here takes (supported: Discrete, MultiDiscrete and Box with one axis and starting "
            "at 0 where discrete; Tuple, Dict, MultiBinary, Text and image-shaped Box actions "
            "are not)"
        )
    try:
        spaces.describe(env.observation_space, env_id)  # Text, Graph, Sequence: one line
    except ConfigError:
        env.close()
        raise


def task_ids(env_id: str) -> tuple[str, ...]:
    """The ids of `--env A,B,...` (one for a single task)."""
    return tuple(part.strip() for part in env_id.split(","))


@functools.lru_cache(maxsize=64)
def action_kind(env_id: str, env_kwargs: str = "{}") -> str | None:
    """The kind of the action space of `env_id` (the first task's of `A,B,...`) made with
    `env_kwargs` (a JSON object): 'discrete', 'multi_discrete' or 'box'; None where the
    environment cannot be made here (the run says why when it makes it)."""
    try:
        return probe_env(task_ids(env_id)[0], env_kwargs=json.loads(env_kwargs)).action.kind
    except ConfigError:
        return None


def probe_env(
    env_id: str,
    *,
    max_episode_steps: int | None = None,
    atari_protocol: AtariProtocol | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> EnvInfo:
    """Makes the environment once to read its spaces, then closes it. For several ids
    (`A,B,...`, a multi-task run) the tasks' spaces are combined (`combine_tasks`)."""
    options: dict[str, Any] = dict(
        max_episode_steps=max_episode_steps, atari_protocol=atari_protocol, env_kwargs=env_kwargs
    )
    ids = task_ids(env_id)
    if len(ids) > 1:
        return combine_tasks(env_id, [probe_env(i, **options) for i in ids])
    env = make_env(env_id, **options)
    try:
        space = env.observation_space
        spec_steps = env.spec.max_episode_steps if env.spec is not None else None
        box = isinstance(space, gym.spaces.Box)
        return EnvInfo(
            env_id=env_id,
            obs_shape=tuple(space.shape) if box else (),
            obs_dtype=np.dtype(space.dtype) if box else np.dtype(object),
            action=action_spec(env.action_space),
            max_episode_steps=max_episode_steps if max_episode_steps is not None else spec_steps,
            family=env_family(env_id),
            observation_space=space,
        )
    finally:
        env.close()


def combine_tasks(env_id: str, infos: list[EnvInfo]) -> EnvInfo:
    """One EnvInfo for several tasks that one network plays: the same action space (MinAtar's
    `-v0` ids have the full set of 6 actions for every game), observations of one rank and type;
    images may differ in their number of channels (MinAtar's games have 4 to 10), and are padded
    with empty planes to the largest (`[C, H, W]` images; Dict and Tuple observations must be
    the same). ConfigError, one line, otherwise."""
    first = infos[0]
    # [C, H, W] frames may differ in their channels (padded with empty planes); nothing else may
    padded = first.is_image and not first.obs.parts[0].channels_last
    for info in infos[1:]:
        if info.action != first.action:
            raise ConfigError(
                f"the tasks of a multi-task run must share an action space: '{first.env_id}' has "
                f"{first.action.describe()}, '{info.env_id}' {info.action.describe()} (MinAtar's "
                "-v0 ids have the full action set)"
            )
        if padded:
            fits = (
                info.is_image
                and not info.obs.parts[0].channels_last
                and info.obs_dtype == first.obs_dtype
                and len(info.obs_shape) == len(first.obs_shape)
                and info.obs_shape[1:] == first.obs_shape[1:]
            )
        else:
            fits = info.obs == first.obs
        if not fits:
            raise ConfigError(
                f"the tasks of a multi-task run must have observations of one shape (images "
                f"[C, H, W] may differ in channels): '{first.env_id}' has "
                f"{first.obs.describe()}, '{info.env_id}' {info.obs.describe()}"
            )
    channels = max(info.obs_shape[0] for info in infos) if padded else None
    steps = [info.max_episode_steps for info in infos]
    return dataclasses.replace(
        first,
        env_id=env_id,
        obs_shape=(channels, *first.obs_shape[1:]) if channels else first.obs_shape,
        max_episode_steps=None if None in steps else max(steps),
        tasks=tuple(info.env_id for info in infos),
    )


class PadChannels(gym.ObservationWrapper):
    """Image observations `[C, H, W]` padded with empty planes to `channels` (a multi-task run's
    shared shape)."""

    def __init__(self, env: gym.Env, channels: int) -> None:
        super().__init__(env)
        space = env.observation_space
        self.extra = channels - space.shape[0]
        low = np.concatenate([space.low, np.zeros((self.extra, *space.shape[1:]), space.dtype)])
        high = np.concatenate([space.high, np.zeros((self.extra, *space.shape[1:]), space.dtype)])
        self.observation_space = gym.spaces.Box(low, high, dtype=space.dtype)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        pad = np.zeros((self.extra, *obs.shape[1:]), obs.dtype)
        return np.concatenate([obs, pad])


def make_vector_env(
    env_id: str,
    num_envs: int,
    *,
    max_episode_steps: int | None = None,
    atari_protocol: AtariProtocol | None = None,
    obs_shape: tuple[int, ...] | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> VectorEnv:
    """`num_envs` copies stepped together, reset in the same step that ends an episode.
    `obs_shape`: a multi-task run's image shape, to which this task's frames are padded.

    Same-step autoreset puts the last observation of a finished episode in
    `infos["final_obs"]`, which the explorer needs to bootstrap a truncated episode. Atari games
    run in ale-py's vector environment (see `impala.envs.atari`), others in Gymnasium's
    `SyncVectorEnv` (its `AsyncVectorEnv` gains nothing on 2 cores: explorers are processes).
    Environment factories (`package.module:make_env`) are called once per copy.
    """
    game = None
    if factory_of(env_id) is None:
        name, spec = _spec_of(env_id)
        game = atari.atari_game(spec)
    if game is not None:
        _no_atari_kwargs(env_id, env_kwargs)
        atari.check_rom(name, game)
        protocol = _with_frame_cap(atari_protocol or AtariProtocol(), max_episode_steps)
        return atari.make_atari_vector_env(game, num_envs, protocol)

    def make() -> gym.Env:
        env = make_env(env_id, max_episode_steps=max_episode_steps, env_kwargs=env_kwargs)
        if obs_shape is not None and tuple(env.observation_space.shape) != tuple(obs_shape):
            env = PadChannels(env, obs_shape[0])
        return env

    return SyncVectorEnv(
        [make for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
