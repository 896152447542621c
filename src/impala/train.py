"""Running a training job: probe the environment, make the run folder, run the one learner loop
over the chosen runtime's batch source, and always end the same way: stop every process, save
the model and the logs, say why it ended.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch

from impala.config import Config
from impala.envs import EnvInfo, probe_env
from impala.errors import ConfigError, RunFailed
from impala.loop import BatchSource, Consensus, learn
from impala.metrics import RunResult, Tracker
from impala.shutdown import Interrupted, StopSignals

RUN_FILES = ("config.json", "metrics.jsonl", "model.pt")


def make_source(cfg: Config, env: EnvInfo, learner, tracker: Tracker) -> BatchSource:
    # Imported on demand: only the chosen runtime's machinery is loaded.
    if cfg.runtime == "serial":
        from impala.runtime.serial import SerialSource

        return SerialSource(cfg, env, learner, tracker)
    if cfg.runtime == "ray":
        from impala.runtime.ray_runtime import RaySource

        return RaySource(cfg, env, learner, tracker)
    from impala.runtime.local import LocalSource

    return LocalSource(cfg, env, learner, tracker)


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


def make_run_dir(cfg: Config, path: Path | None = None, extra: dict | None = None) -> Path:
    """Creates the run folder, `path` or `run_dir_path(cfg)`, with its config.json (the config
    and `extra`). ConfigError, one line, if it cannot be made or already holds a run: nothing
    already written is overwritten."""
    path = run_dir_path(cfg) if path is None else path
    try:
        path.mkdir(parents=True, exist_ok=True)
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
    """Written to a temporary name and renamed: a run killed mid-write leaves no torn file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def run_learner(
    cfg: Config,
    learner,
    source: BatchSource,
    tracker: Tracker,
    signals: StopSignals,
    run_dir: Path | None,
    consensus: Consensus | None = None,
    steps_total: int | None = None,
) -> None:
    """Starts `source`, learns until the run ends, then stops everything and saves, however it
    ended (a signal during start-up included). RunFailed and other errors propagate afterwards."""
    try:
        source.start()
        signals.install()  # again: Ray's init puts its own SIGTERM handler in place
        signals.defer()
        learn(
            learner,
            source,
            tracker,
            consensus,
            steps_total=steps_total if steps_total is not None else cfg.steps_total,
        )
    except Interrupted:
        pass  # a signal during start-up: stop and save like any other ending
    finally:
        signals.defer()  # the clean-up runs to its end; a second signal only hurries it
        if signals.requested:
            tracker.stop_reason = signals.reason
        try:
            source.close()
        finally:
            tracker.maybe_log(force=True)
            tracker.close()
            if run_dir is not None:
                save_model(learner.model, run_dir / "model.pt")


def train(
    cfg: Config, *, out: IO[str] | None = None, signals: StopSignals | None = None
) -> RunResult:
    """Trains as `cfg` says; writes config.json, metrics.jsonl and model.pt in the run folder.

    SIGINT and SIGTERM stop the run like its normal end (`result.signal` says which); a run that
    cannot go on raises RunFailed after the same clean-up. The caller's signal handlers and torch
    thread count are as before when this returns.
    """
    from impala.agent.factory import run_record, settle
    from impala.runtime.common import build_learner

    out = out if out is not None else sys.stdout
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env)
    run_dir = make_run_dir(cfg, extra=run_record(cfg, env))
    own_signals = signals is None
    signals = signals if signals is not None else StopSignals()
    with contextlib.ExitStack() as stack:
        if own_signals:
            stack.enter_context(signals)
        stack.enter_context(torch_threads(cfg.learner_threads))
        tracker = Tracker(cfg, run_dir, out, signals=signals)
        learner = build_learner(cfg, env, shared=cfg.runtime == "local")
        source = make_source(cfg, env, learner, tracker)
        try:
            run_learner(cfg, learner, source, tracker, signals, run_dir)
        except RunFailed as exc:
            raise RunFailed(f"{exc}; model and logs in {run_dir}") from None
    result = tracker.result()
    result.signal = signals.signum
    print(summary_line(result, run_dir), file=out, flush=True)
    return result


def summary_line(result: RunResult, run_dir: Path | None) -> str:
    ret = "-" if result.return_mean is None else f"{result.return_mean:.2f}"
    where = f"; model and logs in {run_dir}" if run_dir is not None else ""
    return (
        f"{'done' if result.signal is None else 'stopped'} ({result.stop_reason}): "
        f"{result.steps:,} steps, {result.updates:,} updates in {result.seconds:.1f} s "
        f"({result.steps_per_second:,.0f} steps/s); mean return of the last "
        f"{min(result.episodes, 100)} episodes {ret}{where}"
    )
