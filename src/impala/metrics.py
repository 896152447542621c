"""Progress of a run: counters, the episode-return window, progress lines and metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from impala.agent.explorer import UnrollInfo
from impala.config import Config
from impala.envs import CORRIDOR_ID
from impala.shutdown import StopSignals

RETURN_WINDOW = 100


@dataclasses.dataclass
class RunResult:
    """What a finished run reports."""

    steps: int
    updates: int
    episodes: int
    seconds: float
    return_mean: float | None
    last_metrics: dict[str, float]
    run_dir: str | None
    stop_reason: str
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


class Tracker:
    """Counts steps, updates and episodes, decides when to stop, and logs at `log_interval`.

    The learner line on the seed's corridor is the seed's own:
    `task 0 step N loss L avg-right-prob=P` (N counts learner updates); other environments get
    steps, steps/s, mean return of the last 100 episodes, loss and policy lag.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path | None,
        out: IO[str] | None = None,
        *,
        signals: StopSignals | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.out = out if out is not None else sys.stdout
        self.start = time.monotonic()
        self.steps = 0
        self.updates = 0
        self.episodes = 0
        self.returns: deque[float] = deque(maxlen=RETURN_WINDOW)
        self.last_metrics: dict[str, float] = {}
        self._interval_metrics: dict[str, float] = {}
        self._interval_updates = 0
        self._last_log_time = self.start
        self._last_log_steps = 0
        self._metrics_file = open(run_dir / "metrics.jsonl", "a") if run_dir else None
        self.stop_reason = ""
        self.signals = signals
        # Counters a runtime keeps (explorer restarts, torn unrolls, ...), logged with each record.
        self.counters: dict[str, int] = {}

    # --- counting ------------------------------------------------------------------------------
    def on_unroll(self, info: UnrollInfo) -> None:
        self.steps += info.steps
        self.episodes += len(info.episode_returns)
        self.returns.extend(info.episode_returns)

    def on_update(self, metrics: dict[str, float]) -> None:
        self.updates += 1
        self.last_metrics = metrics
        self._interval_updates += 1
        for k, v in metrics.items():
            self._interval_metrics[k] = self._interval_metrics.get(k, 0.0) + v

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def return_mean(self) -> float | None:
        return sum(self.returns) / len(self.returns) if self.returns else None

    def should_stop(self) -> bool:
        """A stop signal, the time limit or the target return (the step budget is the batch
        source's to judge: explorers are given their shares of it)."""
        if self.signals is not None and self.signals.requested:
            self.stop_reason = self.signals.reason or "signal"
            return True
        if self.cfg.max_seconds is not None and self.elapsed >= self.cfg.max_seconds:
            self.stop_reason = "time limit"
            return True
        target = self.cfg.target_return
        if target is not None and len(self.returns) == RETURN_WINDOW and self.return_mean >= target:
            self.stop_reason = "target return"
            return True
        return False

    # --- logging -------------------------------------------------------------------------------
    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log_time < self.cfg.log_interval:
            return
        if self._interval_updates == 0 and (not force or self.steps == self._last_log_steps):
            return  # nothing new to say (a forced record right after a regular one included)
        sps = (self.steps - self._last_log_steps) / max(now - self._last_log_time, 1e-9)
        means = {k: v / max(self._interval_updates, 1) for k, v in self._interval_metrics.items()}
        record: dict[str, Any] = {
            "time": round(now - self.start, 3),
            "steps": self.steps,
            "updates": self.updates,
            "episodes": self.episodes,
            "steps_per_second": round(sps, 1),
            "return_mean": self.return_mean,
            **means,
            **self.counters,
        }
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(_finite(record)) + "\n")
            self._metrics_file.flush()
        if self.updates:
            print(self._line(sps), file=self.out, flush=True)
        self._last_log_time, self._last_log_steps = now, self.steps
        self._interval_metrics, self._interval_updates = {}, 0

    def _line(self, sps: float) -> str:
        m = self.last_metrics
        if self.cfg.env == CORRIDOR_ID:
            return (
                f"task {self.cfg.task_index} step {self.updates} loss {m.get('loss', math.nan)} "
                f"avg-right-prob={m.get('prob_action1', math.nan)}"
            )
        ret = "-" if self.return_mean is None else f"{self.return_mean:.1f}"
        return (
            f"steps {self.steps:>10,d} | {sps:>8,.0f} steps/s | return {ret} "
            f"({self.episodes} episodes) | loss {m.get('loss', math.nan):.4g} | "
            f"lag {m.get('policy_lag', math.nan):.1f} | updates {self.updates}"
        )

    def result(self) -> RunResult:
        return RunResult(
            steps=self.steps,
            updates=self.updates,
            episodes=self.episodes,
            seconds=self.elapsed,
            return_mean=self.return_mean,
            last_metrics=self.last_metrics,
            run_dir=str(self.run_dir) if self.run_dir else None,
            stop_reason=self.stop_reason or "step budget",
        )

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
