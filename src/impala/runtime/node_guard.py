"""Runs a command as a child and stops it when the process that started this guard is gone.

    python -m impala.runtime.node_guard PARENT_PID [--remove-dir DIR] COMMAND...

A task starts its Ray node through this guard, so that even a task killed with SIGKILL (which
runs no clean-up of its own) leaves no Ray node behind: the guard sees its parent vanish and
sends the node SIGTERM, which makes `ray start --block` stop every Ray process it started.
SIGTERM to the guard is passed on to the node the same way. `--remove-dir`: the node's temp dir
(sockets, logs), removed once the node has stopped, which a killed task cannot do itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    remove_dir = None
    if command[:1] == ["--remove-dir"]:
        remove_dir, command = command[1], command[2:]
    child = subprocess.Popen(command)

    def clean_up() -> None:
        if remove_dir is not None:
            shutil.rmtree(remove_dir, ignore_errors=True)

    def stop(*_: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    signal.signal(signal.SIGTERM, lambda *a: (stop(), clean_up(), sys.exit(0)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the task decides when its node stops
    while child.poll() is None:
        if os.getppid() != parent:  # our parent is gone: we were re-parented
            stop()
            break
        time.sleep(0.5)
    clean_up()
    return child.returncode or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
