"""How many explorer restarts a run allows: a number per sliding time window.

A multi-day run survives occasional deaths (an OOM kill now and then), while a crash loop (an
explorer that cannot even be built) uses up the window's allowance within seconds and ends the
run with the explorer's own error. The local and Ray runtimes share this rule.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from impala.errors import RunFailed


class RestartBudget:
    """At most `limit` restarts within any `window` seconds."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.total = 0
        self._times: deque[float] = deque()

    def _recent(self) -> int:
        now = self.clock()
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        return len(self._times)

    def take(self, who: str, why: str) -> str:
        """Records a restart of `who`, which failed with `why`; returns a line to print.

        Raises RunFailed naming `who` and `why` when the window's allowance is used up.
        """
        if self._recent() >= self.limit:
            raise RunFailed(
                f"{who} failed: {why} ({self.limit} restarts within {self.window:g} s already; "
                "stopping; see --max-restarts and --restart-window)"
            )
        self._times.append(self.clock())
        self.total += 1
        return f"{who} failed: {why}; restarting it (restart {self.total})"
