"""The project's exceptions for endings a user must be told about in one line, and exit codes.

| code | meaning |
|---|---|
| 0 | done: the step budget, the time limit or the target return was reached |
| 1 | failed at run time (`RunFailed`: an explorer that keeps dying, a peer that went away) |
| 2 | bad input (`ConfigError`: flags, configs, env ids, host lists, run folders) |
| 130 | stopped by SIGINT (Ctrl-C); the model and logs are saved as at a normal end |
| 143 | stopped by SIGTERM (kill, timeout, schedulers, containers); saved likewise |
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def exit_code_for_signal(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class ConfigError(ValueError):
    """Bad input from the user. The CLI prints its message on one line and exits with code 2."""


class RunFailed(RuntimeError):
    """The run cannot go on (an explorer in a crash loop, a peer that went away). The CLI prints
    its message on one line and exits with code 1, after the run's clean-up and save."""


def one_line(exc: BaseException) -> str:
    """`Type: message` of an exception on one line (for errors that cross process boundaries)."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if isinstance(exc, ConfigError | RunFailed):
        return text or name
    return f"{name}: {text}" if text else name
