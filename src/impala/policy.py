"""A trained policy to act with in your own loop: `impala.load_policy(RUN_DIR_OR_CHECKPOINT)`.

    policy = impala.load_policy("runs/cartpole")
    env = policy.make_env()                      # the environment as the run trained on it
    obs, info = env.reset(seed=0)
    state = None
    while True:
        action, state = policy.act(obs, state, greedy=True)
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break

The weights are those `impala eval` plays (a checkpoint file, or a run folder's newest checkpoint
that loads, else its model.pt), on the CPU unless asked otherwise. The network is the run's,
observation normalisation included (its statistics are part of the weights), and it acts as the
run's explorers did: `act` is also what `impala eval` plays with.

Observations become the network's input in one place, `observation_batch`, shared by `act` and
`impala eval`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from impala import checkpoint, distributions
from impala.config import Config
from impala.envs import EnvInfo, make_env, probe_env, spaces
from impala.errors import ConfigError

PathLike = str | os.PathLike[str]


# --- which weights -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Weights:
    """The config and weights to play, and where they came from (internal)."""

    config: Config
    state: dict[str, torch.Tensor]
    path: Path
    steps: int | None = None
    """Env steps of a checkpoint; None for a run's model.pt."""

    def describe(self) -> str:
        if self.steps is None:
            return f"{self.path} (saved at the end of the run)"
        return f"{self.path} ({self.steps:,} env steps)"


def _config(raw: Any, source: Path) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{source}' holds no config")
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in raw.items() if k in fields})


def load_run(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config and weights of a run folder's config.json and model.pt (ConfigError, one line,
    if they cannot be read)."""
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a run folder")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read '{path / 'config.json'}': {exc}") from None
    cfg = _config(raw, path / "config.json")
    try:
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"'{path}' holds no model.pt (the run saves it when it ends)") from None
    except Exception as exc:  # torch raises several types for a damaged file
        raise ConfigError(
            f"cannot load '{path / 'model.pt'}': {' '.join(str(exc).split())}"
        ) from None
    return cfg, state


def _from_checkpoint(path: Path, state: dict[str, Any]) -> Weights:
    steps = state["counters"].get("steps") if isinstance(state["counters"], dict) else None
    return Weights(
        _config(state["config"], path),
        state["model"],
        path,
        int(steps) if steps is not None else None,
    )


def load_weights(target: Path) -> Weights:
    """What `impala eval TARGET` plays: a checkpoint file; or a run folder's newest checkpoint
    that loads (damaged ones are skipped with a warning), else its model.pt and config.json.
    ConfigError, one line, if there is nothing to play."""
    target = Path(target)
    if target.is_file():
        if target.name == "model.pt" and (target.parent / "config.json").is_file():
            cfg, state = load_run(target.parent)  # a run's final weights, with their config
            return Weights(cfg, state, target)
        return _from_checkpoint(target, checkpoint.load(target))
    if not target.is_dir():
        raise ConfigError(f"'{target}' is not a run folder or a checkpoint file")
    if target.name == checkpoint.FOLDER and checkpoint.listed(target.parent):
        target = target.parent  # RUN_DIR/checkpoints itself
    if checkpoint.listed(target):
        found = checkpoint.latest(target)
        if found is not None:
            return _from_checkpoint(*found)
        if not (target / "model.pt").exists():
            raise ConfigError(
                f"run folder '{target}' holds no checkpoint that loads and no model.pt"
            )
    cfg, state = load_run(target)
    return Weights(cfg, state, target / "model.pt")


# --- observations in, actions out ----------------------------------------------------------
def observation_batch(observation: Any, env: EnvInfo) -> tuple[spaces.TensorObs, bool]:
    """Observations as the network takes them, and whether they came as a batch.

    Args:
        observation: one observation as the environment returns it (an array of the space's
            shape, or for a `Dict`/`Tuple` space a dict/tuple of parts), or a batch of them
            with a leading `N` axis on every part (a vector environment's); numpy arrays,
            tensors or nested lists.
        env: the environment the network was built for.

    Returns:
        The observations as the explorers hand them to the network (`impala.envs.spaces`): a
        tensor `[N, ...]` for a lone space, a dict of them by part name for a `Dict`/`Tuple`;
        images `[C, H, W]`, in the dtype the run stored them in (uint8 frames stay uint8; the
        network scales them); and True for a batch.

    Raises:
        ValueError: an observation of another shape.
    """
    spec = env.obs
    space = spec.space
    if not spec.structured:
        array = np.asarray(observation)
        shape = tuple(space.shape)
        if array.shape == shape:
            batched = False
            array = array[None]
        elif array.ndim == len(shape) + 1 and array.shape[1:] == shape:
            batched = True
        else:
            raise ValueError(
                f"an observation of shape {array.shape}: this policy takes one of shape {shape} "
                f"or a batch [{', '.join(map(str, ('N', *shape)))}]"
            )
        net = spec.to_network(np.ascontiguousarray(array, dtype=space.dtype))
        return spaces.as_tensors(net), batched
    # A Dict/Tuple: a batch has one more axis than the space on its first part.
    first_space, first_part = next(spaces.leaves_of(space, observation))
    extra = np.ndim(first_part) - len(first_space.shape)
    if extra not in (0, 1):
        raise ValueError(
            f"an observation whose first part has shape {np.shape(first_part)}: this policy "
            f"takes {spec.describe()}, one observation or a batch of them"
        )
    batched = extra == 1
    batch = observation if batched else spec.batch_of([observation])
    try:
        net = spec.to_network(batch)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"an observation that is not of {spec.describe()}: {exc}") from None
    typed = {p.name: np.asarray(net[p.name], dtype=p.dtype) for p in spec.parts}
    return spaces.as_tensors(typed), batched


@dataclasses.dataclass(frozen=True)
class PolicyState:
    """A recurrent policy's state between two `Policy.act` calls: pass it back as it came.

    Attributes:
        h: the LSTM's hidden state `[N, core_size]`.
        c: the LSTM's cell state `[N, core_size]`.
        prev_action: the actions of the last step `[N, *action_shape]` (the core's input at the
            next one, as in training).
    """

    h: torch.Tensor
    c: torch.Tensor
    prev_action: np.ndarray

    @property
    def batch_size(self) -> int:
        """The number of environments N the state is for."""
        return int(self.h.shape[0])


class Policy:
    """A trained network that acts: `action, state = policy.act(observation, state)`.

    Made by `impala.load_policy`. It acts as the run's explorers did: the same network and
    weights, observation normalisation included, and for an LSTM core the state carried from
    step to step with the last action and reward as inputs and reset at each episode's start.

    Attributes:
        config: the run's settings (`net` and `obs_norm` resolved for its environment).
        model: the network (a `torch.nn.Module` in eval mode, without gradients).
        source: the file the weights came from.
        steps: env steps the run had made at that checkpoint; None for a run's final model.pt.
        device: where the network computes.
        env_info: what the network was built for (observation shape and dtype, action spec);
            internal, may change.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: Config,
        env_info: EnvInfo,
        *,
        source: Path,
        steps: int | None = None,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> None:
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.config = config
        self.env_info = env_info
        self.source = source
        self.steps = steps
        self.action_spec: distributions.ActionSpec = model.action_spec
        self.rng = np.random.default_rng(seed)

    @property
    def is_recurrent(self) -> bool:
        """Whether the network has an LSTM core (its `act` needs the state it returned)."""
        return bool(getattr(self.model, "is_recurrent", False))

    @property
    def observation_shape(self) -> tuple[int, ...]:
        """The shape of one observation, as `act` takes it."""
        return tuple(self.env_info.obs_shape)

    def seed(self, seed: int | None) -> None:
        """Reseeds the sampling of actions (`act` without `greedy`)."""
        self.rng = np.random.default_rng(seed)

    def initial_state(self, batch_size: int = 1) -> PolicyState | None:
        """The state before the first step of `batch_size` episodes (what `state=None` means);
        None for a feed-forward network."""
        if not self.is_recurrent:
            return None
        h, c = self.model.initial_state(batch_size)
        dtype = np.float32 if self.action_spec.kind == "box" else np.int64
        prev_action = np.zeros((batch_size, *self.action_spec.action_shape), dtype=dtype)
        return PolicyState(h.to(self.device), c.to(self.device), prev_action)

    def make_env(self, render_mode: str | None = None) -> gym.Env:
        """A new environment of the run's id made as the run made it (for Atari the run's
        preprocessing: frame skip, 84x84 grey frames stacked, no-op starts; MinAtar's and
        MiniGrid's layouts), so that its observations are what `act` takes.

        Args:
            render_mode: Gymnasium's render mode, e.g. "rgb_array" or "human".

        Raises:
            ConfigError: for a multi-task run (make one of its tasks with `impala.envs.make_env`
                and wrap it in `impala.envs.factory.PadChannels` where its frames are smaller).
        """
        if self.env_info.tasks:
            raise ConfigError(
                f"{self.config.env} is a multi-task run: make one of its tasks with "
                "impala.envs.make_env"
            )
        return make_env(self.config.env, render_mode=render_mode, **self.config.env_options)

    @torch.inference_mode()
    def act(
        self,
        observation: Any,
        state: PolicyState | None = None,
        *,
        greedy: bool = False,
        reward: Any = None,
        episode_start: Any = None,
    ) -> tuple[Any, PolicyState | None]:
        """The action for an observation (or one per observation of a batch).

        Args:
            observation: one observation (the shape of the environment's), or a batch
                `[N, *shape]` from a vector environment.
            state: what the previous call returned; None at the start of an episode (of every
                episode of a batch). Feed-forward policies return None and ignore it.
            greedy: the most probable action (the mean of a Gaussian) instead of a sampled one.
            reward: recurrent policies: the reward the previous action earned (a number, or
                `[N]`), which the LSTM takes as an input as in training; 0 if not given.
            episode_start: recurrent policies: True (or a `[N]` mask) where `observation` is the
                first of a new episode, to reset the state there (a vector environment that
                reset some of its environments); `state=None` resets all.

        Returns:
            `(action, state)`: the action as the environment takes it (a Box's clipped to its
            bounds; `[N, ...]` for a batch), and the state to pass to the next call.

        Raises:
            ValueError: an observation of another shape, or a state of another batch size.
        """
        obs, batched = observation_batch(observation, self.env_info)
        obs = spaces.map_obs(lambda part: part.to(self.device), obs)
        if self.is_recurrent:
            params, state = self._recurrent_step(obs, state, reward, episode_start)
        else:
            params = self.model.policy_logits(obs).float().cpu().numpy()
        if greedy:
            actions = distributions.mode(self.action_spec, params)
        else:
            actions = distributions.sample(self.action_spec, params, self.rng)
        if state is not None:
            state = dataclasses.replace(state, prev_action=actions)
        env_actions = self.action_spec.to_env(actions)
        return (env_actions if batched else env_actions[0]), state

    def _recurrent_step(
        self, obs: spaces.TensorObs, state: PolicyState | None, reward: Any, episode_start: Any
    ) -> tuple[np.ndarray, PolicyState]:
        """One step of the LSTM core from `state` (the explorer's `_core_step`): the policy's
        parameters `[N, P]` and the state after it."""
        (n,) = spaces.lead_shape(obs, 1)
        if state is None:
            state, first = self.initial_state(n), np.ones(n, dtype=bool)
        else:
            if state.batch_size != n:
                raise ValueError(
                    f"a state for {state.batch_size} environment(s) with {n} observation(s)"
                )
            first = np.zeros(n, dtype=bool)
            if episode_start is not None:
                first = np.array(np.broadcast_to(np.asarray(episode_start, dtype=bool), (n,)))
        prev_reward = np.zeros(n, dtype=np.float32)
        if reward is not None:
            prev_reward = np.array(np.broadcast_to(np.asarray(reward, dtype=np.float32), (n,)))
            if self.config.reward_clip is not None:  # the explorers' learning reward
                clip = self.config.reward_clip
                prev_reward = np.clip(prev_reward, -clip, clip)
        logits, _, (h, c) = self.model.unroll(
            spaces.map_obs(lambda part: part[None], obs),
            torch.from_numpy(np.ascontiguousarray(state.prev_action))[None].to(self.device),
            torch.from_numpy(prev_reward)[None].to(self.device),
            torch.from_numpy(first)[None].to(self.device),
            (state.h, state.c),
        )
        return logits[0].float().cpu().numpy(), PolicyState(h, c, state.prev_action)


def _device(device: str | torch.device) -> torch.device:
    """`device` as a torch device; ConfigError, one line, for CUDA on a machine without it."""
    from impala.agent.learner import resolve_device

    if isinstance(device, str) and device in ("cpu", "cuda", "auto"):
        return resolve_device(device)
    return torch.device(device)


def load_policy(
    run_dir_or_checkpoint: PathLike,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> Policy:
    """The policy of a trained run, to act with in your own loop.

    Args:
        run_dir_or_checkpoint: a run folder (its newest checkpoint that loads, else its
            model.pt), a checkpoint file (`RUN_DIR/checkpoints/ckpt-<steps>.pt`) or a run's
            model.pt.
        device: where the network computes ("cpu", "cuda", "cuda:1"...); weights trained on a
            GPU load on a machine without one.
        seed: seed of the sampling of actions (`act` without `greedy`).

    Returns:
        The Policy.

    Raises:
        ConfigError: nothing to load there, a file that is not a checkpoint, or weights that do
            not fit their config.
    """
    from impala.agent.factory import build_model, settle
    from impala.nets.heads import check_value_outputs

    weights = load_weights(Path(run_dir_or_checkpoint))
    cfg = weights.config
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env, learner=False)
    model = build_model(cfg, env)
    check_value_outputs(weights.state, model, f"'{weights.path}'")
    try:
        model.load_state_dict(weights.state)
    except (RuntimeError, TypeError) as exc:  # TypeError: no state dict at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"the weights in '{weights.path}' do not fit its config: {first}"
        ) from None
    return Policy(
        model, cfg, env, source=weights.path, steps=weights.steps, device=device, seed=seed
    )
