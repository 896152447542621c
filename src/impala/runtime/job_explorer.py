"""An explorer task of the seed's job form: acts, and sends its unrolls to the learners' hubs.

The explorer joins every hub, takes the newest weights from the hub it sends to next (round
robin), makes an unroll, and puts it: the unroll is serialised once (`ray.put`) and the hub
holds the put while its inbox is full, so backpressure costs no resends of the data. It stops
after its share of the job's steps, when the learners say the job is over, or at a signal
(telling the hubs it left).

An explorer task started again after dying (by hand, or by a scheduler that restarts failed
tasks) makes only what is left of its share (the hubs count what each explorer put), with seeds
of its own. It watches itself: with no sign of progress for --explorer-timeout seconds (an
environment deadlocked in step()) it says so in one line and exits with code 1, to be started
again; its learners wait for it up to --peer-timeout.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from impala import faults
from impala.agent.worker import ExplorerWorker
from impala.config import Config
from impala.envs import EnvInfo
from impala.errors import EXIT_FAILED, ConfigError, RunFailed
from impala.runtime import common, ray_support
from impala.runtime.hosts import JobSpec
from impala.shutdown import StopSignals

PRINT_INTERVAL = 5.0


class Watchdog:
    """The explorer task's own liveness check: `beat()` at every sign of progress; after
    `timeout` seconds without one, `on_hang(seconds)` runs (from the watchdog's thread)."""

    def __init__(self, timeout: float | None, on_hang: Callable[[float], None]) -> None:
        self.timeout, self.on_hang = timeout, on_hang
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def __enter__(self) -> Watchdog:
        if self.timeout is not None:
            self.beat()
            self._thread = threading.Thread(target=self._watch, name="impala-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            silent = time.monotonic() - self.last
            if silent > self.timeout:
                self.on_hang(silent)
                return


def send(
    put: Callable[[Any], str],
    item: Any,
    signals: StopSignals,
    beat: Callable[[], None] | None = None,
) -> str:
    """Puts `item` (a reference to the serialised unroll) until the hub takes it; each put waits
    in the hub while its inbox is full, so a slow learner costs neither resends of the data nor a
    busy loop (`beat` after each answer: waiting for the learner is progress). Returns the hub's
    last answer ('ok', 'done', or 'full' if a stop was asked)."""
    while (status := put(item)) == "full" and not signals.requested:
        if beat is not None:
            beat()
    return status


class _Sender:
    """Sends unrolls to the hubs round robin with one put in flight: the explorer makes its next
    unroll while the last one travels (or waits in a full hub)."""

    def __init__(
        self, hubs: list, worker: ExplorerWorker, signals: StopSignals, beat: Callable[[], None]
    ) -> None:
        self.hubs, self.worker, self.signals, self.beat = hubs, worker, signals, beat
        self.turn = 0
        self.pending: tuple | None = None  # (hub, item, reference to the reply, info)

    def submit(self, item: Any, info: Any) -> tuple[str, Any]:
        """Sends `item` once the previous put is through; returns that put's answer and the
        info of the unroll it carried (None for the first)."""
        status, sent = self.flush()
        if status == "ok":
            hub = self.hubs[self.turn % len(self.hubs)]
            self.turn += 1
            self.pending = (hub, item, hub.put.remote(item, self.worker.version), info)
        return status, sent

    def flush(self) -> tuple[str, Any]:
        if self.pending is None:
            return "ok", None
        hub, item, reply, info = self.pending
        self.pending = None
        status = _answer(reply, self.worker)
        if status == "full":
            status = send(_HubPut(hub, self.worker), item, self.signals, self.beat)
        return status, info if status == "ok" else None


class _HubPut:
    """`put(item)` for `send`: one round trip that also brings newer weights, if any."""

    def __init__(self, hub, worker: ExplorerWorker) -> None:
        self.hub, self.worker = hub, worker

    def __call__(self, item: Any) -> str:
        return _answer(self.hub.put.remote(item, self.worker.version), self.worker)


def _answer(reply: Any, worker: ExplorerWorker) -> str:
    """A hub's reply to a put: its status; newer weights in it go to `worker`."""
    import ray

    status, weights = ray.get(reply)
    if weights is not None:
        worker.set_weights(*weights)
    return status


def run_explorer_task(
    cfg: Config,
    spec: JobSpec,
    env: EnvInfo,
    *,
    peer_timeout: float,
    signals: StopSignals,
    out: IO[str],
) -> int:
    import ray
    from ray.exceptions import RayActorError

    me = spec.name
    hub0 = ray_support.wait_for_actor("hub-0", peer_timeout, f"{me}: learner 0's hub")
    mismatch = ray.get(hub0.check.remote(spec.description(cfg)))
    if mismatch:
        raise ConfigError(f"this task's settings differ from learner 0's: {mismatch}")
    hubs = [hub0] + [
        ray_support.wait_for_actor(f"hub-{t}", peer_timeout, f"{me}: learner {t}'s hub")
        for t in range(1, len(spec.learners))
    ]
    rejoins = [ray.get(hub.join.remote(spec.task)) for hub in hubs][0]
    # A resumed job: what is left of the budget after the steps made before its checkpoint; an
    # explorer started again: what is left of its share after what it put before it died.
    done = ray.get(hub0.steps_before.remote())
    share = common.explorer_budget(cfg, len(spec.explorers), done=done)
    made_before = sum(ray.get([hub.made_by.remote(spec.task) for hub in hubs]))
    budget = max(0, share - made_before)
    worker = ExplorerWorker(cfg, env, spec.task, start=(done, rejoins))
    steps, episodes, returns = 0, 0, []
    stack = contextlib.ExitStack()
    try:
        deadline = time.monotonic() + peer_timeout
        while (weights := ray.get(hub0.weights.remote(-1))) is None:
            if time.monotonic() > deadline:
                raise RunFailed(f"{me}: learner 0 published no weights within {peer_timeout:.0f} s")
            time.sleep(0.1)
        worker.set_weights(*weights)
        again = f"; {made_before:,} of its {share:,} steps made before" if made_before else ""
        print(
            f"{me}: joined {len(hubs)} learner(s); acting in {cfg.envs_per_explorer} x {cfg.env}"
            f"{again}",
            file=out,
            flush=True,
        )
        signals.defer()
        last_print = time.monotonic()
        status, made = "ok", 0
        watchdog = stack.enter_context(Watchdog(cfg.explorer_timeout, _hung(me, out)))
        worker.explorer.heartbeat = watchdog.beat
        sender = _Sender(hubs, worker, signals, watchdog.beat)
        while status == "ok" and not signals.requested:
            if made < budget:
                faults.point("hang")  # tests: an explorer that hangs
                payload, info = worker.unroll()
                made += info.steps
                # Serialised once, however long a hub is full; sent while the next is made.
                status, info = sender.submit(ray.put((payload, info)), info)
            else:
                status, info = sender.flush()
                if info is None:
                    break  # all sent
            if status == "done":
                print(f"{me}: the learners have finished", file=out, flush=True)
            if status != "ok":
                break
            if info is None:
                continue  # the first unroll is on its way
            steps += info.steps
            episodes += len(info.episode_returns)
            returns = (returns + info.episode_returns)[-100:]
            if time.monotonic() - last_print > PRINT_INTERVAL:
                mean = f"{sum(returns) / len(returns):.2f}" if returns else "-"
                print(
                    f"{me}: steps {steps:,} episodes {episodes:,} mean return {mean} "
                    f"policy version {worker.version}",
                    file=out,
                    flush=True,
                )
                last_print = time.monotonic()
        if steps >= budget or status == "done":
            ray.get([hub.explorer_finished.remote(spec.task) for hub in hubs], timeout=5)
            print(f"{me} done: {steps:,} steps, {episodes:,} episodes", file=out, flush=True)
        else:
            why = f"stopped by {signals.reason}" if signals.requested else "stopped"
            ray.get([hub.explorer_left.remote(spec.task, why) for hub in hubs], timeout=5)
            print(f"{me} {why}: {steps:,} steps, {episodes:,} episodes", file=out, flush=True)
    except (RayActorError, ConnectionError) as exc:
        raise RunFailed(f"{me}: lost the learners ({type(exc).__name__})") from None
    finally:
        stack.close()
        worker.close()
    return 0


def _hung(me: str, out: IO[str]) -> Callable[[float], None]:
    """What a hung explorer task does: say so, and exit at once (its environment may be stuck
    where no clean-up can reach it), with code 1 so that a supervisor starts it again. Its Ray
    node goes with it (`impala.runtime.node_guard`)."""

    def on_hang(silent: float) -> None:
        print(
            f"{me}: no sign of progress for {silent:.0f} s: hung (see --explorer-timeout); "
            "exiting with code 1 so that it can be started again",
            file=out,
            flush=True,
        )
        os._exit(EXIT_FAILED)

    return on_hang
