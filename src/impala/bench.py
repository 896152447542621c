"""`impala bench`: the random-policy ceiling and the training throughput, in one run.

The ceiling is what the same number of explorer processes, each stepping the same vector of
environments, reach with uniformly random actions and nothing else (no network, no learner, no
copying). Training throughput is env steps consumed per second by a real training run, measured
after a warm-up. Memory is the proportional set size (shared pages counted once) of the learner
and its explorer processes, sampled every 2 s during the measured part of training (reading a
process's PSS walks its page tables: sampled every second it took 5% of the learner's CPU).
Beside them: the learner's updates per second over the same window, its device, and with the
learner on a GPU that GPU's utilisation (NVML's busy percentage, sampled with the memory; not
applicable on the CPU, not readable without the `nvidia-ml-py` bindings).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

import gymnasium as gym
import numpy as np
import psutil
import torch
import torch.multiprocessing as mp

from impala.agent.factory import settle
from impala.config import Config
from impala.devices import gpu_utilization, resolve_device
from impala.envs import make_vector_env, probe_env
from impala.envs.factory import task_ids
from impala.errors import RunFailed
from impala.lifecycle import check_run_dir
from impala.runtime.common import describe_exit
from impala.shutdown import StopSignals
from impala.training import train


def _random_worker(cfg: Config, index: int, seconds: float, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    tasks = task_ids(cfg.env)  # a multi-task run: explorer `index` plays task index % K
    vec = make_vector_env(tasks[index % len(tasks)], cfg.envs_per_explorer, **cfg.env_options)
    try:
        vec.reset(seed=cfg.seed + index)
        rng = np.random.default_rng(cfg.seed + index)
        space = vec.single_action_space
        if isinstance(space, gym.spaces.Discrete):
            n = int(space.n)

            def random_actions():
                return rng.integers(0, n, size=cfg.envs_per_explorer)
        else:  # continuous or multi-discrete actions: the space's own uniform sampling
            vec.action_space.seed(cfg.seed + index)
            random_actions = vec.action_space.sample
        steps, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            for _ in range(16):
                vec.step(random_actions())
            steps += 16 * cfg.envs_per_explorer
        results.send(steps / (time.monotonic() - start))
    finally:
        vec.close()
        results.close()


def random_ceiling(cfg: Config, seconds: float) -> float:
    """Env steps/s of `num_explorers` processes acting at random, all running at once."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(cfg.num_explorers)]
    procs = [
        ctx.Process(target=_random_worker, args=(cfg, i, seconds, writer), daemon=True)
        for i, (_, writer) in enumerate(pipes)
    ]
    rates = []
    try:
        for proc, (_, writer) in zip(procs, pipes, strict=True):
            proc.start()
            writer.close()
        for proc, (reader, _) in zip(procs, pipes, strict=True):
            if not reader.poll(seconds + 120):
                raise RunFailed(f"a random-policy worker sent nothing within {seconds + 120:.0f} s")
            try:
                rates.append(reader.recv())
            except EOFError:
                proc.join()
                raise RunFailed(
                    f"a random-policy worker on {cfg.env} {describe_exit(proc.exitcode)}"
                ) from None
    finally:
        for proc in procs:
            if proc.pid is None:
                continue
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for reader, _ in pipes:
            reader.close()
    return float(sum(rates))


def tree_rss_mib(root: psutil.Process) -> float:
    """Memory of `root` and all its descendants, in MiB: their proportional set size (PSS),
    which counts a shared page (the shared-memory slots, the parameter store, shared libraries)
    once in all, not once per process that touched it as the sum of RSS does."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def memory_growth(samples: list[float]) -> float:
    """Growth of memory over a run: the median of the last third of the samples against the
    median of the first third. A learner's memory swings by its transient batch tensors (the
    float copy of a batch of frames, activations), so two single samples would mostly measure
    where in an update each was taken."""
    third = max(1, len(samples) // 3)
    return float(np.median(samples[-third:]) / np.median(samples[:third]) - 1)


MEMORY_SAMPLE_SECONDS = 2.0


class _MemorySampler(threading.Thread):
    """Samples the memory of this process and its children every `MEMORY_SAMPLE_SECONDS`, and
    the utilisation of the learner's GPU (`gpu_samples`; none for a CPU learner or without
    NVML)."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__(daemon=True, name="impala-memory-sampler")
        self.samples: list[tuple[float, float]] = []
        self.gpu_samples: list[tuple[float, float]] = []
        self.device = device
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        start = time.monotonic()
        while not self._stop_event.wait(MEMORY_SAMPLE_SECONDS):
            self.samples.append((time.monotonic() - start, tree_rss_mib(me)))
            busy = gpu_utilization(self.device) if self.device is not None else None
            if busy is not None:
                self.gpu_samples.append((time.monotonic() - start, busy))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def window_rates(records: list[dict], warmup: float) -> tuple[float, float] | None:
    """Env steps and learner updates per second over the metrics `records` taken after
    `warmup` seconds (from the first such record to the last); None with fewer than two."""
    measured = [r for r in records if r["time"] >= warmup]
    if len(measured) < 2 or measured[-1]["time"] <= measured[0]["time"]:
        return None
    first, last = measured[0], measured[-1]
    seconds = last["time"] - first["time"]
    updates = last.get("updates", 0) - first.get("updates", 0)
    return (last["steps"] - first["steps"]) / seconds, updates / seconds


def bench(
    cfg: Config,
    *,
    seconds: float = 20.0,
    warmup: float = 5.0,
    ceiling_seconds: float | None = None,
    out: IO[str] | None = None,
    signals: StopSignals | None = None,
) -> dict:
    """Prints and returns the ceiling, the training throughput, their ratio and memory figures.

    Training runs `warmup + seconds`; the ceiling is measured for `ceiling_seconds` (default
    `seconds`) in two halves, before and after training, and averaged. A stop signal during
    training ends the bench early (`figures["signal"]`).
    """
    out = out if out is not None else sys.stdout
    settle(cfg, probe_env(cfg.env, **cfg.env_options))  # bad ids, nets, devices: one line
    check_run_dir(cfg)  # before the ceiling's minute, not after it
    ceiling_seconds = seconds if ceiling_seconds is None else ceiling_seconds
    print(
        f"random-policy ceiling: {cfg.num_explorers} processes x {cfg.envs_per_explorer} "
        f"envs of {cfg.env}, {ceiling_seconds / 2:.0f} s before and after training ...",
        file=out,
        flush=True,
    )
    # Half before and half after training: a machine whose speed drifts (shared hosts do)
    # biases neither side of the ratio.
    ceiling_before = random_ceiling(cfg, ceiling_seconds / 2)
    print(f"training for {warmup:.0f} s warm-up + {seconds:.0f} s ...", file=out, flush=True)
    train_cfg = dataclasses.replace(
        cfg,
        max_seconds=warmup + seconds,
        total_steps=10**12,
        target_return=None,
        lr_schedule="constant",
        log_interval=min(cfg.log_interval, 1.0),
    )
    device = resolve_device(cfg.device)
    sampler = _MemorySampler(device)
    sampler.start()
    try:
        result = train(train_cfg, out=out, signals=signals)
    finally:
        sampler.stop()
    ceiling_after = ceiling_before
    if result.signal is None:
        ceiling_after = random_ceiling(cfg, ceiling_seconds / 2)
    ceiling = (ceiling_before + ceiling_after) / 2
    records = [json.loads(line) for line in open(f"{result.run_dir}/metrics.jsonl")]
    rates = window_rates(records, warmup)
    if rates is not None:
        throughput, updates_per_second = rates
    else:
        throughput = result.steps_per_second
        updates_per_second = result.updates / result.seconds if result.seconds else 0.0
    mem = [m for t, m in sampler.samples if warmup <= t <= warmup + seconds]
    busy = [b for t, b in sampler.gpu_samples if warmup <= t <= warmup + seconds]
    figures = {
        "env": cfg.env,
        "explorers": cfg.num_explorers,
        "envs_per_explorer": cfg.envs_per_explorer,
        "random_ceiling_steps_per_s": round(ceiling, 1),
        "random_ceiling_before_after": [round(ceiling_before, 1), round(ceiling_after, 1)],
        "training_steps_per_s": round(throughput, 1),
        "ratio": round(throughput / ceiling, 4) if ceiling else None,
        "learner_device": device.type,
        "learner_updates_per_s": round(updates_per_second, 2),
        "gpu_utilization_percent": round(float(np.mean(busy)), 1) if busy else None,
        "memory_mib_after_warmup": round(mem[0], 1) if mem else None,
        "memory_mib_end": round(mem[-1], 1) if mem else None,
        "memory_mib_max": round(max(mem), 1) if mem else None,
        "memory_growth": round(memory_growth(mem), 4) if mem else None,
        "signal": result.signal,
    }
    print(
        f"random-policy ceiling  {ceiling:>12,.0f} env steps/s (before {ceiling_before:,.0f}, "
        f"after {ceiling_after:,.0f})",
        file=out,
    )
    print(f"training throughput    {throughput:>12,.0f} env steps/s", file=out)
    print(f"ratio                  {throughput / ceiling:>12.1%}", file=out)
    print(f"learner updates        {updates_per_second:>12,.2f} /s on {device.type}", file=out)
    print(f"GPU utilisation        {_gpu_line(device, busy)}", file=out)
    if mem:
        print(
            f"memory (PSS, all processes) {mem[0]:,.0f} MiB after warm-up, {mem[-1]:,.0f} MiB "
            f"at the end, {max(mem):,.0f} MiB max; last third against first third "
            f"{figures['memory_growth']:+.1%}",
            file=out,
        )
    (Path(result.run_dir) / "bench.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures), file=out, flush=True)
    return figures


def _gpu_line(device: torch.device, busy: list[float]) -> str:
    """The GPU utilisation line's value: the mean of the samples, or why there is none."""
    if device.type != "cuda":
        return "         n/a (the learner is on the CPU)"
    if not busy:
        return "         n/a (not readable: install nvidia-ml-py for NVML)"
    return f"{np.mean(busy):>11.0f}% (mean of {len(busy)} samples, learner's GPU)"
