"""`impala train`: probe the environment, make the run folder, and run the learner over the
chosen single-machine runtime's batch source (serial, local or Ray) through the run's life cycle
(`impala.lifecycle`: one way of ending, checkpoints, resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import IO

from impala.callbacks import Hooks
from impala.config import Config
from impala.envs import EnvInfo, probe_env
from impala.errors import RunFailed
from impala.lifecycle import (
    Checkpointer,
    make_run_dir,
    resume_point,
    rewrite_config,
    run_learner,
    summary_line,
    torch_threads,
)
from impala.loop import BatchSource
from impala.metrics import RunResult, Tracker
from impala.shutdown import StopSignals


def make_source(
    cfg: Config, env: EnvInfo, learner, tracker: Tracker, steps_before: int = 0
) -> BatchSource:
    """The runtime's batch source (`steps_before`: env steps a resumed run made before)."""
    # Imported on demand: only the chosen runtime's machinery is loaded.
    if cfg.runtime == "serial":
        from impala.runtime.serial import SerialSource

        return SerialSource(cfg, env, learner, tracker)
    if cfg.runtime == "ray":
        from impala.runtime.ray_runtime import RaySource

        return RaySource(cfg, env, learner, tracker, steps_before)
    from impala.runtime.local import LocalSource

    return LocalSource(cfg, env, learner, tracker, steps_before)


def resolved_settings(cfg: Config) -> dict[str, str]:
    """What the settings that may be 'auto' resolve to for `cfg`'s environment on this machine:
    the network and observation normalisation (as the run's config.json will record them), and
    the learner's device and arithmetic. ConfigError, one line, where the run would fail on them
    (an environment that cannot be made, a network that does not fit it, CUDA without a GPU)."""
    from impala.agent.factory import build_model, explorer_bf16, settle
    from impala.agent.learner import resolve_device, uses_bf16

    env = probe_env(cfg.env, **cfg.env_options)
    settled = settle(cfg, env)
    device = resolve_device(cfg.device)
    model = build_model(settled, env)
    bf16 = uses_bf16(cfg.precision, model, device)
    return {
        "net": settled.net,
        "obs_norm": settled.obs_norm,
        "device": device.type,
        "precision": "bf16" if bf16 else "fp32",
        "explorer_precision": "bf16" if explorer_bf16(settled, model) else "fp32",
    }


def train(
    cfg: Config,
    *,
    out: IO[str] | None = None,
    signals: StopSignals | None = None,
    resume: str | None = None,
    given: set[str] | None = None,
    override: bool = False,
    hooks: Hooks | None = None,
) -> RunResult:
    """Trains as `cfg` says; writes config.json, metrics.jsonl, TensorBoard scalars, checkpoints
    and model.pt in the run folder. With `resume` ('auto', a run folder or a checkpoint file,
    see `resume_point`) the run goes on from its checkpoint: counters, the learning-rate
    schedule, logs and curves continue; the serial runtime continues exactly.

    SIGINT and SIGTERM stop the run like its normal end (`result.signal` says which); a run that
    cannot go on raises RunFailed after the same clean-up. The caller's signal handlers and torch
    thread count are as before when this returns. `hooks` calls the Python API's callbacks (see
    `impala.callbacks`); a stop they ask for ends the run like its time limit.
    """
    from impala.agent.factory import run_record, settle
    from impala.runtime.common import build_learner, keep_freed_memory

    out = out if out is not None else sys.stdout
    point = None
    if resume is not None:
        cfg, point = resume_point(cfg, resume, given or set(), override)
    if cfg.wandb:  # before anything is made: the install line, not a half-made run folder
        from impala.wandb_tracker import require_wandb

        require_wandb()
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env)
    if cfg.runtime == "local":
        from impala.runtime.local import check_machine

        check_machine(cfg, env)
    record = run_record(cfg, env)
    if point is not None:
        run_dir = point.run_dir
        rewrite_config(cfg, run_dir, record)
    else:
        run_dir = make_run_dir(cfg, extra=record, restart=resume == "auto")
    done_before = int(point.state["counters"]["steps"]) if point else 0
    own_signals = signals is None
    signals = signals if signals is not None else StopSignals()
    with contextlib.ExitStack() as stack:
        if own_signals:
            stack.enter_context(signals)
        stack.enter_context(torch_threads(cfg.learner_threads))
        keep_freed_memory()
        resume_counters = point.tracker_state() if point is not None else None
        tracker = Tracker(cfg, run_dir, out, signals=signals, resume=resume_counters, hooks=hooks)
        stack.callback(tracker.close)  # also when the run fails before it starts (idempotent)
        learner = build_learner(cfg, env, shared=cfg.runtime == "local")
        source_state = None
        source_cfg = cfg
        if point is not None:
            point.restore(learner, cfg, out)
            if cfg.runtime == "serial":
                source_state = point.state.get("source") or None
            elif cfg.steps_total > done_before:
                # Explorers in new processes make what is left of the budget.
                source_cfg = dataclasses.replace(cfg, total_steps=cfg.steps_total - done_before)
        if done_before >= cfg.steps_total:
            tracker.stop_reason = "step budget (reached before this resume)"
            tracker.close()
        else:
            source = make_source(source_cfg, env, learner, tracker, done_before)
            checkpointer = Checkpointer(cfg, run_dir, learner, tracker, source, record)
            try:
                run_learner(
                    cfg,
                    learner,
                    source,
                    tracker,
                    signals,
                    run_dir,
                    checkpointer=checkpointer,
                    source_state=source_state,
                )
            except RunFailed as exc:
                raise RunFailed(f"{exc}; model and logs in {run_dir}") from None
    result = tracker.result()
    result.signal = signals.signum
    print(summary_line(result, run_dir), file=out, flush=True)
    return result
