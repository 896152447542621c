"""Partially observed tasks that need memory (for the recurrent core)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


def _positions(obs: np.ndarray) -> np.ndarray:
    return obs[[0, 2]]


def cartpole_no_velocity(**kwargs) -> gym.Env:
    """CartPole-v1 observing the cart position and the pole angle only: their velocities must be
    inferred from consecutive observations, which a feed-forward policy cannot do."""
    env = gym.make("CartPole-v1", **kwargs).unwrapped  # the registration adds its time limit
    space = env.observation_space
    positions = gym.spaces.Box(space.low[[0, 2]], space.high[[0, 2]], dtype=np.float32)
    return gym.wrappers.TransformObservation(env, _positions, positions)
