"""The global buffer as the learner sees it: one implementation of its rules for every runtime.

A runtime's transport moves unrolls from explorers to here (stepped inline, through shared
memory, as Ray messages, through a hub) and knows when its explorers are done; `Experience` holds
what arrived and decides, the same way everywhere:

- **batches.** FIFO (the paper's queue): the oldest `slots_per_batch` whole unrolls, each learned
  from once; the last batch may be partial, once the explorers are done. Replay (the seed's
  buffer): `learn_batch_size` time steps sampled at random while the learner is owed some, the
  rate limit (`ReplayRate`) being `replay_ratio` sampled steps per env step made.
- **backpressure** (`accepts`): explorers may deliver more while fewer than two FIFO batches
  wait, or while the learner is less than a buffer's worth behind the replay rate (or has
  nothing it could sample).
- **the end** (`exhausted`): the explorers are done and nothing is owed: the FIFO queue is empty;
  the replay's debt is paid (or nothing is left that could be sampled). The learner pays its
  replay debt after the last env step, so a run makes `ratio * steps / learn_batch_size`
  updates on every runtime.

`made` (env steps the explorers made so far) and `done` (every explorer made its share) are the
transport's to say, and are passed in.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from impala.agent.buffer import ReplayBuffer, ReplayRate, unrolls_to_batch
from impala.config import Config

Batch = dict[str, torch.Tensor]


class UnrollQueue(Protocol):
    """Whole unrolls in arrival order (the FIFO buffer)."""

    def __len__(self) -> int:
        """Unrolls waiting."""

    def take(self, n: int) -> Batch | None:
        """The `n` oldest unrolls (fewer if fewer wait) as one learner batch, removed from the
        queue; None if none of them was whole (see the local runtime's torn-unroll check)."""


class ListQueue:
    """Unrolls that arrived as arrays (messages from other processes or hosts, or an inline
    explorer's copies), kept in a list."""

    def __init__(self, algo: str) -> None:
        self.algo = algo
        self._unrolls: list[dict[str, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._unrolls)

    def put(self, unroll: dict[str, np.ndarray]) -> None:
        self._unrolls.append(unroll)

    def take(self, n: int) -> Batch | None:
        taken, self._unrolls = self._unrolls[:n], self._unrolls[n:]
        return unrolls_to_batch(taken, self.algo) if taken else None


class Experience:
    """What explorers made, as the learner takes it: a FIFO `queue` or the seed's `replay`
    buffer (exactly one of the two), with the rules of the module doc. `generator` draws the
    replay's samples."""

    def __init__(
        self,
        cfg: Config,
        *,
        queue: UnrollQueue | None = None,
        replay: ReplayBuffer | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if (queue is None) == (replay is None):
            raise ValueError("an Experience holds a FIFO queue or a replay buffer, not both")
        self.cfg = cfg
        self.queue = queue
        self.replay = replay
        self.rate = ReplayRate(cfg.replay_ratio, cfg.replay_slack)
        self.generator = generator if generator is not None else torch.Generator()

    @property
    def sampled(self) -> int:
        """Time steps sampled from the replay buffer so far."""
        return self.rate.sampled

    def owed(self, made: int) -> float:
        """Replay: time steps the learner may still sample for the `made` env steps so far."""
        return self.rate.ratio * made - self.rate.sampled

    def next_batch(self, made: int, done: bool) -> Batch | None:
        """A batch if one is due (see the module doc), else None."""
        cfg = self.cfg
        if self.replay is not None:
            return self.rate.sample(
                self.replay, made, cfg.learn_batch_size, cfg.algo, self.generator
            )
        waiting = len(self.queue)
        if waiting >= cfg.slots_per_batch or (waiting and done):
            return self.queue.take(cfg.slots_per_batch)
        return None

    def accepts(self, made: int) -> bool:
        """Whether explorers may deliver more now (backpressure; see the module doc)."""
        if self.replay is not None:
            return self.replay.num_readable() == 0 or self.rate.explorers_may_act(made)
        return len(self.queue) < 2 * self.cfg.slots_per_batch

    def exhausted(self, made: int, done: bool) -> bool:
        """The explorers are `done` and every step they made has been learned from as the
        buffer's rule says."""
        if not done:
            return False
        if self.replay is not None:
            return self.owed(made) <= 0 or self.replay.num_readable() == 0
        return len(self.queue) == 0
