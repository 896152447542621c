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
from impala.callbacks import Hooks
from impala.config import Config
from impala.envs import CORRIDOR_ID
from impala.envs.factory import task_ids
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
    task_returns: dict[str, float] = dataclasses.field(default_factory=dict)
    """A multi-task run's mean return of the last 100 episodes of each task (by id)."""

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
        resume: dict[str, Any] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.out = out if out is not None else sys.stdout
        self.start = time.monotonic()
        resumed = resume or {}
        # A resumed run goes on counting where its checkpoint stopped, on the same time axis.
        self.steps = int(resumed.get("steps", 0))
        self.updates = int(resumed.get("updates", 0))
        self.episodes = int(resumed.get("episodes", 0))
        self.seconds_before = float(resumed.get("seconds", 0.0))
        self.returns: deque[float] = deque(resumed.get("returns", ()), maxlen=RETURN_WINDOW)
        # A multi-task run's return windows, one per task (the run's are over all of them).
        self.tasks = task_ids(cfg.env) if "," in cfg.env else ()
        before = resumed.get("task_returns", {})
        self.task_returns = {
            task: deque(before.get(task, ()), maxlen=RETURN_WINDOW) for task in self.tasks
        }
        self.last_metrics: dict[str, float] = {}
        self._interval_metrics: dict[str, float] = {}
        self._interval_updates = 0
        self._last_log_time = self.start
        self._last_log_steps = self.steps
        self._metrics_file = None
        self._writer = None
        self._wandb = None
        self.hooks = hooks if hooks is not None else Hooks()
        if run_dir is not None:
            self._metrics_file = _open_metrics(run_dir / "metrics.jsonl", resume)
            if cfg.tensorboard:
                self._writer = _tensorboard_writer(run_dir, self.steps if resume else None)
            if cfg.wandb:
                from impala.wandb_tracker import WandbTracker

                self._wandb = WandbTracker(cfg, run_dir, resumed=resume is not None)
                # W&B's start (seconds) is not training time
                self.start = self._last_log_time = time.monotonic()
        self._bar = _progress_bar(cfg, self.out, self.steps) if _wants_bar(cfg, self.out) else None
        self.stop_reason = ""
        self.signals = signals
        # Counters a runtime keeps (explorer restarts, torn unrolls, ...), logged with each record.
        self.counters: dict[str, int] = {}

    # --- counting ------------------------------------------------------------------------------
    def on_unroll(self, info: UnrollInfo) -> None:
        self.steps += info.steps
        self.episodes += len(info.episode_returns)
        self.returns.extend(info.episode_returns)
        if self.tasks:
            self.task_returns[self.tasks[info.task]].extend(info.episode_returns)

    def on_update(self, metrics: dict[str, float]) -> None:
        self.updates += 1
        self.last_metrics = metrics
        self._interval_updates += 1
        for k, v in metrics.items():
            self._interval_metrics[k] = self._interval_metrics.get(k, 0.0) + v

    @property
    def session_seconds(self) -> float:
        """Seconds since this process started training (what --max-seconds limits)."""
        return time.monotonic() - self.start

    @property
    def elapsed(self) -> float:
        """Seconds of training of the whole run, earlier sessions of a resumed run included."""
        return self.seconds_before + self.session_seconds

    def state(self) -> dict[str, Any]:
        """The counters a checkpoint keeps (with the length of metrics.jsonl so far)."""
        if self._metrics_file is not None:
            self._metrics_file.flush()
        return {
            "steps": self.steps,
            "updates": self.updates,
            "episodes": self.episodes,
            "seconds": self.elapsed,
            "returns": list(self.returns),
            "task_returns": {task: list(window) for task, window in self.task_returns.items()},
            "metrics_offset": self._metrics_file.tell() if self._metrics_file else 0,
        }

    @property
    def return_mean(self) -> float | None:
        return sum(self.returns) / len(self.returns) if self.returns else None

    def task_return_means(self) -> dict[str, float]:
        """A multi-task run's mean return of each task's last 100 episodes (tasks with some)."""
        return {task: sum(w) / len(w) for task, w in self.task_returns.items() if w}

    def should_stop(self) -> bool:
        """A stop signal, a callback's request, the time limit or the target return (the step
        budget is the batch source's to judge: explorers are given their shares of it)."""
        if self.signals is not None and self.signals.requested:
            self.stop_reason = self.signals.reason or "signal"
            return True
        if self.hooks.stop_reason is not None:
            self.stop_reason = self.hooks.stop_reason
            return True
        if self.cfg.max_seconds is not None and self.session_seconds >= self.cfg.max_seconds:
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
        if self._bar is not None:
            self._bar.update(self.steps - self._bar.n)
        if not force and now - self._last_log_time < self.cfg.log_interval:
            return
        if self._interval_updates == 0 and (not force or self.steps == self._last_log_steps):
            return  # nothing new to say (a forced record right after a regular one included)
        sps = (self.steps - self._last_log_steps) / max(now - self._last_log_time, 1e-9)
        means = {k: v / max(self._interval_updates, 1) for k, v in self._interval_metrics.items()}
        record: dict[str, Any] = {
            "time": round(self.seconds_before + now - self.start, 3),
            "steps": self.steps,
            "updates": self.updates,
            "episodes": self.episodes,
            "steps_per_second": round(sps, 1),
            "return_mean": self.return_mean,
            **{f"return_mean/{task}": value for task, value in self.task_return_means().items()},
            **means,
            **self.counters,
        }
        record = _finite(record)
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if self._writer is not None or self._wandb is not None:
            self._write_scalars(record)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)
        elif self.updates:
            print(self._line(sps), file=self.out, flush=True)
        self._last_log_time, self._last_log_steps = now, self.steps
        self._interval_metrics, self._interval_updates = {}, 0
        self.hooks.record(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        """Every number of the record as a TensorBoard scalar (and a W&B one) against env steps
        (TensorBoard's resumed run purges what came after its checkpoint)."""
        step = record["steps"]
        scalars = {
            _tag(key): value
            for key, value in record.items()
            if key != "steps" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step)

    def _postfix(self) -> str:
        m = self.last_metrics
        ret = "-" if self.return_mean is None else f"{self.return_mean:.1f}"
        return (
            f"return {ret} ({self.episodes} episodes), lag {m.get('policy_lag', math.nan):.1f}, "
            f"{self.updates} updates"
        )

    def _eta(self, sps: float) -> str:
        """The time left: to the step budget at `sps`, or to the time limit if that comes first
        (`impala bench` runs on a time limit with a step budget no run reaches)."""
        left = [max(0, self.cfg.steps_total - self.steps) / sps] if sps > 0 else []
        if self.cfg.max_seconds is not None:
            left.append(max(0.0, self.cfg.max_seconds - self.session_seconds))
        return _duration(min(left)) if left else "-"

    def _line(self, sps: float) -> str:
        m = self.last_metrics
        if self.cfg.env == CORRIDOR_ID:
            return (
                f"task {self.cfg.task_index} step {self.updates} loss {m.get('loss', math.nan)} "
                f"avg-right-prob={m.get('prob_action1', math.nan)}"
            )
        ret = "-" if self.return_mean is None else f"{self.return_mean:.1f}"
        eta = self._eta(sps)
        per_task = "".join(
            f" {task.split('/')[-1]} {value:.1f}"
            for task, value in self.task_return_means().items()
        )
        return (
            f"steps {self.steps:>10,d} | {sps:>8,.0f} steps/s | eta {eta} | return {ret} "
            f"({self.episodes} episodes{';' + per_task if per_task else ''}) | "
            f"loss {m.get('loss', math.nan):.4g} | lag {m.get('policy_lag', math.nan):.1f} | "
            f"updates {self.updates}"
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
            task_returns=self.task_return_means(),
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


def _open_metrics(path: Path, resume: dict[str, Any] | None) -> IO[str]:
    """metrics.jsonl for appending; for a resumed run cut back to its length at the checkpoint,
    so that no step is recorded twice (what came after it is learned again)."""
    f = open(path, "a")
    if resume is not None:
        f.truncate(int(resume.get("metrics_offset", 0)))
        f.seek(0, 2)
    return f


def _tensorboard_writer(run_dir: Path, purge_from: int | None):
    """A TensorBoard writer in RUN_DIR/tensorboard; a resumed run's writer hides the events
    logged after its checkpoint (TensorBoard's purge_step)."""
    from torch.utils.tensorboard import SummaryWriter

    purge = None if purge_from is None else purge_from + 1
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge, flush_secs=30)


def _tag(key: str) -> str:
    """TensorBoard tags grouped by kind: returns, losses, the rest."""
    if key.startswith(("return", "episodes")):
        return f"episodes/{key}"
    if key.endswith("loss"):
        return f"loss/{key}"
    if key.startswith("prob_action"):
        return f"policy/{key}"
    return f"learner/{key}" if key in _LEARNER_KEYS else f"run/{key}"


_LEARNER_KEYS = ("grad_norm", "learning_rate", "policy_lag", "mean_rho", "batch_steps", "updates")


def _wants_bar(cfg: Config, out: IO[str]) -> bool:
    if cfg.env == CORRIDOR_ID or cfg.progress == "lines":
        return False  # the corridor prints the seed's learner line
    if cfg.progress == "bar":
        return True
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def _progress_bar(cfg: Config, out: IO[str], initial: int):
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps_total,
        initial=initial,
        unit="step",
        unit_scale=True,
        file=out,
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.5,
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
