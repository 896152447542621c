"""A run's life cycle, whatever starts it (`impala train`, a learner task of the job form): its
folder and config.json, the learner loop run to its end with one way of ending (every process
stopped, checkpoint, model and logs saved, however it ended), checkpoints during the run, and the
resume point a resumed run goes on from (with its schedules: see `impala.agent.schedules`).

It knows no runtime: the caller builds the batch source (`impala.training` for the single-machine
runtimes, `impala.runtime.job_learner` for the job form).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from impala import checkpoint
from impala.agent import schedules
from impala.config import Config
from impala.errors import ConfigError
from impala.loop import BatchSource, Consensus, learn
from impala.metrics import RunResult, Tracker
from impala.shutdown import Interrupted, StopSignals

RUN_FILES = ("config.json", "metrics.jsonl", "model.pt")


def run_dir_path(cfg: Config) -> Path:
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.env.replace('/', '_').replace(':', '_')}-{stamp}-{os.getpid()}"


def check_run_dir(cfg: Config) -> None:
    """Raises the ConfigError `make_run_dir` would, leaving nothing behind (for commands that
    do other work before training)."""
    path = run_dir_path(cfg)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        make_run_dir(cfg, path)  # the same path (a default one is stamped with the time)
    finally:
        if path in missing:
            (path / "config.json").unlink(missing_ok=True)
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()


def make_run_dir(
    cfg: Config, path: Path | None = None, extra: dict | None = None, restart: bool = False
) -> Path:
    """Creates the run folder, `path` or `run_dir_path(cfg)`, with its config.json (the config
    and `extra`). ConfigError, one line, if it cannot be made or already holds a run: nothing
    already written is overwritten. With `restart` (`--resume auto` finding no checkpoint) a run
    that left none starts again there; its old metrics.jsonl is kept under another name."""
    path = run_dir_path(cfg) if path is None else path
    try:
        path.mkdir(parents=True, exist_ok=True)
        if restart and (path / "metrics.jsonl").exists():
            os.replace(path / "metrics.jsonl", path / f"metrics-before-{int(time.time())}.jsonl")
        if restart:
            for name in ("config.json", "model.pt"):
                (path / name).unlink(missing_ok=True)
            shutil.rmtree(path / "tensorboard", ignore_errors=True)
        taken = [name for name in RUN_FILES if (path / name).exists()]
        if taken:
            raise ConfigError(
                f"run folder '{path}' already holds a run ({', '.join(taken)}); "
                "choose another --run-dir"
            )
        (path / "config.json").write_text(cfg.to_json(extra) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder '{path}': {exc.strerror}") from None
    return path


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to `n` for a while, then as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Written to a temporary name and renamed: a run killed mid-write leaves no torn file. The
    weights are saved from host memory, so that the file loads where there is no GPU (a plain
    `torch.load` of CUDA tensors fails there without `map_location`)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Writes the run's checkpoints (see `impala.checkpoint`): every `cfg.checkpoint_interval`
    minutes between two updates, and once when the run ends, however it ends."""

    def __init__(
        self, cfg: Config, run_dir: Path, learner, tracker: Tracker, source, record: dict
    ) -> None:
        self.cfg, self.run_dir, self.record = cfg, run_dir, record
        self.learner, self.tracker, self.source = learner, tracker, source
        # Synchronous learners: the whole job's env steps (learner 0's tracker counts its own).
        self.job_steps: Callable[[], int] | None = None
        self._last = time.monotonic()

    def source_state(self) -> dict:
        """The runtime's own state, where it keeps one (the serial runtime), else {}."""
        state_of = getattr(self.source, "state", None)
        return state_of() if state_of is not None else {}

    def maybe_save(self) -> None:
        interval = self.cfg.checkpoint_interval
        if interval is not None and time.monotonic() - self._last >= 60.0 * interval:
            self.save(self.source_state())

    def save(self, source_state: dict) -> Path | None:
        learner_state = self.learner.state()
        tracker_state = self.tracker.state()
        state = {
            "config": dataclasses.asdict(self.cfg),
            "record": self.record,
            "model": learner_state.pop("model"),
            "optimizer": learner_state.pop("optimizer"),
            "counters": {
                **{
                    k: v for k, v in tracker_state.items() if k not in ("returns", "metrics_offset")
                },
                "job_steps": self.job_steps() if self.job_steps else tracker_state["steps"],
                "learner_updates": learner_state["updates"],
                "policy_version": learner_state["policy_version"],
            },
            "returns": tracker_state["returns"],
            "metrics_offset": tracker_state["metrics_offset"],
            "rng": checkpoint.rng_state(),
            "source": source_state,
        }
        # APPO's target network and circular buffer, the replay of sequences, the stale count
        state.update({k: learner_state[k] for k in LEARNER_EXTRAS if k in learner_state})
        try:
            path = checkpoint.save(state, self.run_dir, self.cfg.keep_checkpoints)
        except OSError as exc:  # a full disk: say so and go on (the next one may succeed)
            print(f"impala: warning: cannot write a checkpoint: {exc}", file=sys.stderr, flush=True)
            return None
        finally:
            self._last = time.monotonic()
        self.tracker.hooks.checkpoint(path, int(state["counters"]["steps"]))
        return path


# What a checkpoint keeps of a learner beyond its weights, optimizer and counters (see
# `Learner.state`), each where its run has it.
LEARNER_EXTRAS = ("appo", "replay", "stale_sequences")


def run_learner(
    cfg: Config,
    learner,
    source: BatchSource,
    tracker: Tracker,
    signals: StopSignals,
    run_dir: Path | None,
    consensus: Consensus | None = None,
    checkpointer: Checkpointer | None = None,
    source_state: dict | None = None,
) -> None:
    """Starts `source` (back at `source_state`, a resumed serial run's), learns until the run
    ends, then stops everything and saves (checkpoint, model, logs), however it ended (a signal
    during start-up included). RunFailed and other errors propagate afterwards."""
    started = False
    try:
        source.start()
        if source_state and not source.restore(source_state):
            print(
                "impala: note: the explorers' environments did not come back exactly where they "
                "were (an environment not deterministic under its seed); the run goes on",
                file=tracker.out,
                flush=True,
            )
        started = True
        signals.install()  # again: Ray's init puts its own SIGTERM handler in place
        signals.defer()
        learn(
            learner,
            source,
            tracker,
            consensus,
            after_update=checkpointer.maybe_save if checkpointer is not None else None,
        )
    except Interrupted:
        pass  # a signal during start-up: stop and save like any other ending
    finally:
        signals.defer()  # the clean-up runs to its end; a second signal only hurries it
        if signals.requested:
            tracker.stop_reason = signals.reason
        final_source_state: dict = {}
        if checkpointer is not None and started:
            with contextlib.suppress(Exception):  # no exact resume then, but a checkpoint
                final_source_state = checkpointer.source_state()
        try:
            source.close()
        finally:
            tracker.maybe_log(force=True)
            if checkpointer is not None and (started or tracker.updates):
                checkpointer.save(final_source_state)
            tracker.close()
            if run_dir is not None:
                save_model(learner.model, run_dir / "model.pt")


# Settings a resumed run may change without --override: how long it runs and how it is logged
# and checkpointed, not what it learns.
RESUME_FREE = frozenset(
    {
        "total_steps",
        "steps_per_explorer",
        "max_seconds",
        "target_return",
        "log_interval",
        "run_dir",
        "checkpoint_interval",
        "keep_checkpoints",
        "tensorboard",
        "wandb",
        "wandb_project",
        "wandb_name",
        "wandb_tags",
        "progress",
        "print_steps",
        "learner_threads",
        "explorer_nice",
        "device",
        "max_restarts",
        "restart_window",
        "explorer_timeout",
        "ray_address",
    }
)


@dataclasses.dataclass
class ResumePoint:
    """Where a resumed run starts: its checkpoint and run folder."""

    path: Path
    run_dir: Path
    state: dict[str, Any]

    def tracker_state(self) -> dict[str, Any]:
        """What the run's Tracker goes on from (its `resume`)."""
        return {
            **self.state["counters"],
            "returns": self.state.get("returns", []),
            "metrics_offset": self.state.get("metrics_offset", 0),
        }

    @property
    def steps(self) -> int:
        """Env steps the run had made at its checkpoint (a job's: all its learners')."""
        counters = self.state["counters"]
        return int(counters.get("job_steps", counters["steps"]))

    def restore(self, learner, cfg: Config, out: IO[str]) -> None:
        """Takes `learner` and the global random generators back to the checkpoint, sets the
        learner's schedules for the rest of the run (`impala.agent.schedules.resumed`), and says
        so."""
        counters = self.state["counters"]
        learner.restore(
            {
                "model": self.state["model"],
                "optimizer": self.state["optimizer"],
                "updates": counters.get("learner_updates", 0),
                "policy_version": counters.get("policy_version", 0),
                **{k: self.state[k] for k in LEARNER_EXTRAS if k in self.state},
            }
        )
        checkpoint.set_rng_state(self.state["rng"])
        before = self.config_before()
        saved = self.state.get("schedules") or {}
        for name, kind, attr in (
            ("learning_rate", "lr_schedule", "lr_schedule"),
            ("entropy_cost", "entropy_schedule", "entropy_schedule"),
        ):
            if name in saved:
                old = schedules.from_state(saved[name])
            else:  # a checkpoint from before schedules were kept: the run's own
                old = schedules.fresh(
                    getattr(before, kind), getattr(before, name), before.steps_total
                )
            new = schedules.resumed(
                old,
                getattr(cfg, kind),
                getattr(before, name),
                getattr(cfg, name),
                self.steps,
                learner.total_steps,
            )
            setattr(learner, attr, new)
        print(resume_line(self, cfg, learner), file=out, flush=True)

    def config_before(self) -> Config:
        """The settings the run had when the checkpoint was written."""
        fields = {f.name for f in dataclasses.fields(Config)}
        return Config(**{k: v for k, v in self.state["config"].items() if k in fields})


def resume_point(
    cfg: Config, resume: str, given: set[str], override: bool = False
) -> tuple[Config, ResumePoint | None]:
    """The config and checkpoint a run resumed with `--resume` goes on from.

    `resume` is 'auto' (the newest good checkpoint in --run-dir, or a fresh start there if it has
    none: a scheduler can rerun the same command), a run folder or a checkpoint file. The
    checkpoint's settings are the run's; `given` names those the user set (the values in `cfg`)
    and those that differ from the checkpoint's are refused (ConfigError, one line) unless
    `override`, except how long the run goes on and how it is logged (RESUME_FREE).
    """
    if resume == "auto":
        if cfg.run_dir is None:
            raise ConfigError(
                "--resume auto needs --run-dir: the folder to resume from (or to start in)"
            )
        run_dir = Path(cfg.run_dir)
        found = checkpoint.latest(run_dir) if run_dir.is_dir() else None
        if found is None:
            return cfg, None
        path, state = found
    else:
        path, state = checkpoint.find(Path(resume))
        run_dir = Path(resume) if Path(resume).is_dir() else checkpoint.run_dir_of(path)
        if cfg.run_dir is not None and Path(cfg.run_dir).resolve() != run_dir.resolve():
            raise ConfigError(
                f"--run-dir '{cfg.run_dir}' is not the folder of the run resumed ('{run_dir}'); "
                "a resumed run goes on in its own folder"
            )
    fields = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in state["config"].items() if k in fields}
    try:
        before = Config(**saved)
        after = Config(**{**saved, **{k: getattr(cfg, k) for k in given}, "run_dir": str(run_dir)})
    except TypeError as exc:
        raise ConfigError(
            f"checkpoint '{path}' holds settings this impala cannot read: {exc}"
        ) from None
    changed = [
        k
        for k in sorted(given)
        if k not in RESUME_FREE
        and getattr(after, k) != getattr(before, k)
        and not (k in SETTLED and getattr(after, k) == "auto")
    ]
    if changed and not override:
        what = ", ".join(
            f"{_flag(k)} {getattr(after, k)!r} (was {getattr(before, k)!r})" for k in changed
        )
        raise ConfigError(
            f"--resume: settings differ from the checkpoint's: {what}; drop them to resume as "
            "the run was, or add --override to change them"
        )
    # 'auto' is what the checkpoint's settled value came from (a run's config is settled)
    settled = {k: getattr(before, k) for k in SETTLED if k in given and getattr(after, k) == "auto"}
    if settled:
        after = dataclasses.replace(after, **settled)
    return after, ResumePoint(path, run_dir, state)


# Settings whose 'auto' a run resolves for its environment before it starts (`settle`): a
# checkpoint holds what they resolved to, which 'auto' given again stands for.
SETTLED = ("net", "obs_norm")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_line(point: ResumePoint, cfg: Config, learner=None) -> str:
    """What a resumed run says first: where it goes on from, and (given its `learner`) the
    learning rate it goes on with (see `impala.agent.schedules`)."""
    c = point.state["counters"]
    line = (
        f"resuming {point.run_dir} from {point.path.name}: {point.steps:,} steps, "
        f"{int(c.get('updates', 0)):,} updates, {float(c.get('seconds', 0.0)):.0f} s so far "
        f"(of {cfg.steps_total:,} steps)"
    )
    if learner is not None:
        line += "; " + schedules.describe("learning rate", learner.lr_schedule, point.steps)
        if cfg.algo == "vtrace" and cfg.entropy_schedule == "linear":
            line += "; " + schedules.describe("entropy cost", learner.entropy_schedule, point.steps)
    return line


def rewrite_config(cfg: Config, run_dir: Path, record: dict) -> None:
    """config.json of a resumed run: its settings now (a longer budget, say), atomically."""
    path = run_dir / "config.json"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(cfg.to_json(record) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder '{run_dir}': {exc.strerror}") from None


def summary_line(result: RunResult, run_dir: Path | None) -> str:
    ret = "-" if result.return_mean is None else f"{result.return_mean:.2f}"
    if result.task_returns:  # a multi-task run: each task's too
        ret += " (" + ", ".join(f"{t} {v:.2f}" for t, v in result.task_returns.items()) + ")"
    where = f"; model and logs in {run_dir}" if run_dir is not None else ""
    return (
        f"{'done' if result.signal is None else 'stopped'} ({result.stop_reason}): "
        f"{result.steps:,} steps, {result.updates:,} updates in {result.seconds:.1f} s "
        f"({result.steps_per_second:,.0f} steps/s); mean return of the last "
        f"{min(result.episodes, 100)} episodes {ret}{where}"
    )
