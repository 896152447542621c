"""`impala train --runtime ray`: the explorers as Ray actors, the learner in this process.

Each explorer actor runs an `ExplorerWorker`; the learner keeps two unroll requests in flight per
explorer, each carrying a reference to the newest published weights, so explorers rarely wait
for the learner and pick up new weights at the start of every unroll. Backpressure: while two
batches wait for the learner, explorers are not asked for more.

Restarts are this runtime's, not Ray's (`max_restarts=0`): an actor that dies, or whose
environment cannot be built or raises, is replaced within the run's restart budget
(`--max-restarts` per `--restart-window`), and a crash loop ends the run with the explorer's own
error in one line.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from typing import Any

import torch

from impala.agent import Learner, ReplayBuffer, ReplayRate, UnrollInfo, rollout_spec
from impala.agent.buffer import allocate, unrolls_to_batch
from impala.agent.worker import ExplorerWorker
from impala.config import Config
from impala.envs import EnvInfo
from impala.errors import one_line
from impala.loop import Batch
from impala.runtime import common, ray_support
from impala.runtime.restarts import RestartBudget

IN_FLIGHT = 2  # unroll requests queued per explorer


class _ExplorerActor:
    """An `ExplorerWorker` that reports its own failure (construction included) as an
    `ExplorerFailure` instead of raising, so the learner gets the real error in one line."""

    def __init__(self, cfg: Config, env: EnvInfo, index: int) -> None:
        torch.set_num_threads(1)
        self.worker: ExplorerWorker | None = None
        self.failure: common.ExplorerFailure | None = None
        try:
            self.worker = ExplorerWorker(cfg, env, index)
        except Exception as exc:  # noqa: BLE001 - reported to the learner, which decides
            self.failure = common.ExplorerFailure(one_line(exc), traceback.format_exc())

    def unroll(self, weights: tuple[int, Any]) -> Any:
        if self.failure is None:
            try:
                return self.worker.unroll(weights)
            except Exception as exc:  # noqa: BLE001
                self.failure = common.ExplorerFailure(one_line(exc), traceback.format_exc())
        return self.failure


class RaySource:
    """Explorer actors on Ray, as a `BatchSource` (see `impala.loop`)."""

    def __init__(self, cfg: Config, env: EnvInfo, learner: Learner, tracker) -> None:
        self.cfg, self.env, self.learner = cfg, env, learner
        self.out = tracker.out
        self.run_dir = tracker.run_dir
        self.budget = common.explorer_budget(cfg)
        n = cfg.num_explorers
        self.steps_per_unroll = cfg.unroll_length * cfg.envs_per_explorer
        self.requested = [0] * n  # steps asked of each explorer so far (in flight or made)
        self.inflight: dict[Any, int] = {}
        self.idle: set[int] = set()  # explorers owed a request once the learner catches up
        self.pending: list[dict] = []
        self.actors: list[Any] = []
        self.restarts = RestartBudget(cfg.max_restarts, cfg.restart_window)
        self.counters = {"explorer_restarts": 0}
        self.replay: ReplayBuffer | None = None
        self._infos: list[UnrollInfo] = []
        self._weights: Any = None
        self._weights_version = -1
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._stack = contextlib.ExitStack()
        self.rate = ReplayRate(cfg.replay_ratio, cfg.replay_slack)
        self._made = 0

    def start(self) -> None:
        cfg = self.cfg
        n = cfg.num_explorers
        self._stack.enter_context(ray_support.local_session(cfg.ray_address, num_cpus=n + 1))
        import ray

        self._actor_class = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(
            _ExplorerActor
        )
        if cfg.buffer == "replay":
            spec = rollout_spec(
                self.env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size
            )
            slots = cfg.replay_slots_per_explorer
            self.replay = ReplayBuffer(
                allocate(spec, slots * n), torch.zeros(n, dtype=torch.int64), slots
            )
        self.actors = [self._actor_class.remote(cfg, self.env, i) for i in range(n)]
        self._publish()
        for i in range(n):
            for _ in range(IN_FLIGHT):
                self._request(i)

    # --- requests ------------------------------------------------------------------------------
    def _publish(self) -> None:
        import ray

        version, flat = self.learner.store.snapshot()
        self._weights = ray.put((version, flat.numpy()))
        self._weights_version = version

    def _request(self, i: int) -> None:
        if self.requested[i] >= self.budget:
            return
        if len(self.pending) >= 2 * self.cfg.slots_per_batch or self._replay_behind():
            self.idle.add(i)  # backpressure: the learner has work waiting
            return
        self.requested[i] += self.steps_per_unroll
        self.inflight[self.actors[i].unroll.remote(self._weights)] = i

    def _replay_behind(self) -> bool:
        """The learner is a buffer's worth behind the replay rate (and has data to catch up)."""
        if self.replay is None or self.replay.num_slots_filled == 0:
            return False
        return not self.rate.explorers_may_act(self._made)

    def _receive(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError

        i = self.inflight.pop(ref, None)
        if i is None:
            return  # a request to an actor already replaced
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            self._replace(i, f"its actor died ({type(exc).__name__})", None)
            return
        if isinstance(result, common.ExplorerFailure):
            self._replace(i, result.line, result.trace)
            return
        payload, info = result
        self._infos.append(info)
        self._made += info.steps
        self.requested[i] += info.steps - self.steps_per_unroll  # REINFORCE unrolls vary
        if payload is not None and self.replay is not None:
            self.replay.upload(i, payload["local"], payload["count"])
        elif payload is not None:
            self.pending.append(payload["unroll"])
        self._request(i)

    def _replace(self, i: int, why: str, trace: str | None) -> None:
        """A new actor for explorer i, within the restart budget (RunFailed beyond it)."""
        import ray

        if trace is not None and self.run_dir is not None:
            with open(self.run_dir / "explorer-errors.log", "a") as log:
                log.write(f"--- explorer {i} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n{trace}")
        line = self.restarts.take(f"explorer {i}", why)
        self.counters["explorer_restarts"] += 1
        print(line, file=self.out, flush=True)
        for ref in [r for r, j in self.inflight.items() if j == i]:
            del self.inflight[ref]
            self.requested[i] -= self.steps_per_unroll
        self.requested[i] -= self.steps_per_unroll  # the request that failed
        self.idle.discard(i)
        with contextlib.suppress(Exception):
            ray.kill(self.actors[i])
        self.actors[i] = self._actor_class.remote(self.cfg, self.env, i)
        for _ in range(IN_FLIGHT):
            self._request(i)

    # --- the loop's side -----------------------------------------------------------------------
    def next_batch(self, timeout: float) -> Batch | None:
        import ray

        if self.learner.store.version != self._weights_version:
            self._publish()
        deadline = time.monotonic() + timeout
        while True:
            for i in sorted(self.idle):
                self.idle.discard(i)
                self._request(i)
            batch = self._take_batch()
            remaining = deadline - time.monotonic()
            if batch is not None or remaining <= 0 or not self.inflight:
                return batch
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=remaining)
            if ready:  # and whatever else is ready by now
                ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            for ref in ready:
                self._receive(ref)

    def _take_batch(self) -> Batch | None:
        cfg = self.cfg
        if self.replay is not None:
            if not self.inflight and not self.idle:
                return None  # the explorers are done: so is sampling
            return self.rate.sample(
                self.replay, self._made, cfg.learn_batch_size, cfg.algo, self._generator
            )
        k = cfg.slots_per_batch
        if len(self.pending) >= k or (self.pending and not self.inflight and not self.idle):
            batch = unrolls_to_batch(self.pending[:k], cfg.algo)
            del self.pending[:k]
            return batch
        return None

    def poll(self) -> list[UnrollInfo]:
        infos, self._infos = self._infos, []
        return infos

    def check(self) -> None:
        pass  # failures surface as replies to requests (see _receive)

    def exhausted(self) -> bool:
        return not self.inflight and not self.idle and not self.pending

    def close(self) -> None:
        import sys

        if "ray" in sys.modules:
            import ray

            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        self.actors = []
        self._stack.close()
