"""The hub: one per learner task, a Ray actor that is that learner's inbox and weights board.

Explorer tasks put unrolls (or replay uploads) into a learner's hub and read its newest weights;
the learner drains the inbox and publishes weights there, so neither side waits on the other.
The hub also holds the job's description (host lists and the settings that must agree), checks
joining tasks against it, and counts explorers that join again after dying.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any


class Hub:
    """Thread-safe; run as a Ray actor with max_concurrency > 1 (drain waits while puts arrive)."""

    def __init__(self, learner_index: int, job: dict[str, Any], capacity: int) -> None:
        self.learner_index = learner_index
        self.job = job
        self.capacity = capacity
        self._inbox: deque = deque()
        self._cond = threading.Condition()
        self._weights: tuple[int, Any] | None = None
        self._done = False
        self._joined: set[int] = set()
        self._finished: set[int] = set()
        self._rejoins = 0
        self._events: list[str] = []
        self._rendezvous: str | None = None

    # --- joining -------------------------------------------------------------------------------
    def check(self, job: dict[str, Any]) -> str | None:
        """None if `job` matches this job, else a sentence naming what differs."""
        diffs = [k for k in sorted(set(self.job) | set(job)) if self.job.get(k) != job.get(k)]
        if not diffs:
            return None
        return "; ".join(
            f"{k}: {job.get(k)!r} here, {self.job.get(k)!r} at learner 0" for k in diffs
        )

    def join(self, explorer: int) -> int:
        """Registers an explorer; returns how many times explorers have rejoined."""
        with self._cond:
            if explorer in self._joined:
                self._rejoins += 1
                self._events.append(
                    f"explorer {explorer} rejoined (rejoins so far: {self._rejoins})"
                )
            self._joined.add(explorer)
            self._finished.discard(explorer)
            return self._rejoins

    # --- explorers' side -----------------------------------------------------------------------
    def put(self, payload: Any, info: Any) -> tuple[str, int]:
        """Queues an unroll; returns ('ok' | 'full' | 'done', newest weights version)."""
        with self._cond:
            version = self._weights[0] if self._weights else -1
            if self._done:
                return "done", version
            if len(self._inbox) >= self.capacity:
                return "full", version
            self._inbox.append((payload, info))
            self._cond.notify_all()
            return "ok", version

    def weights(self, have_version: int) -> tuple[int, Any] | None:
        with self._cond:
            if self._weights is None or self._weights[0] == have_version:
                return None
            return self._weights

    def explorer_finished(self, explorer: int) -> None:
        with self._cond:
            self._finished.add(explorer)
            self._cond.notify_all()

    # --- the learner's side --------------------------------------------------------------------
    def drain(self, max_items: int, timeout: float) -> tuple[list, list[str], int]:
        """Up to `max_items` queued messages (waits up to `timeout` for the first), the events
        since the last call, and how many explorers have finished their steps."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._inbox and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            items = [self._inbox.popleft() for _ in range(min(max_items, len(self._inbox)))]
            events, self._events = self._events, []
            return items, events, len(self._finished)

    def publish(self, version: int, flat: Any) -> None:
        with self._cond:
            self._weights = (version, flat)

    def finish(self) -> None:
        """Training is over: explorers are told so at their next put."""
        with self._cond:
            self._done = True
            self._inbox.clear()

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "joined": sorted(self._joined),
                "finished": sorted(self._finished),
                "rejoins": self._rejoins,
                "queued": len(self._inbox),
            }

    # --- learners' rendezvous (torch.distributed) ----------------------------------------------
    def set_rendezvous(self, address: str) -> None:
        self._rendezvous = address

    def rendezvous(self) -> str | None:
        return self._rendezvous
