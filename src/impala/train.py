"""Running a training job: probe the environment, make the run folder, call the runtime."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import IO

import torch

from impala.config import Config
from impala.envs import probe_env
from impala.metrics import RunResult, Tracker


def _runtime(name: str):
    # Imported on demand: only the chosen runtime's machinery is loaded.
    if name == "serial":
        from impala.runtime import serial

        return serial.run
    if name == "ray":
        from impala.runtime import ray_runtime

        return ray_runtime.run
    from impala.runtime import local

    return local.run


def make_run_dir(cfg: Config) -> Path:
    if cfg.run_dir is not None:
        path = Path(cfg.run_dir)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{cfg.env.replace('/', '_')}-{stamp}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def train(cfg: Config, *, out: IO[str] | None = None) -> RunResult:
    """Trains as `cfg` says; writes config.json, metrics.jsonl and model.pt in the run folder."""
    out = out if out is not None else sys.stdout
    env = probe_env(cfg.env, max_episode_steps=cfg.max_steps_per_episode)
    run_dir = make_run_dir(cfg)
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    tracker = Tracker(cfg, run_dir, out)
    try:
        model = _runtime(cfg.runtime)(cfg, env, tracker)
        tracker.maybe_log(force=True)
    finally:
        tracker.close()
    torch.save(model.state_dict(), run_dir / "model.pt")
    result = tracker.result()
    ret = "-" if result.return_mean is None else f"{result.return_mean:.2f}"
    print(
        f"done ({result.stop_reason}): {result.steps:,} steps, {result.updates:,} updates in "
        f"{result.seconds:.1f} s ({result.steps_per_second:,.0f} steps/s); mean return of the "
        f"last {min(result.episodes, 100)} episodes {ret}; run folder {run_dir}",
        file=out,
        flush=True,
    )
    return result
