"""The only learner loop. Every runtime hands it a `BatchSource`; the loop does not know whether
explorers are in this process, in local processes, Ray actors or tasks on other hosts.

    batch = source.next_batch(timeout)      # None: nothing ready yet
    count the unrolls that arrived meanwhile, restart dead explorers (or fail)
    agree with the other learners on stopping and on updating (synchronous learners only)
    learner.learn(batch), log (one update, or APPO's passes)

It ends when the source is exhausted (every explorer made its steps and all was learned from), at
the time limit or target return, or at a stop request (SIGINT/SIGTERM); the caller's `finally`
closes the source and saves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch

from impala.agent.explorer import UnrollInfo
from impala.agent.learner import Learner
from impala.metrics import Tracker

Batch = dict[str, torch.Tensor]
POLL_SECONDS = 0.05  # the longest the loop waits for a batch before looking around


class BatchSource(Protocol):
    """What a runtime provides. Sources are built without starting anything; `start()` starts
    their processes, and `close()` stops everything they started (safe to call twice and after a
    partial start)."""

    def start(self) -> None: ...

    def next_batch(self, timeout: float) -> Batch | None:
        """A whole batch, or None if none is ready within `timeout` seconds."""

    def poll(self) -> list[UnrollInfo]:
        """Unrolls made since the last call (steps and finished episodes, for the tracker)."""

    def check(self) -> None:
        """Restarts dead explorers within the restart budget; raises RunFailed otherwise."""

    def exhausted(self) -> bool:
        """Every explorer has made its steps and everything they sent has been learned from."""

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Decision:
    stop: bool
    update: bool
    steps: int  # env steps of the whole run so far (all learners), for the schedules


class Alone:
    """A single learner decides by itself."""

    def decide(self, stop: bool, have_batch: bool, steps: int) -> Decision:
        return Decision(stop=stop, update=have_batch and not stop, steps=steps)


class Consensus(Protocol):
    """Synchronous learners agree each turn: stop if any wants to, update only if all have a
    batch (each applies the same averaged gradient), and count steps over all of them."""

    def decide(self, stop: bool, have_batch: bool, steps: int) -> Decision: ...


def learn(
    learner: Learner,
    source: BatchSource,
    tracker: Tracker,
    consensus: Consensus | None = None,
    *,
    after_update: Callable[[], None] | None = None,
) -> None:
    """Updates `learner` from `source` until the run ends (see the module docstring)."""
    consensus = consensus or Alone()
    tracker.counters = getattr(source, "counters", tracker.counters)
    batch: Batch | None = None
    while True:
        if batch is None:
            batch = source.next_batch(POLL_SECONDS)
        for info in source.poll():
            tracker.on_unroll(info)
        stop = tracker.should_stop()
        if not stop:  # no restarts once stopping (a SIGTERM may reach the explorers too)
            source.check()
        stop = stop or (batch is None and source.exhausted())
        decision = consensus.decide(stop, batch is not None, tracker.steps)
        if decision.stop and batch is not None and isinstance(consensus, Alone):
            # The batch in hand is learned from before stopping: nothing collected is lost, and
            # a run stopped and resumed makes the same updates as one that went on.
            _learn_from(learner, tracker, batch, decision.steps)
            batch = None
        if decision.stop:
            if not tracker.stop_reason:
                exhausted = source.exhausted()
                tracker.stop_reason = "step budget" if exhausted else "another learner stopped"
            return
        if not decision.update:
            continue  # synchronous learners: another one has no batch yet; keep ours
        _learn_from(learner, tracker, batch, decision.steps)
        batch = None
        tracker.maybe_log()
        if after_update is not None:
            after_update()  # periodic checkpoints: between updates, nothing half-done


def _learn_from(learner: Learner, tracker: Tracker, batch: Batch, steps: int) -> None:
    for metrics in learner.learn(batch, steps):
        tracker.on_update(metrics)
