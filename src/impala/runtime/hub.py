"""The hub: one per learner task, a Ray actor that is that learner's inbox and weights board.

Explorer tasks put unrolls (or replay uploads) into a learner's hub and read its newest weights;
the learner drains the inbox and publishes weights there, so neither side waits on the other.
Hub 0 also holds the job's description (host lists and every shared setting), checks joining
tasks against it, is the learners' rendezvous, and records the first learner failure so that the
others can name it. Each hub tracks when it last heard from each explorer, so a learner can tell
an explorer that went away from one that is slow.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

PUT_WAIT = 0.5  # seconds a put waits for room in a full inbox before answering 'full'


class Hub:
    """Thread-safe; run as a Ray actor with max_concurrency > 1 (puts and drains wait)."""

    def __init__(
        self, learner_index: int, job: dict[str, Any], capacity: int, steps_before: int = 0
    ) -> None:
        self.learner_index = learner_index
        self._steps_before = steps_before
        self.job = job
        self.capacity = capacity
        self._inbox: deque = deque()
        self._cond = threading.Condition()
        self._weights: tuple[int, Any] | None = None
        self._done = False
        self._started = time.monotonic()
        self._joined: set[int] = set()
        self._finished: set[int] = set()
        self._left: dict[int, str] = {}  # explorer -> why it left before finishing
        self._last_seen: dict[int, float] = {}
        self._made: dict[int, int] = {}  # env steps in the items each explorer put here
        self._rejoins = 0
        self._events: list[str] = []
        self._rendezvous: str | None = None
        self._arrived: set[int] = set()
        self._failure: str | None = None

    # --- joining -------------------------------------------------------------------------------
    def check(self, job: dict[str, Any]) -> str | None:
        """None if `job` matches this job, else a sentence naming what differs."""
        diffs = [k for k in sorted(set(self.job) | set(job)) if self.job.get(k) != job.get(k)]
        if not diffs:
            return None
        return "; ".join(
            f"{k}: {job.get(k)!r} here, {self.job.get(k)!r} at learner 0" for k in diffs
        )

    def steps_before(self) -> int:
        """Env steps the job made before it was resumed from a checkpoint (explorers make what
        is left of the budget)."""
        return self._steps_before

    def made_by(self, explorer: int) -> int:
        """Env steps in the items `explorer` put here in this job (an explorer started again
        after dying makes only what is left of its share)."""
        with self._cond:
            return self._made.get(explorer, 0)

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
            self._left.pop(explorer, None)
            self._last_seen[explorer] = time.monotonic()
            return self._rejoins

    # --- explorers' side -----------------------------------------------------------------------
    def put(self, item: tuple[Any, Any], have_version: int = -1) -> tuple[str, Any]:
        """Queues `(payload, info)`, waiting up to PUT_WAIT for room. Returns 'ok', 'full' or
        'done', and the newest weights if newer than `have_version` (one round trip for both)."""
        deadline = time.monotonic() + PUT_WAIT
        with self._cond:
            explorer = item[1].explorer
            self._last_seen[explorer] = time.monotonic()
            while not self._done and len(self._inbox) >= self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "full", self._newer(have_version)
                self._cond.wait(remaining)
            if self._done:
                return "done", None
            self._inbox.append(item)
            self._made[explorer] = self._made.get(explorer, 0) + item[1].steps
            self._last_seen[explorer] = time.monotonic()
            self._cond.notify_all()
            return "ok", self._newer(have_version)

    def _newer(self, have_version: int) -> tuple[int, Any] | None:
        if self._weights is None or self._weights[0] <= have_version:
            return None
        return self._weights

    def weights(self, have_version: int) -> tuple[int, Any] | None:
        """The newest weights if newer than `have_version` (never older ones)."""
        with self._cond:
            return self._newer(have_version)

    def explorer_finished(self, explorer: int) -> None:
        with self._cond:
            self._finished.add(explorer)
            self._cond.notify_all()

    def explorer_left(self, explorer: int, why: str) -> None:
        """An explorer stopped before making its steps (a signal, an error)."""
        with self._cond:
            self._left[explorer] = why
            self._events.append(f"explorer {explorer} left: {why}")

    # --- the learner's side --------------------------------------------------------------------
    def drain(self, max_items: int, timeout: float) -> tuple[list, list[str]]:
        """Up to `max_items` queued items (waits up to `timeout` for the first) and the events
        since the last call."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._inbox and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            items = [self._inbox.popleft() for _ in range(min(max_items, len(self._inbox)))]
            if items:
                self._cond.notify_all()  # room for waiting puts
            events, self._events = self._events, []
            return items, events

    def publish(self, version: int, flat: Any) -> None:
        with self._cond:
            if self._weights is None or version > self._weights[0]:
                self._weights = (version, flat)

    def finish(self) -> None:
        """Training is over: explorers are told so at their next put."""
        with self._cond:
            self._done = True
            self._inbox.clear()
            self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        """Who joined, finished or left, and seconds since each explorer was last heard from
        (since the hub started, for those never heard from)."""
        with self._cond:
            now = time.monotonic()
            return {
                "joined": sorted(self._joined),
                "finished": sorted(self._finished),
                "left": dict(self._left),
                "silent_for": {e: now - t for e, t in self._last_seen.items()},
                "age": now - self._started,
                "rejoins": self._rejoins,
                "queued": len(self._inbox),
            }

    # --- learners' rendezvous (torch.distributed) and failures ---------------------------------
    def set_rendezvous(self, address: str) -> None:
        self._rendezvous = address

    def arrive(self, learner: int) -> None:
        """A learner passed the settings check and waits for the others."""
        with self._cond:
            self._arrived.add(learner)

    def rendezvous(self) -> tuple[str | None, list[int]]:
        """The learners' group address (once learner 0 set it) and the learners present."""
        with self._cond:
            return self._rendezvous, sorted(self._arrived)

    def report_failure(self, learner: int, line: str) -> None:
        """The first learner failure is kept: the others name it when their collective breaks."""
        with self._cond:
            if self._failure is None:
                self._failure = f"learner {learner} failed: {line}"

    def failure(self) -> str | None:
        return self._failure
