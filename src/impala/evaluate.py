"""`impala eval`: whole episodes with a trained policy, and the statistics of their returns.

The agent plays as it was trained, through the same explorer code: the same environment
protocol (for Atari whole games, unclipped scores, with the training's no-op starts and sticky
actions), the recurrent state carried and reset as in training. Each of the environments stepped
together plays a fixed share of the episodes, so short episodes are not over-represented.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from impala.agent.explorer import Explorer
from impala.agent.factory import build_model, settle
from impala.agent.params import ParameterStore
from impala.config import Config, resolve
from impala.envs import make_vector_env, probe_env
from impala.errors import ConfigError

MAX_PARALLEL_ENVS = 8


def load_run(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config and weights of a run folder (ConfigError, one line, if they cannot be read)."""
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a run folder")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read '{path / 'config.json'}': {exc}") from None
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = resolve({k: v for k, v in raw.items() if k in fields})
    try:
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"'{path}' holds no model.pt (the run saves it when it ends)") from None
    except Exception as exc:  # torch raises several types for a damaged file
        raise ConfigError(
            f"cannot load '{path / 'model.pt'}': {' '.join(str(exc).split())}"
        ) from None
    return cfg, state


def evaluate(
    path: Path,
    *,
    episodes: int = 10,
    greedy: bool = False,
    seed: int = 0,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Plays `episodes` whole episodes with the run's policy; prints and returns the statistics
    of their unclipped returns."""
    if episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {episodes}")
    out = out if out is not None else sys.stdout
    cfg, state = load_run(path)
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env, learner=False)
    model = build_model(cfg, env)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.pt in '{path}' does not fit its config.json: {str(exc).splitlines()[0]}"
        ) from None
    model.requires_grad_(False)
    num_envs = min(episodes, MAX_PARALLEL_ENVS)
    quota = [episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)]
    store = ParameterStore(*ParameterStore.allocate(model))
    vec_env = make_vector_env(cfg.env, num_envs, **cfg.env_options)
    explorer = Explorer(
        0,
        vec_env,
        model,
        store,
        unroll_length=1,
        gamma=cfg.gamma,
        seed=seed,
        reward_clip=cfg.reward_clip,
        episodic_life=cfg.episodic_life,
        greedy=greedy,
    )
    returns: list[float] = []
    lengths: list[int] = []
    try:
        with torch.inference_mode():
            while any(quota):
                for ret, length, i in explorer.play():
                    if quota[i]:
                        quota[i] -= 1
                        returns.append(ret)
                        lengths.append(length)
    finally:
        vec_env.close()
    r = np.asarray(returns)
    figures = dict(
        env=cfg.env,
        episodes=episodes,
        greedy=greedy,
        return_mean=float(r.mean()),
        return_std=float(r.std()),
        return_min=float(r.min()),
        return_max=float(r.max()),
        length_mean=float(np.mean(lengths)),
    )
    how = "greedy actions" if greedy else "actions sampled from pi"
    protocol = ""
    if env.family == "atari":
        p = cfg.atari_protocol
        protocol = (
            f"; whole games, unclipped scores, up to {p.noop_max} no-op starts, sticky actions "
            f"{p.sticky_actions:g}, at most {p.max_frames_per_episode:,} frames"
        )
    print(
        f"{episodes} episodes of {cfg.env} ({how}{protocol}): return mean "
        f"{figures['return_mean']:.2f} +- {figures['return_std']:.2f} (std), min "
        f"{figures['return_min']:g}, max {figures['return_max']:g}; mean length "
        f"{figures['length_mean']:.0f} steps",
        file=out,
        flush=True,
    )
    return figures
