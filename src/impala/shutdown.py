"""SIGINT and SIGTERM as a stop request that every ending path honours the same way.

Schedulers, `kill`, `timeout`, Docker and Kubernetes send SIGTERM; a terminal sends SIGINT. Both
end a run alike: the learner loop sees the request at its next turn, leaves through the one
`finally` that stops every process and saves what a normal end saves, and the exit code tells
which signal it was (130 or 143, see `impala.errors`). Handlers are installed explicitly, so
this also works when `impala` is PID 1 in a container (where a signal with no handler is
ignored by the kernel).

Two phases:
- start-up (`deferring` off): the first signal raises `Interrupted` at once, so a long wait
  (a Ray start, peers that are not up yet) is cut short; the code being interrupted cleans up in
  its own `finally`.
- the loop and the clean-up (`defer()` called): signals only set the request, which the loop
  polls; the clean-up runs to its end. A second signal sets `hurry`, which shortens waits for
  children to exit but never skips stopping them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 - a sibling of KeyboardInterrupt, not an error
    """A stop signal arrived during start-up; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Installs handlers for SIGINT and SIGTERM while active (a context manager) and restores the
    previous ones on exit, so a caller's process is left as it was found.

    Outside the main thread no handler can be installed; the object then only carries requests
    made with `request()`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.hurry = False
        self.deferring = False
        self._previous: dict[int, object] = {}

    # --- installing --------------------------------------------------------------------------
    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def install(self) -> None:
        """(Re)installs the handlers: also after a library that sets its own (Ray's `init`)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN and signum not in self._previous:
                continue  # e.g. SIGINT of a background job (`cmd &`): the shell asked for that
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    # --- state -------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def reason(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def defer(self) -> None:
        """From now on a signal only sets the request (the loop and the clean-up poll it)."""
        self.deferring = True

    def request(self, signum: int = signal.SIGTERM) -> None:
        """A stop request made without a signal (from another thread, or a test)."""
        self._handle(signum, None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.hurry = True
            return
        self.signum = signum
        if not self.deferring and frame is not None:
            raise Interrupted(signum)
