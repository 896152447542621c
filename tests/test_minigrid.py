"""MiniGrid tasks of the defaults' benchmark: one flat uint8 vector per observation (the egocentric
view, then the mission), sparse rewards reported unchanged (test_defaults.py trains the fallback
on one)."""

from __future__ import annotations

import numpy as np
import pytest

from impala.envs import make_env, make_vector_env, probe_env

pytest.importorskip("minigrid")

EMPTY = "MiniGrid-Empty-Random-5x5-v0"


def test_observations_are_the_view_and_the_mission_as_one_uint8_vector():
    info = probe_env("MiniGrid-DoorKey-5x5-v0")
    assert info.obs_dtype == np.uint8 and len(info.obs_shape) == 1 and info.num_actions == 7
    env = make_env("MiniGrid-DoorKey-5x5-v0")
    obs, _ = env.reset(seed=3)
    view = env.unwrapped.gen_obs()["image"]  # [7, 7, 3]: object, colour, state per cell
    np.testing.assert_array_equal(obs[: view.size], view.flatten())
    assert obs[view.size :].any()  # the mission's characters, one-hot
    env.close()


def test_the_sparse_reward_comes_through_unchanged():
    """Walking to the goal of the empty room: the only reward is 1 - 0.9 * steps / max_steps."""
    env = make_env(EMPTY)
    for seed in range(50):
        env.reset(seed=seed)
        grid = env.unwrapped
        rewards, done = [], False
        while not done:
            # Turn until facing a free cell towards the goal (bottom right), then step.
            fwd = grid.front_pos
            cell = grid.grid.get(*fwd)
            good = (cell is None or cell.can_overlap()) and (
                fwd[0] > grid.agent_pos[0] or fwd[1] > grid.agent_pos[1]
            )
            _, reward, terminated, truncated, _ = env.step(2 if good else 1)
            rewards.append(reward)
            done = terminated or truncated
        if terminated:
            steps = len(rewards)
            assert rewards[-1] == pytest.approx(1 - 0.9 * steps / grid.max_steps)
            assert sum(rewards[:-1]) == 0
            break
    else:
        pytest.fail("never reached the goal")
    env.close()
    vec = make_vector_env(EMPTY, 2)
    assert vec.observation_space.dtype == np.uint8
    vec.close()
