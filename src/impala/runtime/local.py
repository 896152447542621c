"""The single-machine runtime: explorer processes and a learner, joined by shared memory.

As in TorchBeast's monobeast, unroll slots are pre-allocated in shared memory and passed by index:
an explorer takes a free slot index, writes an unroll into it and hands the index to the learner
through the full queue; the learner gathers whole batches, copies them out and frees the slots.
With the seed's replay buffer, explorers instead upload into their own slice of a shared buffer
that the learner samples. Weights travel through a shared parameter store with a version.

Shared tensors are handed to the spawned processes as file descriptors (torch.multiprocessing),
so no named segment exists that could outlive the run. Every process started here is stopped
here, on success, on error and on Ctrl-C (explorers ignore SIGINT and wait for the learner).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from impala.agent import (
    ParameterStore,
    ReplayBuffer,
    ReplayStaging,
    UnrollInfo,
    rollout_spec,
)
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.config import Config
from impala.envs import EnvInfo
from impala.metrics import Tracker
from impala.runtime import common

_POLL = 0.05  # seconds between checks of the stop flag while blocked on a queue
MAX_RESTARTS = 10


@dataclasses.dataclass
class _Shared:
    """Everything an explorer process needs to reach the learner."""

    params: tuple[torch.Tensor, torch.Tensor]
    storage: dict[str, torch.Tensor]
    free_queue: Any
    full_queue: Any
    stats_queue: Any
    stop: Any
    replay_filled: torch.Tensor | None
    replay_seq: torch.Tensor | None
    holding: torch.Tensor  # [num_explorers]: the slot each explorer is writing, or -1


class _FifoSink:
    """An explorer's end of the FIFO: take a free slot, fill it, hand it to the learner."""

    def __init__(self, shared: _Shared, index: int) -> None:
        self.shared = shared
        self.index = index
        self.slot: int | None = None

    def next_slot(self):
        while not self.shared.stop.is_set():
            try:
                self.slot = self.shared.free_queue.get(timeout=_POLL * 4)
            except queue.Empty:
                continue
            if self.slot is None:
                return None
            # Recorded so that the learner can take the slot back if this process dies.
            self.shared.holding[self.index] = self.slot
            return numpy_views(self.shared.storage, self.slot)
        return None

    def commit(self, episodes_finished: int) -> None:
        # Cleared before the hand-over: dying in between loses one slot, never hands it out twice.
        self.shared.holding[self.index] = -1
        self.shared.full_queue.put(self.slot)
        self.slot = None


def _explorer_main(
    cfg: Config, env: EnvInfo, index: int, budget: int, shared: _Shared, parent: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner decides when explorers stop
    torch.set_num_threads(1)
    store = ParameterStore(*shared.params)
    explorer = common.build_explorer(cfg, env, index, store)
    if cfg.buffer == "replay":
        slots = cfg.replay_slots_per_explorer
        buffer = ReplayBuffer(shared.storage, shared.replay_filled, slots, shared.replay_seq)
        spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
        sink: Any = ReplayStaging(spec, slots, index, buffer, cfg.upload_frequency)
    else:
        sink = _FifoSink(shared, index)
    made = 0
    try:
        while made < budget and not shared.stop.is_set() and os.getppid() == parent:
            out = sink.next_slot()
            if out is None:
                break
            info = explorer.fill(out)
            sink.commit(len(info.episode_returns))
            made += info.steps
            shared.stats_queue.put(info)
        shared.stats_queue.put(UnrollInfo(index, 0, [], [], explorer.version, finished=True))
    finally:
        explorer.vec_env.close()


class _Explorers:
    """The explorer processes: start, watch (restart the dead), stop."""

    def __init__(self, ctx, cfg: Config, env: EnvInfo, shared: _Shared, out) -> None:
        self.ctx, self.cfg, self.env, self.shared, self.out = ctx, cfg, env, shared, out
        self.budget = common.explorer_budget(cfg)
        self.made = [0] * cfg.num_explorers
        self.procs: list[Any] = [None] * cfg.num_explorers
        self.restarts = 0

    def start(self, index: int) -> None:
        proc = self.ctx.Process(
            target=_explorer_main,
            args=(
                self.cfg,
                self.env,
                index,
                self.budget - self.made[index],
                self.shared,
                os.getpid(),
            ),
            name=f"impala-explorer-{index}",
            daemon=True,
        )
        proc.start()
        self.procs[index] = proc

    def start_all(self) -> None:
        for i in range(self.cfg.num_explorers):
            self.start(i)

    def check(self, finished: set[int]) -> None:
        """Restarts explorers that died before finishing their steps."""
        for i, proc in enumerate(self.procs):
            if i in finished or proc.is_alive() or proc.exitcode is None:
                continue
            if self.restarts >= MAX_RESTARTS:
                raise RuntimeError(f"explorer {i} died (exit code {proc.exitcode}) too often")
            self.restarts += 1
            print(
                f"explorer {i} died (exit code {proc.exitcode}); restarting it",
                file=self.out,
                flush=True,
            )
            proc.join()
            lost_slot = int(self.shared.holding[i])
            if lost_slot >= 0:  # the unroll it was writing is dropped; the slot is reused
                self.shared.holding[i] = -1
                self.shared.free_queue.put(lost_slot)
            self.start(i)

    def stop(self) -> None:
        self.shared.stop.set()
        for _ in self.procs:
            self.shared.free_queue.put(None)
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def run(cfg: Config, env: EnvInfo, tracker: Tracker) -> nn.Module:
    ctx = mp.get_context("spawn")
    learner = common.build_learner(cfg, env, shared=True)
    model, store = learner.model, learner.store
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    replay = cfg.buffer == "replay"
    if replay:
        slots = cfg.replay_slots_per_explorer
        num_slots = slots * cfg.num_explorers
    else:
        # Two unrolls in flight per explorer plus two batches queued keeps everyone busy.
        num_slots = 2 * cfg.num_explorers + 2 * cfg.slots_per_batch
    storage = allocate(spec, num_slots, shared=True)
    shared = _Shared(
        params=store.tensors,
        storage=storage,
        free_queue=ctx.Queue(),
        full_queue=ctx.Queue(),
        stats_queue=ctx.Queue(),
        stop=ctx.Event(),
        replay_filled=torch.zeros(cfg.num_explorers, dtype=torch.int64).share_memory_()
        if replay
        else None,
        replay_seq=torch.zeros(cfg.num_explorers, dtype=torch.int64).share_memory_()
        if replay
        else None,
        holding=torch.full((cfg.num_explorers,), -1, dtype=torch.int64).share_memory_(),
    )
    if replay:
        buffer = ReplayBuffer(storage, shared.replay_filled, slots, shared.replay_seq)
    else:
        for slot in range(num_slots):
            shared.free_queue.put(slot)
    generator = torch.Generator().manual_seed(cfg.seed)
    explorers = _Explorers(ctx, cfg, env, shared, tracker.out)
    pending: list[int] = []
    try:
        explorers.start_all()
        last_check = time.monotonic()
        while not tracker.should_stop():
            _drain_stats(shared.stats_queue, tracker, explorers)
            all_done = len(tracker.finished_explorers) == cfg.num_explorers
            if time.monotonic() - last_check > 0.5:
                explorers.check(tracker.finished_explorers)
                last_check = time.monotonic()
            if replay:
                if all_done:
                    break
                batch = buffer.sample(cfg.learn_batch_size, cfg.algo, generator)
                if batch is None:
                    time.sleep(_POLL)
                    continue
            else:
                try:
                    pending.append(shared.full_queue.get(timeout=_POLL))
                except queue.Empty:
                    if all_done:
                        if pending:  # the last, partial batch
                            batch = slots_to_batch(storage, pending, cfg.algo)
                            pending = []
                            tracker.on_update(learner.update(batch, common.progress(tracker, cfg)))
                        break
                    continue
                if len(pending) < cfg.slots_per_batch:
                    continue
                batch = slots_to_batch(storage, pending, cfg.algo)
                for slot in pending:
                    shared.free_queue.put(slot)
                pending = []
            tracker.on_update(learner.update(batch, common.progress(tracker, cfg)))
            tracker.maybe_log()
        _drain_stats(shared.stats_queue, tracker, explorers)
    finally:
        explorers.stop()
        for q in (shared.free_queue, shared.full_queue, shared.stats_queue):
            q.cancel_join_thread()
            q.close()
    return model


def _drain_stats(stats_queue, tracker: Tracker, explorers: _Explorers) -> None:
    while True:
        try:
            info: UnrollInfo = stats_queue.get_nowait()
        except queue.Empty:
            return
        explorers.made[info.explorer] += info.steps
        tracker.on_unroll(info)
