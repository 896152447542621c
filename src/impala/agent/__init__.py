"""The roles: explorers act and emit unrolls, learners update pi and publish versioned weights.

Nothing here knows about processes: the runtimes in `impala.runtime` wire the roles together
in one process, across local processes through shared memory, or across hosts.
"""

from impala.agent.buffer import (
    ReplayBuffer,
    ReplayRate,
    ReplayStaging,
    rollout_spec,
    slots_to_batch,
)
from impala.agent.explorer import Explorer, UnrollInfo
from impala.agent.learner import Learner
from impala.agent.params import ParameterStore

__all__ = [
    "Explorer",
    "Learner",
    "ParameterStore",
    "ReplayBuffer",
    "ReplayRate",
    "ReplayStaging",
    "UnrollInfo",
    "rollout_spec",
    "slots_to_batch",
]
