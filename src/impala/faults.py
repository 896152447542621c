"""Fault injection for the tests and the chaos check: a process dies or hangs at a named point.

The failures that matter most for the runtimes happen at instants a test cannot hit from outside
(an explorer SIGKILLed in the middle of a replay upload, or between writing an unroll and handing
its slot on). The code marks those instants with `point(name)`, which does nothing unless the
environment variable IMPALA_FAULTS asks for a fault there:

    IMPALA_FAULTS="replay-upload@20"        the 20th time this process reaches the point
    IMPALA_FAULTS="slot-write%0.05"         each time with probability 0.05
    IMPALA_FAULTS="slot-write!/tmp/kill"    the next time, once the file /tmp/kill exists
    IMPALA_FAULTS="hang@3,replay-upload@9"  several points

A file trigger (for the chaos check, which decides when) is consumed by the one process that
removes it first. A fault SIGKILLs the process (as the OOM killer or a preemption would),
except at `hang`, where the process sleeps for ever instead (an environment that deadlocks in
`step()`). With IMPALA_FAULTS_ONCE=PATH set, a fault fires only if PATH can be created
(exclusively): once per run across all its processes, however many replacements reach the
point again.

Points: `replay-upload` (ReplayBuffer.upload, after the first field is copied), `slot-write`
(the local runtime, an unroll written into its slot but not yet handed on), `slot-torn` (the
same moment, but the slot is first marked full as a broken writer would: the learner must see
the unroll is torn and not learn from it), `hang` (an explorer, before each unroll), and with
`--inference server` `inference` (the server, a batch's requests read and not yet answered) and
`inference-wait` (an explorer, its request sent and not yet answered; once per step).

Reading the variable costs one dictionary lookup per call once parsed; points sit on per-unroll
paths, never per environment step, but for `inference-wait` (one lookup beside a round trip to
another process).
"""

from __future__ import annotations

import os
import random
import signal
import time

ENV = "IMPALA_FAULTS"
ONCE_ENV = "IMPALA_FAULTS_ONCE"

_plan: dict[str, tuple[str, float | str]] | None = None
_counts: dict[str, int] = {}


def _parse(text: str) -> dict[str, tuple[str, float | str]]:
    plan = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "@" in item:
            name, n = item.split("@", 1)
            plan[name] = ("at", float(int(n)))
        elif "%" in item:
            name, p = item.split("%", 1)
            plan[name] = ("probability", float(p))
        elif "!" in item:
            name, path = item.split("!", 1)
            plan[name] = ("file", path)
        else:
            raise ValueError(f"{ENV}: '{item}' is not NAME@N, NAME%P or NAME!PATH")
    return plan


def armed(name: str) -> bool:
    """Whether IMPALA_FAULTS names `name` at all (to skip work only a fault needs)."""
    global _plan
    if _plan is None:
        _plan = _parse(os.environ.get(ENV, ""))
    return name in _plan


def due(name: str) -> bool:
    """Counts a visit of point `name`; True if its fault fires now (see the module doc)."""
    if not armed(name):
        return False
    kind, value = _plan[name]  # type: ignore[index]
    _counts[name] = _counts.get(name, 0) + 1
    if kind == "at":
        fires = _counts[name] == int(value)
    elif kind == "file":
        fires = _consume(value)
    else:
        fires = random.random() < value
    return fires and _claim_once()


def _consume(path: str) -> bool:
    """Whether this process removed the trigger file `path` (only one can)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _claim_once() -> bool:
    path = os.environ.get(ONCE_ENV)
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def point(name: str) -> None:
    """A place where a fault may be injected: SIGKILL (or, at 'hang', sleep for ever) when due."""
    if not due(name):
        return
    if name == "hang":
        while True:
            time.sleep(3600)
    die()


def die() -> None:
    """SIGKILL this process now (no clean-up runs, as with the OOM killer)."""
    os.kill(os.getpid(), signal.SIGKILL)
