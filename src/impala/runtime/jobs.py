"""The seed prototype's job command lines, on Ray:

    impala -l HOST:PORT[,...] -e HOST:PORT[,...] -j learner|explorer -t INDEX [train options]

One process per task, started by hand in any order, on any hosts. Learner task 0 starts a Ray
head at its own address; every other task joins that cluster (on another host it first starts a
Ray node of its own there), checks that it was started with the same host lists and settings,
and waits, saying so, up to --peer-timeout for peers that are not up yet. Each learner task owns
a hub (its inbox and weights board, a Ray actor); explorers spread their unrolls over the hubs
round robin. Several learners train synchronously (`impala.runtime.collective`).

The parts: host lists (`hosts`), cluster membership and authentication (`cluster`), the
learner task (`job_learner`), the explorer task (`job_explorer`), the hub (`hub`).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from impala import config as config_mod
from impala.envs import probe_env
from impala.errors import ConfigError, RunFailed, exit_code_for_signal
from impala.runtime.cluster import Cluster
from impala.runtime.hosts import make_spec, reserve
from impala.shutdown import StopSignals


def run_from_args(args: dict[str, Any], signals: StopSignals, out: IO[str] | None = None) -> int:
    """Runs the task the job form's arguments describe; returns the process's exit code.

    ConfigError for bad input (one line, exit 2), RunFailed when the job cannot go on (exit 1).
    """
    from impala.agent.factory import run_record, settle
    from impala.lifecycle import make_run_dir, resume_point, rewrite_config, torch_threads
    from impala.runtime.common import keep_freed_memory
    from impala.runtime.job_explorer import run_explorer_task
    from impala.runtime.job_learner import run_learner_task

    out = out if out is not None else sys.stdout
    config_file = args.pop("config_file", None)
    if config_file is not None:  # its settings under the command line's (task index included)
        args, _ = config_mod.with_config_file(args, config_file)
    spec = make_spec(
        args.pop("learner_hosts"),
        args.pop("explorer_hosts"),
        args.pop("job_name"),
        args.get("task_index", 0),
    )
    peer_timeout = args.pop("peer_timeout")
    if peer_timeout <= 0:
        raise ConfigError(f"--peer-timeout must be positive, got {peer_timeout!r}")
    token_file = args.pop("auth_token_file", None)
    resume, override = args.pop("resume", None), args.pop("override", False)
    args["num_explorers"] = len(spec.explorers)  # the host list says how many there are
    if args.get("inference") not in (None, "explorers"):  # before checks it would fail
        raise ConfigError(
            "--inference server is for the local runtime (impala train); the job form's "
            "explorer tasks run the policy themselves: use --inference explorers"
        )
    cfg = config_mod.resolve(args)
    if cfg.value_norm == "popart" and len(spec.learners) > 1:
        raise ConfigError(
            "--value-norm popart with several learners is not supported yet (each learner's "
            "statistics would follow its own batches); use one learner"
        )
    if cfg.max_policy_lag is not None and len(spec.learners) > 1:
        raise ConfigError(
            "--max-policy-lag with several learners is not supported (a learner whose whole "
            "batch is stale would skip an update the others wait for); use one learner"
        )
    point = None
    if spec.job == "learner" and spec.task == 0 and resume is not None:
        # Learner 0 loads the checkpoint and hands it to the other learners; explorers ask
        # learner 0 how many steps were made before.
        cfg, point = resume_point(cfg, resume, set(args), override)
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env, learner=spec.job == "learner")
    if cfg.obs_norm == "on" and len(spec.learners) > 1:
        raise ConfigError(
            "--obs-norm with several learners is not supported yet (each learner's statistics "
            "would follow its own batches); use one learner or --obs-norm off"
        )
    reserve(*spec.own).close()  # this task's address: free and this machine's, or one line
    record = run_record(cfg, env)
    run_dir = None
    if point is not None:
        run_dir = point.run_dir
        rewrite_config(cfg, run_dir, record)
    elif spec.job == "learner":
        run_dir = make_run_dir(cfg, extra=record, restart=resume is not None)
    # One torch thread for an explorer (and the learner's setting for a learner): intra-op
    # threads that spin on cores the other processes need cost far more than they give.
    threads = cfg.learner_threads if spec.job == "learner" else 1
    if spec.job == "learner":
        keep_freed_memory()
    cluster = Cluster(spec, peer_timeout, out, token_file=token_file, run_dir=run_dir)
    with torch_threads(threads), cluster:
        signals.install()  # again: Ray's init puts its own SIGTERM handler in place
        import ray.exceptions

        try:
            if spec.job == "learner":
                run_learner_task(
                    cfg,
                    spec,
                    env,
                    peer_timeout=peer_timeout,
                    run_dir=run_dir,
                    signals=signals,
                    out=out,
                    point=point,
                    record=record,
                )
            else:
                run_explorer_task(
                    cfg, spec, env, peer_timeout=peer_timeout, signals=signals, out=out
                )
        except ray.exceptions.RayError as exc:  # a peer's node or actor went away
            raise RunFailed(
                f"{spec.name}: lost part of the job's Ray cluster ({_first_line(exc)})"
            ) from None
    return exit_code_for_signal(signals.signum) if signals.requested else 0


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]
