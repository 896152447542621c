"""Environments for tests of failure paths, registered when this module is imported (as
`impala train --env envs_for_tests:ID` does, with this folder on PYTHONPATH)."""

import multiprocessing
import os
import time

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class FailsInExplorers(CartPoleEnv):
    """CartPole in the process that starts the run; in an explorer process its construction
    fails as if a package were missing on that node."""

    def __init__(self, **kwargs):
        if multiprocessing.parent_process() is not None:
            import a_package_missing_on_this_node  # noqa: F401
        super().__init__(**kwargs)


class MatrixObservations(CartPoleEnv):
    """CartPole observed as a 2x2 matrix (a Box of rank 2: flattened into the MLP's inputs)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observation_space = gym.spaces.Box(-10.0, 10.0, (2, 2), "float32")

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        return obs.reshape(2, 2), info

    def step(self, action):
        obs, *rest = super().step(action)
        return obs.reshape(2, 2), *rest


class MultiBinaryActions(CartPoleEnv):
    """CartPole with a MultiBinary action space, which no policy here takes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.action_space = gym.spaces.MultiBinary(2)


class MatchDigits(gym.Env):
    """A MultiDiscrete task: each step shows two digits (in 0..2, one-hot, 6 floats) and the
    action names them (MultiDiscrete([3, 3])); one reward per digit named right, 10 steps an
    episode. A uniform policy earns 2/3 a step (6.7 an episode), the best 2 (20)."""

    observation_space = gym.spaces.Box(0.0, 1.0, (6,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 3])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def _observe(self):
        self.digits = self.np_random.integers(0, 3, size=2)
        obs = np.zeros(6, np.float32)
        obs[self.digits + np.array([0, 3])] = 1.0
        return obs

    def step(self, action):
        reward = float(np.sum(np.asarray(action) == self.digits))
        self.t += 1
        return self._observe(), reward, False, self.t >= 10, {}


class ReachPoint(gym.Env):
    """A continuous task: each step shows a point in [-1, 1]^2 and the action (Box(-2, 2, (2,)))
    should be twice it; reward minus the squared distance, 10 steps an episode. A policy that
    ignores the observation earns about -27 an episode, the best 0."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def _observe(self):
        self.point = self.np_random.uniform(-1, 1, size=2).astype(np.float32)
        return self.point.copy()

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, np.float32)), action
        reward = -float(np.sum((np.asarray(action) - 2 * self.point) ** 2))
        self.t += 1
        return self._observe(), reward, False, self.t >= 10, {}


class DictCues(gym.Env):
    """A Dict observation whose every part matters: a picture (uint8, `[H, W, C]` pixels), a
    vector and a Discrete mode. Each step shows fresh cues; the mode says which one to follow:
    mode 0, the picture (action 0 if its left half is lit, 1 if its right half), mode 1, the
    vector (action 0 if its first entry is negative, 1 if positive; it is at least 0.25 away
    from 0). One reward per right
    action, 10 steps an episode: a policy that ignores any part earns at most about 7.5 an
    episode (a uniform one 5), the best 10."""

    SIDE = 8
    observation_space = gym.spaces.Dict(
        {
            "picture": gym.spaces.Box(0, 255, (SIDE, SIDE, 3), np.uint8),
            "vector": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            "mode": gym.spaces.Discrete(2),
        }
    )
    action_space = gym.spaces.Discrete(2)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def _observe(self):
        self.mode = int(self.np_random.integers(2))
        lit = int(self.np_random.integers(2))  # the half of the picture that is lit
        picture = np.zeros((self.SIDE, self.SIDE, 3), np.uint8)
        half = self.SIDE // 2
        picture[:, lit * half : (lit + 1) * half, :] = 255
        vector = self.np_random.uniform(-1, 1, size=2).astype(np.float32)
        vector[0] = self.np_random.choice([-1, 1]) * self.np_random.uniform(0.25, 1)
        self.answer = lit if self.mode == 0 else int(vector[0] > 0)
        self.picture = picture
        return {"picture": picture, "vector": vector, "mode": self.mode}

    def step(self, action):
        reward = float(int(action) == self.answer)
        self.t += 1
        return self._observe(), reward, False, self.t >= 10, {}

    def render(self):
        """The picture, 8 times larger."""
        return np.repeat(np.repeat(self.picture, 8, 0), 8, 1)


class TextObservations(CartPoleEnv):
    """CartPole observed as a Text space, which no network takes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observation_space = gym.spaces.Text(8)


class HangsOnce(CartPoleEnv):
    """CartPole whose step() deadlocks (sleeps for ever) at its `IMPALA_TEST_HANG_AFTER`-th step,
    once per run: the first environment to create the file `IMPALA_TEST_HANG_MARKER` hangs,
    every later one (a replacement's) runs normally."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = 0
        self.after = int(os.environ.get("IMPALA_TEST_HANG_AFTER", "200"))

    def step(self, action):
        self.steps += 1
        if self.steps == self.after and _first_to(os.environ.get("IMPALA_TEST_HANG_MARKER")):
            while True:
                time.sleep(3600)
        return super().step(action)


class NanRewardAfter(CartPoleEnv):
    """CartPole whose rewards become NaN after 100 steps of an environment (a broken reward
    computation): the learner's loss goes NaN, and the run must stop there."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, float("nan") if self.steps > 100 else reward, terminated, truncated, info


def _first_to(marker):
    """Whether this process is the first to claim `marker` (a file created exclusively)."""
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


for env_id, entry_point in {
    "HangsOnce-v0": "envs_for_tests:HangsOnce",
    "NanRewardAfter-v0": "envs_for_tests:NanRewardAfter",
    "MultiBinaryActions-v0": "envs_for_tests:MultiBinaryActions",
    "MatchDigits-v0": "envs_for_tests:MatchDigits",
    "ReachPoint-v0": "envs_for_tests:ReachPoint",
    "MatrixObservations-v0": "envs_for_tests:MatrixObservations",
    "DictCues-v0": "envs_for_tests:DictCues",
    "TextObservations-v0": "envs_for_tests:TextObservations",
    "FailsInExplorers-v0": "envs_for_tests:FailsInExplorers",
    # Its module imports a package that is not installed (as a MuJoCo env without imageio).
    "ImportFails-v0": "envs_for_tests_broken:BrokenEnv",
}.items():
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=entry_point)
