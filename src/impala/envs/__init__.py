"""Environments: the seed's short corridor and factories for Gymnasium environments."""

from impala.envs.corridor import ShortCorridorEnv, optimal_right_probability
from impala.envs.factory import CORRIDOR_ID, EnvInfo, make_env, make_vector_env, probe_env

__all__ = [
    "CORRIDOR_ID",
    "EnvInfo",
    "ShortCorridorEnv",
    "make_env",
    "make_vector_env",
    "optimal_right_probability",
    "probe_env",
]
