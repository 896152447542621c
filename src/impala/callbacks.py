"""Callbacks: your code, called by a run started with `impala.train(config, callbacks=[...])`.

A callback is an object with any of three methods (subclass `Callback` and override what you
need, or write any object with these methods):

- `on_record(record)`: after each metrics record (every `log_interval` seconds, and once when the
  run ends), with the record as metrics.jsonl holds it (`steps`, `updates`, `episodes`,
  `return_mean`, the losses...);
- `on_checkpoint(path, steps)`: after each checkpoint is written (every `checkpoint_interval`
  minutes, and once when the run ends);
- `on_end(result)`: once, after the run has ended and everything is saved, with its
  `impala.TrainResult`.

They run in the process that called `impala.train` (the learner's), between two learner updates,
on every runtime (serial, local, Ray): a slow callback slows the learner down, not the explorers.

To stop a run early (your own early stopping), raise `StopTraining` in `on_record` or
`on_checkpoint`: the run ends as at its time limit (the batch in hand learned from, explorers
stopped, a last checkpoint and model.pt saved) and `TrainResult.stop_reason` is
`"callback: <your reason>"`. Any other exception raised in a callback ends the run the same
clean way and is raised again by `impala.train` once everything is saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impala.errors import ConfigError

if TYPE_CHECKING:
    from impala.api import TrainResult

HOOKS = ("on_record", "on_checkpoint", "on_end")


class StopTraining(Exception):  # noqa: N818 - a request, not an error
    """Raised in a callback's `on_record` or `on_checkpoint` to end the run cleanly, with its
    checkpoint and model saved; `reason` becomes the run's stop reason (`"callback: reason"`).

    Args:
        reason: why the run stops, for the summary line and `TrainResult.stop_reason`.
    """

    def __init__(self, reason: str = "asked to stop") -> None:
        super().__init__(reason)
        self.reason = reason


class Callback:
    """Base class of callbacks: override the hooks you need; the others do nothing.

    Example:
        ```python
        class EarlyStop(impala.Callback):
            def on_record(self, record):
                if (record["return_mean"] or 0.0) >= 195.0:
                    raise impala.StopTraining("solved")
        ```
    """

    def on_record(self, record: dict[str, Any]) -> None:
        """Called after each metrics record.

        Args:
            record: the record as written to metrics.jsonl (a copy): `time` (seconds of
                training), `steps` (env steps), `updates`, `episodes`, `steps_per_second`,
                `return_mean` (mean return of the last 100 episodes; None before the first
                episode ends), the learner's means since the last record (`loss`,
                `policy_lag`, ...) and the runtime's counters.

        Raises:
            StopTraining: to end the run cleanly.
        """

    def on_checkpoint(self, path: Path, steps: int) -> None:
        """Called after each checkpoint is written.

        Args:
            path: the checkpoint file (`RUN_DIR/checkpoints/ckpt-<steps>.pt`); it loads with
                `impala.load_policy(path)`. The run keeps only its newest `keep_checkpoints`
                files: copy it to keep it.
            steps: env steps the run had made at the checkpoint.

        Raises:
            StopTraining: to end the run cleanly.
        """

    def on_end(self, result: TrainResult) -> None:
        """Called once when the run has ended and everything is saved.

        Args:
            result: what `impala.train` returns.
        """


class Hooks:
    """The run's side of its callbacks (internal): calls them in order, and turns what they raise
    into a stop request that the learner loop honours at its next turn (`stop_reason`); an
    exception other than StopTraining is kept (`error`) for `impala.train` to raise again once
    the run is saved."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
                raise ConfigError(
                    f"callback {callback!r} has none of the methods {', '.join(HOOKS)} "
                    "(subclass impala.Callback and override those you need)"
                )
        self.stop_reason: str | None = None
        self.error: BaseException | None = None

    def record(self, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            self._call(callback, "on_record", dict(record))

    def checkpoint(self, path: Path, steps: int) -> None:
        for callback in self.callbacks:
            self._call(callback, "on_checkpoint", Path(path), int(steps))

    def end(self, result: TrainResult) -> None:
        """`on_end` of each callback; what they raise propagates (the run is over)."""
        for callback in self.callbacks:
            hook = getattr(callback, "on_end", None)
            if callable(hook):
                hook(result)

    def _call(self, callback: Any, name: str, *args: Any) -> None:
        hook = getattr(callback, name, None)
        if not callable(hook) or self.error is not None:
            return
        try:
            hook(*args)
        except StopTraining as stop:
            if self.stop_reason is None:
                self.stop_reason = f"callback: {stop.reason}"
        except Exception as exc:  # the user's bug: the run ends saved, then it is raised
            self.error = exc
            if self.stop_reason is None:
                self.stop_reason = f"callback {name} raised {type(exc).__name__}"
