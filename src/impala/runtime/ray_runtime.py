"""`impala train --runtime ray`: the explorers as Ray actors, the learner in this process.

Each explorer actor runs an `ExplorerWorker`; the learner keeps two unroll requests in flight per
explorer, each carrying a reference to the newest published weights, so explorers rarely wait
for the learner and pick up new weights at the start of every unroll. Backpressure: while two
batches wait for the learner, explorers are not asked for more.

Restarts are this runtime's, not Ray's (`max_restarts=0`): an actor that dies, or whose
environment cannot be built or raises, is replaced within the run's restart budget
(`--max-restarts` per `--restart-window`), and a crash loop ends the run with the explorer's own
error in one line. An actor that answers none of its requests for --explorer-timeout seconds (its
first, which includes its start-up: START_GRACE at least) is taken as hung and replaced the same
way.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from impala import faults
from impala.agent import Learner, ReplayBuffer, UnrollInfo, rollout_spec
from impala.agent.experience import Experience, ListQueue
from impala.agent.worker import ExplorerWorker
from impala.config import Config
from impala.envs import EnvInfo
from impala.loop import Batch
from impala.runtime import common, ray_support
from impala.runtime.restarts import RestartBudget

IN_FLIGHT = 2  # unroll requests queued per explorer
START_GRACE = 120.0  # seconds an actor's first answer may take at least (see --explorer-timeout)


class _ExplorerActor:
    """An `ExplorerWorker` that reports its own failure (construction included) as an
    `ExplorerFailure` instead of raising, so the learner gets the real error in one line."""

    def __init__(self, cfg: Config, env: EnvInfo, index: int, start: tuple[int, int]) -> None:
        torch.set_num_threads(1)
        self.worker: ExplorerWorker | None = None
        self.failure: common.ExplorerFailure | None = None
        try:
            self.worker = ExplorerWorker(cfg, env, index, start=start)
        except Exception as exc:  # noqa: BLE001 - reported to the learner, which decides
            self.failure = common.ExplorerFailure.of(exc)

    def unroll(self, weights: tuple[int, Any]) -> Any:
        faults.point("hang")  # tests and the chaos check: an explorer that hangs
        if self.failure is None:
            try:
                return self.worker.unroll(weights)
            except Exception as exc:  # noqa: BLE001
                self.failure = common.ExplorerFailure.of(exc)
        return self.failure


class RaySource:
    """Explorer actors on Ray, as a `BatchSource` (see `impala.loop`): the transport (actors,
    requests, replacements, liveness) around the shared `Experience`.

    `steps_before`: env steps a resumed run made before (its explorers get seeds of their own)."""

    def __init__(
        self, cfg: Config, env: EnvInfo, learner: Learner, tracker, steps_before: int = 0
    ) -> None:
        self.cfg, self.env, self.learner = cfg, env, learner
        self.out = tracker.out
        self.run_dir = tracker.run_dir
        self.budget = common.explorer_budget(cfg)
        self.steps_before = steps_before
        n = cfg.num_explorers
        self.steps_per_unroll = cfg.unroll_length * cfg.envs_per_explorer
        self.requested = [0] * n  # steps asked of each explorer so far (in flight or made)
        self.inflight: dict[Any, int] = {}
        self.idle: set[int] = set()  # explorers owed a request once the learner catches up
        self.actors: list[Any] = []
        self.restarts = RestartBudget(cfg.max_restarts, cfg.restart_window)
        self.counters = {"explorer_restarts": 0}
        self.replay: ReplayBuffer | None = None
        self.queue: ListQueue | None = None
        self.experience: Experience | None = None
        self._infos: list[UnrollInfo] = []
        self._weights: Any = None
        self._weights_version = -1
        self._stack = contextlib.ExitStack()
        self._made = 0
        self._starts = [0] * n  # times each explorer's actor was replaced
        self._heard = [0.0] * n  # when each actor last answered (or was started), monotonic s
        self._answered = [False] * n  # whether the current actor answered at all

    def start(self) -> None:
        cfg = self.cfg
        n = cfg.num_explorers
        self._stack.enter_context(ray_support.local_session(cfg.ray_address, num_cpus=n + 1))
        import ray

        self._actor_class = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(
            _ExplorerActor
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.buffer == "replay":
            spec = rollout_spec(
                self.env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size
            )
            slots = cfg.replay_slots_per_explorer
            self.replay = ReplayBuffer.allocate(spec, n, slots)
            self.experience = Experience(cfg, replay=self.replay, generator=generator)
        else:
            self.queue = ListQueue(cfg.algo)
            self.experience = Experience(cfg, queue=self.queue, generator=generator)
        self.actors = [self._new_actor(i) for i in range(n)]
        self._publish()
        for i in range(n):
            for _ in range(IN_FLIGHT):
                self._request(i)

    def _new_actor(self, i: int) -> Any:
        self._heard[i], self._answered[i] = time.monotonic(), False
        start = (self.steps_before, self._starts[i])
        return self._actor_class.remote(self.cfg, self.env, i, start)

    # --- requests ------------------------------------------------------------------------------
    def _publish(self) -> None:
        import ray

        version, flat = self.learner.store.snapshot()
        self._weights = ray.put((version, flat.numpy()))
        self._weights_version = version

    def _request(self, i: int) -> None:
        if self.requested[i] >= self.budget:
            return
        if not self.experience.accepts(self._made):
            self.idle.add(i)  # backpressure: the learner has work waiting
            return
        if not any(j == i for j in self.inflight.values()):
            self._heard[i] = time.monotonic()  # the liveness clock runs while it has work
        self.requested[i] += self.steps_per_unroll
        self.inflight[self.actors[i].unroll.remote(self._weights)] = i

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
        self._heard[i], self._answered[i] = time.monotonic(), True
        payload, info = result
        self._infos.append(info)
        self._made += info.steps
        self.requested[i] += info.steps - self.steps_per_unroll  # REINFORCE unrolls vary
        if payload is not None and self.replay is not None:
            self.replay.upload(i, payload["local"], payload["count"])
        elif payload is not None:
            self.queue.put(payload["unroll"])
        self._request(i)

    def _replace(self, i: int, why: str, trace: str | None, failed_request: bool = True) -> None:
        """A new actor for explorer i, within the restart budget (RunFailed beyond it);
        `failed_request`: one of its requests has already been taken out of those in flight."""
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
        if failed_request:
            self.requested[i] -= self.steps_per_unroll
        self.idle.discard(i)
        with contextlib.suppress(Exception):
            ray.kill(self.actors[i])
        self._starts[i] += 1
        self.actors[i] = self._new_actor(i)
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
            batch = self.experience.next_batch(self._made, self._done())
            remaining = deadline - time.monotonic()
            if batch is not None or remaining <= 0 or not self.inflight:
                return batch
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=remaining)
            if ready:  # and whatever else is ready by now
                ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            for ref in ready:
                self._receive(ref)

    def _done(self) -> bool:
        """Every explorer made its steps: nothing in flight, nobody waiting for a request."""
        return not self.inflight and not self.idle

    def poll(self) -> list[UnrollInfo]:
        infos, self._infos = self._infos, []
        return infos

    def check(self) -> None:
        """Replaces actors that answered none of their requests for --explorer-timeout seconds
        (hung); other failures surface as replies to requests (see _receive)."""
        timeout = self.cfg.explorer_timeout
        if timeout is None:
            return
        now = time.monotonic()
        busy = set(self.inflight.values())
        for i in sorted(busy):
            allowed = timeout if self._answered[i] else max(timeout, START_GRACE)
            silent = now - self._heard[i]
            if silent > allowed:
                what = "no answer" if self._answered[i] else "no first answer"
                why = f"{what} for {silent:.0f} s: hung (see --explorer-timeout)"
                self._replace(i, why, None, failed_request=False)

    def exhausted(self) -> bool:
        return self.experience.exhausted(self._made, self._done())

    def close(self) -> None:
        import sys

        if "ray" in sys.modules:
            import ray

            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        self.actors = []
        self._stack.close()
