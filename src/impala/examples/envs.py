"""Example environments: a factory, `impala train --env impala.examples.envs:make_cartpole
--env-kwargs '{"pole_length": 0.8, "noise": 0.05}'`, and `CueCorridor`, an environment class with
a `Dict` observation (an image part and a vector part).

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


class CueCorridor(gym.Env):
    """A corridor of `2 * half_length + 1` cells whose rewarding end is shown only in a picture:
    a `Dict` observation of an image part and a vector part, which a network must read both of
    (`impala.examples.dict_encoder` encodes each).

    - "frame": uint8 `[size, size, 3]` (Gymnasium's `[H, W, C]`), the left or the right half lit
      in red: the cue, drawn at random each episode;
    - "position": float32 `[1]`, the agent's cell scaled to [-1, 1].

    Actions: Discrete(2), 0 left, 1 right. Reaching the cued end gives +1, the other end -1, and
    ends the episode; each step costs `step_cost`; episodes are cut after `max_steps`. A policy
    that ignores the frame averages about 0; one that reads it about 1 - half_length *
    step_cost.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        half_length: int = 3,
        size: int = 8,
        step_cost: float = 0.01,
        max_steps: int = 30,
        render_mode: str | None = None,
    ) -> None:
        if half_length < 1 or size < 2 or max_steps < 1:
            raise ValueError("half_length, size and max_steps must be at least 1, 2 and 1")
        self.half_length, self.size = half_length, size
        self.step_cost, self.max_steps = step_cost, max_steps
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Dict(
            {
                "frame": gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
                "position": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
            }
        )
        self.action_space = gym.spaces.Discrete(2)
        self.cue, self.position, self.steps = 1, 0, 0

    def _observation(self) -> dict[str, np.ndarray]:
        frame = np.zeros((self.size, self.size, 3), np.uint8)
        half = self.size // 2
        if self.cue > 0:
            frame[:, half:, 0] = 255
        else:
            frame[:, :half, 0] = 255
        position = np.array([self.position / self.half_length], np.float32)
        return {"frame": frame, "position": position}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.cue = 1 if self.np_random.integers(2) else -1
        self.position, self.steps = 0, 0
        return self._observation(), {}

    def step(self, action):
        self.position += 1 if int(action) == 1 else -1
        self.steps += 1
        reward, terminated = -self.step_cost, False
        if abs(self.position) == self.half_length:
            terminated = True
            reward += 1.0 if np.sign(self.position) == self.cue else -1.0
        truncated = not terminated and self.steps >= self.max_steps
        return self._observation(), reward, terminated, truncated, {}

    def render(self) -> np.ndarray:
        """The cue frame with the agent's cell marked in green along the bottom row."""
        frame = self._observation()["frame"].copy()
        cells = 2 * self.half_length + 1
        column = (self.position + self.half_length) * (self.size - 1) // (cells - 1)
        frame[-1, column, 1] = 255
        return frame
