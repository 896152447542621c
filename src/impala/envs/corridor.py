"""The short corridor with switched actions (Sutton & Barto, 2nd ed., Example 13.1, Fig. 13.1).

The seed prototype's environment. States 0, 1, 2 and the goal G (3); the agent starts in 0.
Actions: 0 = left, 1 = right. In states 0 and 2 they move as named (left in state 0 stays in 0);
in state 1 they are switched (right moves to 0, left moves to 2). Every step gives reward -1,
except the step that reaches G, which gives +1 and terminates the episode. The observation is
always the constant 1.0: the agent is blind, so the best policy is stochastic and moves right with
probability about 0.59 in every state (2 - sqrt(2) = 0.586 without discounting).

With `render_mode="rgb_array"`, `render()` draws the corridor (for `impala eval --video`): the four
cells left to right, the switched state tinted, the goal green, the agent a dark square.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

LEFT, RIGHT = 0, 1
GOAL = 3

_CELL = 48  # pixels; the picture is one row of cells, 48 x 192
_CELL_COLOURS = np.array([[225, 225, 225], [245, 215, 160], [225, 225, 225], [120, 200, 120]])
_LINE_COLOUR = (90, 90, 90)
_AGENT_COLOUR = (40, 60, 140)


class ShortCorridorEnv(gym.Env[np.ndarray, int]):
    """The blind short corridor; observation `[1.0]` (float32, shape (1,)), actions {0, 1}."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(1.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._obs = np.ones(1, dtype=np.float32)
        self.state = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.state = 0
        return self._obs.copy(), {"state": self.state}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if action not in (LEFT, RIGHT):
            raise ValueError(f"action must be 0 (left) or 1 (right), got {action!r}")
        move = 1 if action == RIGHT else -1
        if self.state == 1:  # the switched state
            move = -move
        self.state = max(0, self.state + move)
        terminated = self.state == GOAL
        reward = 1.0 if terminated else -1.0
        return self._obs.copy(), reward, terminated, False, {"state": self.state}

    def render(self) -> np.ndarray | None:
        """The corridor as an RGB picture `[48, 192, 3]` uint8 (None unless `render_mode` is
        'rgb_array')."""
        if self.render_mode != "rgb_array":
            return None
        c = _CELL
        frame = np.repeat(_CELL_COLOURS.astype(np.uint8), c, axis=0)[None].repeat(c, axis=0)
        frame[:, ::c] = frame[:, c - 1 :: c] = _LINE_COLOUR  # the cells' walls
        frame[[0, -1]] = _LINE_COLOUR
        m, x = c // 4, self.state * c
        frame[m : c - m, x + m : x + c - m] = _AGENT_COLOUR
        return frame


def optimal_right_probability(gamma: float = 1.0, grid: int = 9_801) -> float:
    """The right-probability p that maximises the start state's value, found on a grid.

    Solves the 3-state linear Bellman system for each p (no time limit). Used by tests and docs.
    """
    best_p, best_v = 0.5, -np.inf
    for p in np.linspace(0.01, 0.99, grid):
        q = 1.0 - p
        # v0 = -1 + g(p v1 + q v0); v1 = -1 + g(p v0 + q v2); v2 = p*1 + q(-1 + g v1)
        a = np.array(
            [
                [1 - gamma * q, -gamma * p, 0.0],
                [-gamma * p, 1.0, -gamma * q],
                [0.0, -gamma * q, 1.0],
            ]
        )
        b = np.array([-1.0, -1.0, p - q])
        v0 = np.linalg.solve(a, b)[0]
        if v0 > best_v:
            best_p, best_v = float(p), float(v0)
    return best_p
