"""The single-machine runtime: explorer processes and the learner, joined by shared memory.

As in TorchBeast's monobeast, unroll slots are pre-allocated in shared memory and passed by
index, here through a lock-free `SlotBoard` (see `impala.runtime.slots`): nothing is shared that
an explorer killed at any instant could hold. With the seed's replay buffer, explorers upload into
their own slice of a shared buffer that the learner samples (per-slice sequence counters, no
lock). Weights travel through the shared parameter store (a seqlock).

Each explorer process has its own pipe to the learner for its reports (steps, finished episodes,
or the error that killed it); a replacement gets a new pipe, and a pipe whose writer died reads
as closed. Explorers die with the learner even when it is SIGKILLed (a parent-death signal, and a
parent check in every wait). Shared tensors reach the spawned processes as file descriptors, so
no named segment exists that could outlive the run.

With `--inference server` one more process, the inference server, runs the policy for all
explorers (dynamic batching, see `impala.runtime.inference`); it is watched and restarted like
an explorer, within the same restart budget.
"""

from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing.connection
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from impala import faults
from impala.agent import (
    Learner,
    ParameterStore,
    ReplayBuffer,
    ReplayRate,
    ReplayStaging,
    UnrollInfo,
)
from impala.agent.buffer import allocate, numpy_views, rollout_spec
from impala.agent.experience import Experience
from impala.config import Config
from impala.envs import EnvInfo
from impala.errors import ConfigError
from impala.loop import Batch
from impala.runtime import common
from impala.runtime.inference import StopExploring
from impala.runtime.restarts import RestartBudget
from impala.runtime.slots import SlotBoard, SlotQueue

CHECK_INTERVAL = 0.2  # seconds between looks at the explorer processes
STOP_GRACE = 2.0  # seconds explorers get to finish their unroll and exit before SIGTERM
START_GRACE = 120.0  # seconds an explorer's start-up may take at least (see --explorer-timeout)


def _die_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """Asks Linux to send `signum` (SIGKILL, unless the process has clean-up of its own to do)
    to this process when its parent dies (checked: works here); the parent check in every wait
    covers other systems and the instant before this call."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


class _SlotSink:
    """An explorer's end of the FIFO: a free slot of its own, filled, handed to the learner."""

    def __init__(self, board: SlotBoard, storage: dict[str, torch.Tensor], index: int) -> None:
        self.board, self.storage, self.index = board, storage, index
        self.slot = -1
        self.serial = (os.getpid() << 24) % (1 << 62)

    def next_slot(self, go_on) -> dict | None:
        def waiting() -> bool:
            self.board.beat(self.index)  # waiting for the learner is progress too
            return go_on()

        slot = self.board.take(self.index, waiting)
        if slot is None:
            return None
        self.slot = slot
        self.serial += 1
        self.board.begin(slot, self.serial)
        return numpy_views(self.storage, slot)

    def commit(self, info: UnrollInfo) -> None:
        if faults.due("slot-torn"):
            self.board.publish_torn(self.slot)
            faults.die()
        faults.point("slot-write")  # tests: killed with the unroll written, not handed on
        self.board.commit(self.index, self.slot, self.serial, info.steps)


class _ReplaySink:
    """An explorer's end of the seed's replay buffer: its local buffer, uploaded every -f
    episodes into its own slice; it waits while the learner is a buffer's worth behind."""

    def __init__(
        self, staging: ReplayStaging, board: SlotBoard, index: int, rate: ReplayRate
    ) -> None:
        self.staging, self.board, self.index, self.rate = staging, board, index, rate

    def next_slot(self, go_on) -> dict | None:
        board, replay = self.board, self.staging.buffer
        while not self.rate.explorers_may_act(board.made_in_total(), board.sampled_steps()):
            board.beat(self.index)  # waiting for the learner is progress too
            if replay.num_readable() == 0 or not go_on():
                break  # nothing the learner could sample: it cannot catch up without us
            time.sleep(1e-3)
        return self.staging.next_slot() if go_on() else None

    def commit(self, info: UnrollInfo) -> None:
        self.staging.commit(len(info.episode_returns))
        self.board.add_steps(self.index, info.steps)


def _explorer_main(
    cfg: Config,
    env: EnvInfo,
    index: int,
    budget: int,
    start: tuple[int, int],
    shared: dict[str, Any],
    conn: multiprocessing.connection.Connection,
    parent: int,
) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner decides when explorers stop
    torch.set_num_threads(1)
    os.nice(cfg.explorer_nice)  # the learner first: it sets the pace (see Config.explorer_nice)
    board: SlotBoard = shared["board"]
    explorer = policy = None

    def go_on() -> bool:
        return not board.stopping and os.getppid() == parent

    try:
        if shared["inference"] is not None:  # --inference server: it acts for us
            from impala.runtime.inference import ServerPolicy

            layout, buffers, address, authkey = shared["inference"]
            beat = functools.partial(board.beat, index)
            policy = ServerPolicy(index, env, layout, buffers, address, authkey, go_on, beat)
        explorer = common.build_explorer(
            cfg, env, index, ParameterStore(*shared["params"]), start=start, policy=policy
        )
        explorer.heartbeat = functools.partial(board.beat, index)
        board.beat(index)
        if shared["replay"] is not None:
            shared["replay"].claim(index)  # a predecessor may have died mid-upload
            spec = rollout_spec(
                env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size
            )
            staging = ReplayStaging(
                spec, cfg.replay_slots_per_explorer, index, shared["replay"], cfg.upload_frequency
            )
            rate = ReplayRate(cfg.replay_ratio, cfg.replay_slack)
            sink: Any = _ReplaySink(staging, board, index, rate)
        else:
            sink = _SlotSink(board, shared["storage"], index)
        while board.made_by(index) < budget and go_on():
            faults.point("hang")  # tests and the chaos check: an explorer that hangs
            out = sink.next_slot(go_on)
            if out is None:
                break
            info = explorer.fill(out)
            sink.commit(info)
            conn.send(info)
    except StopExploring:
        pass  # the run stops while the inference server was to answer
    except BaseException as exc:  # noqa: BLE001 - reported to the learner, which decides
        common.report_and_exit(conn, exc)
    finally:
        if explorer is not None:
            explorer.vec_env.close()
        if policy is not None:
            policy.close()
        conn.close()


class LocalSource:
    """Explorer processes on this machine, as a `BatchSource` (see `impala.loop`): the transport
    (processes, shared slots, reports, restarts, liveness) around the shared `Experience`.

    `steps_before`: env steps a resumed run made before (its explorers get seeds of their own)."""

    def __init__(
        self, cfg: Config, env: EnvInfo, learner: Learner, tracker, steps_before: int = 0
    ) -> None:
        self.cfg, self.env, self.learner = cfg, env, learner
        self.out = tracker.out
        self.run_dir: Path | None = tracker.run_dir
        self.budget = common.explorer_budget(cfg)
        self.steps_before = steps_before
        n = cfg.num_explorers
        self.procs: list[Any] = [None] * n
        self.conns: list[Any] = [None] * n
        self.failures: list[common.ExplorerFailure | None] = [None] * n
        self.restarts = RestartBudget(cfg.max_restarts, cfg.restart_window)
        self.counters = {"explorer_restarts": 0, "torn_unrolls": 0}
        self._infos: list[UnrollInfo] = []
        self._reported = [0] * n  # env steps in the reports read from each explorer (slot)
        self._starts = [0] * n  # times each explorer was started again
        self._started_at = [0] * n  # when each explorer process was started (monotonic ns)
        self._next_check = 0.0
        self._ctx = mp.get_context("spawn")
        self.board: SlotBoard | None = None
        self.storage: dict[str, torch.Tensor] = {}
        self.replay: ReplayBuffer | None = None
        self.queue: SlotQueue | None = None
        self.experience: Experience | None = None
        self.server: Any = None  # --inference server: its InferenceServer

    # --- starting ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        spec = rollout_spec(
            self.env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size
        )
        per_explorer = slots_per_explorer(cfg)
        try:
            self._allocate(spec, per_explorer)
        except RuntimeError as exc:  # checked at start (check_machine); another process took it
            if "shared memory" not in str(exc):
                raise
            raise ConfigError(shm_message(shared_bytes(cfg, self.env), None)) from None
        if cfg.inference == "server":
            from impala.runtime.inference import InferenceServer

            self.server = InferenceServer(
                cfg,
                self.env,
                self.learner.store.tensors,
                self.out,
                self.restarts,
                self._ctx,
                self._keep_trace,
            )
            self.server.start()
            self.counters.update(self.server.counters())
        for i in range(cfg.num_explorers):
            self._start(i)

    def _allocate(self, spec, per_explorer: int) -> None:
        cfg = self.cfg
        self.board = SlotBoard(cfg.num_explorers, per_explorer)
        generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.buffer == "replay":
            self.replay = ReplayBuffer.allocate(spec, cfg.num_explorers, per_explorer, shared=True)
            self.storage = self.replay.storage
            self.experience = Experience(cfg, replay=self.replay, generator=generator)
        else:
            self.storage = allocate(spec, cfg.num_explorers * per_explorer, shared=True)
            self.queue = SlotQueue(self.board, self.storage, cfg.algo)
            self.experience = Experience(cfg, queue=self.queue, generator=generator)

    def _start(self, index: int) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        shared = {
            "board": self.board,
            "storage": self.storage,
            "replay": self.replay,
            "params": self.learner.store.tensors,
            "inference": self.server.client(index) if self.server is not None else None,
        }
        start = (self.steps_before, self._starts[index])
        self.board.reset_beat(index)
        self._started_at[index] = time.monotonic_ns()
        proc = self._ctx.Process(
            target=_explorer_main,
            args=(self.cfg, self.env, index, self.budget, start, shared, writer, os.getpid()),
            name=f"impala-explorer-{index}",
            daemon=True,
        )
        self.procs[index], self.conns[index] = proc, reader  # before start: close() sees it
        try:
            proc.start()
        finally:
            writer.close()  # ours: the pipe must read as closed once the explorer is gone

    # --- the loop's side -----------------------------------------------------------------------
    def next_batch(self, timeout: float) -> Batch | None:
        deadline = time.monotonic() + timeout
        while True:
            self._read_reports()
            batch = self._take_batch()
            remaining = deadline - time.monotonic()
            if batch is not None or remaining <= 0:
                return batch
            live = [c for c in self.conns if c is not None]
            if live:  # a report comes with every unroll: wake up when one arrives
                multiprocessing.connection.wait(live, timeout=min(remaining, 0.01))
            else:
                time.sleep(min(remaining, 0.01))

    def _take_batch(self) -> Batch | None:
        batch = self.experience.next_batch(self.board.made_in_total(), self._all_made())
        if self.replay is not None:
            self.board.set_sampled_steps(self.experience.sampled)  # explorers read it
        else:
            self.counters["torn_unrolls"] = self.queue.torn
        return batch

    def _read_reports(self) -> None:
        for i, conn in enumerate(self.conns):
            if conn is None:
                continue
            try:
                while conn.poll():
                    message = conn.recv()
                    if isinstance(message, common.ExplorerFailure):
                        self.failures[i] = message
                    else:
                        self._infos.append(message)
                        self._reported[i] += message.steps
            except (EOFError, OSError):  # the explorer is gone; check() decides what next
                conn.close()
                self.conns[i] = None
                self._count_unreported(i)

    def _count_unreported(self, index: int) -> None:
        """Counts the steps of unrolls an explorer committed but never reported: one killed
        between its commit and its report (or during the report). Its committed unrolls are
        learned from, and its replacement goes on from the board's count, so without this the
        run's step count would fall short of the steps it learned from and its budget."""
        missing = self.board.made_by(index) - self._reported[index]
        if missing > 0:
            self._reported[index] += missing
            self._infos.append(UnrollInfo(index, missing, [], [], policy_version=-1))

    def poll(self) -> list[UnrollInfo]:
        self._read_reports()
        infos, self._infos = self._infos, []
        return infos

    def _all_made(self) -> bool:
        return all(self.board.made_by(i) >= self.budget for i in range(self.cfg.num_explorers))

    def exhausted(self) -> bool:
        # A finished explorer's last report is read before its pipe closes.
        done = self._all_made() and all(c is None for c in self.conns)
        return self.experience.exhausted(self.board.made_in_total(), done)

    def check(self) -> None:
        """Restarts explorers that died before making their steps, and kills hung ones (no sign
        of progress for --explorer-timeout seconds) to restart them, within the restart
        budget."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL
        if self.server is not None:
            self.server.check()  # first: explorers wait (beating) while it is away
            self.counters.update(self.server.counters())
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            if proc.exitcode is None:
                self._check_alive(i, proc)
                continue
            if self.conns[i] is not None:
                continue  # its last reports are still being read
            proc.join()
            self.procs[i] = None
            if self.board.made_by(i) >= self.budget:
                continue  # finished (it may have died after its last unroll: nothing is lost)
            failure, self.failures[i] = self.failures[i], None
            why = failure.line if failure else common.describe_exit(proc.exitcode)
            if failure is not None and failure.trace:
                self._keep_trace(f"explorer {i}", failure)
            line = self.restarts.take(f"explorer {i}", why)
            self.counters["explorer_restarts"] += 1
            print(line, file=self.out, flush=True)
            self._starts[i] += 1
            self._start(i)

    def _check_alive(self, index: int, proc: Any) -> None:
        """Kills explorer `index` if it showed no progress for --explorer-timeout seconds (its
        start-up: START_GRACE at least); `check` then restarts it like any dead explorer."""
        timeout = self.cfg.explorer_timeout
        if timeout is None or self.failures[index] is not None:
            return
        beat = self.board.last_beat(index)
        allowed = timeout if beat else max(timeout, START_GRACE)
        silent = (time.monotonic_ns() - (beat or self._started_at[index])) / 1e9
        if silent <= allowed:
            return
        what = "no sign of progress" if beat else "not started"
        self.failures[index] = common.ExplorerFailure(
            f"{what} for {silent:.0f} s: hung (see --explorer-timeout)", ""
        )
        proc.kill()

    def _keep_trace(self, who: str, failure: common.ExplorerFailure) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "explorer-errors.log", "a") as log:
            log.write(f"--- {who} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.write(failure.trace)

    # --- stopping ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops every explorer: the stop word first, SIGTERM after a grace, SIGKILL last."""
        if self.board is not None:
            self.board.request_stop()
        procs = [p for p in self.procs if p is not None and p.pid is not None]
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs = [None] * len(self.procs)
        for i, conn in enumerate(self.conns):
            if conn is not None:
                conn.close()
                self.conns[i] = None
        if self.server is not None:  # after the explorers: they may wait for an answer
            self.counters.update(self.server.counters())
            self.server.close()


def slots_per_explorer(cfg: Config) -> int:
    """Unroll slots each explorer owns in shared memory: its slice of the seed's replay buffer,
    or one slot being written and enough FULL ones for two batches across all explorers (the
    learner never waits for a slot to be copied, and lag stays small)."""
    if cfg.buffer == "replay":
        return cfg.replay_slots_per_explorer
    return 1 + math.ceil(2 * cfg.slots_per_batch / cfg.num_explorers)


X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
SHM_PATH = "/dev/shm"
SHM_MARGIN = 1.1  # headroom over what the slots, weights and words take (allocator rounding)


def check_machine(cfg: Config, env: EnvInfo, shm_path: str = SHM_PATH) -> None:
    """What the local runtime needs of the machine, checked before a run starts; ConfigError, one
    line, otherwise:

    - x86 memory order. The slot board, the parameter store's seqlock and the replay buffer's
      sequence counters publish data with plain stores, which x86-64 never reorders with one
      another (total store order); aarch64 (Graviton, Grace, Apple silicon) does, so a slot could
      look full before its unroll is visible. There, --runtime ray or serial.
    - room in /dev/shm for the shared unroll slots and weights: a container's default 64 MB does
      not hold an Atari run's slots, and a tmpfs that fills up mid-run ends in a bus error."""
    machine = platform.machine().lower()
    if machine not in X86:
        raise ConfigError(
            f"the local runtime's shared-memory protocols rely on x86-64's memory order, and this "
            f"CPU is {machine}: use --runtime ray (explorers as Ray actors) or --runtime serial"
        )
    need = math.ceil(shared_bytes(cfg, env) * SHM_MARGIN)
    try:
        stat = os.statvfs(shm_path)
    except OSError:
        return  # no /dev/shm to measure (not Linux): torch finds its own way
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        raise ConfigError(shm_message(need, free, shm_path))


def shm_message(need: int, free: int | None, shm_path: str = SHM_PATH) -> str:
    mib = 2**20
    have = (
        f"{shm_path} has {free / mib:,.0f} MiB free" if free is not None else f"{shm_path} is full"
    )
    suggest = max(1, math.ceil(2 * need / 2**30))
    return (
        f"the local runtime needs {need / mib:,.0f} MiB of shared memory for its unroll slots and "
        f"weights and {have}: give it more (docker run --shm-size={suggest}g; on Kubernetes a "
        "memory-backed emptyDir mounted at /dev/shm), or use fewer --num-explorers or "
        "--envs-per-explorer, or --runtime ray"
    )


def shared_bytes(cfg: Config, env: EnvInfo) -> int:
    """Bytes of shared memory the local runtime allocates for `cfg`: the unroll slots, the
    weights (as many as the network has parameters, float32) and the words beside them."""
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
    per_unroll = sum(
        math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        for shape, dtype in spec.values()
    )
    slots = cfg.num_explorers * slots_per_explorer(cfg)
    weights = 4 * sum(p.numel() for p in common.build_model(cfg, env).parameters())
    inference = 0
    if cfg.inference == "server":  # each explorer's request and answer buffers
        from impala.runtime.inference import make_layout

        inference = cfg.num_explorers * make_layout(cfg, env).nbytes()
    return slots * per_unroll + weights + inference + 64 * slots + 2**16
