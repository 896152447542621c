"""What every runtime builds the same way: the learner, explorers, budgets, failure reports."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import signal
import sys
import traceback

import torch

from impala.agent import Learner, ParameterStore
from impala.agent.factory import build_explorer, build_model
from impala.config import Config
from impala.envs import EnvInfo
from impala.errors import one_line

__all__ = [
    "ExplorerFailure",
    "build_explorer",
    "build_learner",
    "build_model",
    "describe_exit",
    "explorer_budget",
    "keep_freed_memory",
    "seed_everything",
]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the largest glibc takes on 64-bit systems
TRIM_THRESHOLD_BYTES = 2**30


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep the memory this process frees for its next allocations, where by
    default it hands blocks over 128 KiB back to the kernel (or trims its heap) and takes them
    again as fresh pages, each page a fault and a zeroing. A learner frees and allocates the same
    large tensors every update: in a Pong bench the learner process took 42,000 page faults a
    second. Blocks up to 32 MiB then come from the heap and freed memory stays with the process
    (its peak is what it holds; a Pong bench's memory stays flat). For the learner's process;
    returns whether the C library took the settings (glibc on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def build_learner(cfg: Config, env: EnvInfo, *, shared: bool = False) -> Learner:
    """The learner with a fresh, seeded network and its parameter store (in shared memory if
    asked, for explorer processes to read)."""
    seed_everything(cfg.seed)
    model = build_model(cfg, env)
    flat, version, layout = ParameterStore.allocate(model)
    if shared:
        flat.share_memory_()
        version.share_memory_()
    return Learner(cfg, model, ParameterStore(flat, version, layout))


def explorer_budget(cfg: Config, num_explorers: int | None = None, done: int = 0) -> int:
    """Env steps each explorer makes (what is left of the run's total after `done` steps, split
    evenly, rounded up)."""
    n = cfg.num_explorers if num_explorers is None else num_explorers
    total = cfg.total_steps if cfg.total_steps is not None else cfg.steps_per_explorer * n
    return max(0, math.ceil((total - done) / n))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


@dataclasses.dataclass
class ExplorerFailure:
    """What an explorer sends instead of an unroll when an exception stops it: the error on one
    line (printed by the learner) and the traceback (kept in the run folder)."""

    line: str
    trace: str

    @classmethod
    def of(cls, exc: BaseException) -> ExplorerFailure:
        """The failure `exc` makes (called where it was caught: the traceback is the current)."""
        return cls(one_line(exc), traceback.format_exc())


def report_and_exit(conn, exc: BaseException) -> None:
    """A child process's end on an error: `exc` sent to the learner through `conn` (if it still
    listens), then exit code 1, quietly: the learner prints the error in one line."""
    try:
        conn.send(ExplorerFailure.of(exc))
    except OSError:
        pass
    sys.exit(1)


def describe_exit(code: int | None) -> str:
    """A process's end in words: 'killed by SIGKILL', 'exited with code 1'."""
    if code is None:
        return "died"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
