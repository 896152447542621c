"""How the learning rate and the entropy bonus's weight change over a run (--lr-schedule,
--entropy-schedule): constant, or falling linearly to 0 over the run's env steps (the paper's
learning-rate schedule).

A schedule is a function of the run's env steps. A linear one is a segment: `start_value` at
`start_steps`, 0 at `end_steps` and after. A fresh run's segment starts at 0 steps with the
configured value and ends at the run's step budget.

Resuming (`resumed`): with the same budget and value, the saved segment goes on unchanged (the
run continues exactly as if never stopped). With a longer (or shorter) budget the decay continues
from the value it had reached, over what is left of the new budget: the rate never jumps back up
(as it would if progress were simply steps / the new budget). A value the user states again on
resuming (`--override --learning-rate X`) restarts the decay at X from the resume point, the way
to train on at a useful rate after a run whose decay had reached 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, steps: int) -> float:
        return self.value


@dataclasses.dataclass(frozen=True)
class LinearDecay:
    """`start_value` at env step `start_steps`, falling linearly to 0 at `end_steps`."""

    start_steps: int
    start_value: float
    end_steps: int

    def __call__(self, steps: int) -> float:
        span = self.end_steps - self.start_steps
        if span <= 0:
            return 0.0
        done = min(1.0, (steps - self.start_steps) / span)
        return self.start_value * max(0.0, 1.0 - done)


Schedule = Constant | LinearDecay


def fresh(kind: str, value: float, total_steps: int) -> Schedule:
    """The schedule of a run that starts now: `kind` 'constant' or 'linear' (to 0 at
    `total_steps`)."""
    return LinearDecay(0, value, total_steps) if kind == "linear" else Constant(value)


def resumed(
    saved: Schedule, kind: str, value_before: float, value_now: float, steps: int, total: int
) -> Schedule:
    """The schedule a run resumed at `steps` env steps goes on with (see the module doc):
    `saved` the schedule it had, `kind` and `value_now` the settings it resumes with (the
    configured value it started with was `value_before`), `total` its step budget now."""
    if kind != "linear":
        return Constant(value_now)
    restated = value_now != value_before
    if not restated and isinstance(saved, LinearDecay) and saved.end_steps == total:
        return saved  # the same run, going on exactly
    start_value = value_now if restated else saved(steps)
    return LinearDecay(steps, start_value, total)


def to_state(schedule: Schedule) -> dict[str, Any]:
    """A checkpoint's record of `schedule`."""
    return {"kind": type(schedule).__name__, **dataclasses.asdict(schedule)}


def from_state(state: dict[str, Any]) -> Schedule:
    fields = {k: v for k, v in state.items() if k != "kind"}
    return LinearDecay(**fields) if state["kind"] == "LinearDecay" else Constant(**fields)


def describe(name: str, schedule: Schedule, steps: int) -> str:
    """`schedule` in words, at the run's `steps`, for the resume line."""
    if isinstance(schedule, Constant):
        return f"{name} {schedule.value:.3g} (constant)"
    now = schedule(steps)
    if now == 0.0:
        return (
            f"{name} 0 (its linear decay has ended; --override --{name.replace(' ', '-')} X "
            "restarts it at X)"
        )
    return f"{name} {now:.3g}, falling linearly to 0 at {schedule.end_steps:,} steps"
