"""Environments for tests of failure paths, registered when this module is imported (as
`impala train --env envs_for_tests:ID` does, with this folder on PYTHONPATH)."""

import multiprocessing

import gymnasium as gym
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class FailsInExplorers(CartPoleEnv):
    """CartPole in the process that starts the run; in an explorer process its construction
    fails as if a package were missing on that node."""

    def __init__(self, **kwargs):
        if multiprocessing.parent_process() is not None:
            import a_package_missing_on_this_node  # noqa: F401
        super().__init__(**kwargs)


class MatrixObservations(CartPoleEnv):
    """CartPole observed as a 2x2 matrix, a shape no network takes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observation_space = gym.spaces.Box(-10.0, 10.0, (2, 2), "float32")

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        return obs.reshape(2, 2), info

    def step(self, action):
        obs, *rest = super().step(action)
        return obs.reshape(2, 2), *rest


for env_id, entry_point in {
    "MatrixObservations-v0": "envs_for_tests:MatrixObservations",
    "FailsInExplorers-v0": "envs_for_tests:FailsInExplorers",
    # Its module imports a package that is not installed (as a MuJoCo env without imageio).
    "ImportFails-v0": "envs_for_tests_broken:BrokenEnv",
}.items():
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=entry_point)
