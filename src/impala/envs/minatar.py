"""MinAtar (Young & Tian 2019): 10x10 Atari-like games, the CPU-sized Atari.

The `minatar` package registers `MinAtar/Breakout-v1` and the other games with Gymnasium; its
observations are `[10, 10, C]` booleans, given to the networks channel-first as uint8 `[C, 10,
10]` through Gymnasium's `TransformObservation`. The games keep their own sticky actions (0.1).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

MINATAR_EXTRA = "pip install 'impala-rl[minatar]'"


def looks_like_minatar(env_id: str) -> bool:
    return env_id.startswith("MinAtar/")


def register() -> bool:
    """Registers MinAtar's ids with Gymnasium; False if MinAtar is not installed."""
    if "MinAtar/Breakout-v1" in gym.registry:
        return True
    try:
        import logging

        logging.getLogger().disabled = True  # its import logs about seaborn, which it does not need
        try:
            import minatar.gym
        finally:
            logging.getLogger().disabled = False
    except ImportError:
        return False
    minatar.gym.register_envs()
    return True


def is_minatar(spec: gym.envs.registration.EnvSpec) -> bool:
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    return entry.startswith("minatar.")


def _to_channels_first(obs: np.ndarray) -> np.ndarray:
    # transpose with explicit axes: np.moveaxis's argument handling was most of this wrapper's
    # cost (8 Breakout games stepped together: 8.0 -> 5.2 us a game, one core)
    return np.ascontiguousarray(obs.transpose(2, 0, 1), dtype=np.uint8)


def channels_first(env: gym.Env) -> gym.Env:
    h, w, c = env.observation_space.shape
    space = gym.spaces.Box(0, 1, (c, h, w), np.uint8)
    return gym.wrappers.TransformObservation(env, _to_channels_first, space)
