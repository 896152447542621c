"""An example environment factory: `impala train --env impala.examples.envs:make_cartpole
--env-kwargs '{"pole_length": 0.8, "noise": 0.05}'`.

A factory is any function (or `gymnasium.Env` class) at the top level of an importable module
that takes keyword arguments and returns a `gymnasium.Env`; every process of a run calls it
itself. It should accept `render_mode` (`impala eval --video` passes "rgb_array").
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class NoisyObservations(gym.ObservationWrapper):
    """Gaussian noise of standard deviation `noise` on every observation, drawn from the
    environment's own generator (seeded by `reset(seed=...)`)."""

    def __init__(self, env: gym.Env, noise: float) -> None:
        super().__init__(env)
        self.noise = noise

    def observation(self, observation: np.ndarray) -> np.ndarray:
        jitter = self.unwrapped.np_random.normal(0.0, self.noise, observation.shape)
        return (observation + jitter).astype(observation.dtype)


def make_cartpole(
    pole_length: float = 0.5, noise: float = 0.0, render_mode: str | None = None
) -> gym.Env:
    """CartPole-v1 with a pole of half-length `pole_length` (Gymnasium's 0.5) and observations
    blurred by Gaussian noise of standard deviation `noise`."""
    if pole_length <= 0 or noise < 0:
        raise ValueError(
            f"pole_length must be positive and noise not negative, got {pole_length}, {noise}"
        )
    env = gym.make("CartPole-v1", render_mode=render_mode)
    cartpole = env.unwrapped
    cartpole.length = pole_length
    cartpole.polemass_length = cartpole.masspole * pole_length
    return NoisyObservations(env, noise) if noise > 0 else env
