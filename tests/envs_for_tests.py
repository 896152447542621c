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


for env_id, entry_point in {
    "FailsInExplorers-v0": "envs_for_tests:FailsInExplorers",
    # Its module imports a package that is not installed (as a MuJoCo env without imageio).
    "ImportFails-v0": "envs_for_tests_broken:BrokenEnv",
}.items():
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=entry_point)
