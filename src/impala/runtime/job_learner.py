"""A learner task of the seed's job form: its hub as a batch source for the one learner loop.

The learner drains its hub (unrolls, or uploads to the seed's replay buffer), publishes weights
there, and watches its explorers: one that never joins, or goes silent, within --peer-timeout
ends the job with a line naming it (with the replay buffer the learner keeps learning while an
explorer is briefly gone and started again).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import torch

from impala.agent import Learner, ParameterStore, ReplayBuffer, UnrollInfo, rollout_spec
from impala.agent.experience import Experience, ListQueue
from impala.config import Config
from impala.envs import EnvInfo
from impala.errors import ConfigError, RunFailed, one_line
from impala.lifecycle import Checkpointer, ResumePoint, run_learner
from impala.loop import Batch
from impala.metrics import Tracker
from impala.runtime import common, ray_support
from impala.runtime.collective import LearnerGroup
from impala.runtime.hosts import JobSpec
from impala.runtime.hub import Hub
from impala.shutdown import StopSignals

PUBLISH_INTERVAL = 0.01  # seconds between weight publications to the hub
DRAIN_INTERVAL = 0.02  # seconds the learner may learn without looking into its hub
STATUS_INTERVAL = 1.0  # seconds between looks at the explorers' status
GOODBYE_WAIT = 2.0  # seconds the learner waits, at the end, for explorers to hear it is over


class HubSource:
    """A learner task's hub, as a `BatchSource` (see `impala.loop`)."""

    def __init__(
        self,
        cfg: Config,
        spec: JobSpec,
        env: EnvInfo,
        learner: Learner,
        hub,
        tracker: Tracker,
        peer_timeout: float,
    ) -> None:
        self.cfg, self.spec, self.learner, self.hub = cfg, spec, learner, hub
        self.out = tracker.out
        self.peer_timeout = peer_timeout
        self.num_explorers = len(spec.explorers)
        self.counters: dict[str, int] = {}
        self._infos: list[UnrollInfo] = []
        self._status: dict[str, Any] | None = None
        self._next_status = 0.0
        self._last_publish = 0.0
        self._next_drain = 0.0
        self._publishing = None
        self._published = -1
        self._made = 0
        self.replay: ReplayBuffer | None = None
        self.queue: ListQueue | None = None
        generator = torch.Generator().manual_seed(cfg.seed + spec.task)
        if cfg.buffer == "replay":
            slots = cfg.replay_slots_per_explorer
            spec = rollout_spec(
                env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size
            )
            self.replay = ReplayBuffer.allocate(spec, self.num_explorers, slots)
            self.experience = Experience(cfg, replay=self.replay, generator=generator)
        else:
            self.queue = ListQueue(cfg.algo)
            self.experience = Experience(cfg, queue=self.queue, generator=generator)

    def start(self) -> None:
        self._publish(force=True)
        print(
            f"learner {self.spec.task}: up; waiting for explorers at "
            f"{','.join(f'{h}:{p}' for h, p in self.spec.explorers)}",
            file=self.out,
            flush=True,
        )

    def _publish(self, force: bool = False) -> None:
        import ray

        store = self.learner.store
        now = time.monotonic()
        if store.version == self._published or (
            not force and now - self._last_publish < PUBLISH_INTERVAL
        ):
            return
        if self._publishing is not None:  # one publication in flight at a time, not waited on
            done, _ = ray.wait([self._publishing], timeout=60 if force else 0)
            if not done:
                return
        version, flat = store.snapshot()
        self._publishing = self.hub.publish.remote(version, flat.numpy())
        self._published, self._last_publish = version, now

    def next_batch(self, timeout: float) -> Batch | None:
        self._publish()
        batch = self._take_batch()
        if batch is None:
            self._drain(timeout)
            batch = self._take_batch()
        return batch

    def _take_batch(self) -> Batch | None:
        return self.experience.next_batch(self._made, self._all_finished())

    def _drain(self, timeout: float) -> None:
        """Moves what the hub holds into the learner (waiting up to `timeout` for something),
        at most every DRAIN_INTERVAL unless waiting, and only while the experience accepts
        more: beyond that the hub's capacity holds the explorers back (backpressure)."""
        import ray

        now = time.monotonic()
        if timeout <= 0 and now < self._next_drain:
            return
        if not self.experience.accepts(self._made):
            return
        self._next_drain = now + DRAIN_INTERVAL
        items, events = ray.get(self.hub.drain.remote(64, timeout))
        for event in events:
            print(f"learner {self.spec.task}: {event}", file=self.out, flush=True)
        for payload, info in items:
            self._infos.append(info)
            self._made += info.steps
            if payload is None:
                continue
            if self.replay is not None:
                self.replay.upload(info.explorer, payload["local"], payload["count"])
            else:
                self.queue.put(payload["unroll"])

    def poll(self) -> list[UnrollInfo]:
        # Also while the loop holds a batch (synchronous learners waiting for each other): the
        # hub keeps being emptied, so explorers are never stuck on one learner's full inbox.
        self._drain(0.0)
        infos, self._infos = self._infos, []
        return infos

    def _refresh_status(self) -> dict[str, Any]:
        import ray

        now = time.monotonic()
        if self._status is None or now >= self._next_status:
            self._status = ray.get(self.hub.status.remote())
            self._next_status = now + STATUS_INTERVAL
        return self._status

    def _all_finished(self) -> bool:
        status = self._refresh_status()
        return len(status["finished"]) >= self.num_explorers and status["queued"] == 0

    def check(self) -> None:
        """Ends the job when an explorer never came or went silent for --peer-timeout."""
        status = self._refresh_status()
        finished = set(status["finished"])
        for explorer in range(self.num_explorers):
            if explorer in finished:
                continue
            silent = status["silent_for"].get(explorer)
            if silent is None and status["age"] > self.peer_timeout:
                raise RunFailed(
                    f"learner {self.spec.task}: explorer {explorer} did not join within "
                    f"{self.peer_timeout:.0f} s (see --peer-timeout)"
                )
            if silent is not None and silent > self.peer_timeout:
                left = status["left"].get(explorer)
                why = f" after it left ({left})" if left else ""
                raise RunFailed(
                    f"learner {self.spec.task}: explorer {explorer} has sent nothing for "
                    f"{silent:.0f} s{why} and was not started again; the job cannot make its "
                    "steps (see --peer-timeout)"
                )

    def exhausted(self) -> bool:
        return self.experience.exhausted(self._made, self._all_finished())

    def close(self) -> None:
        """Tells the explorers the job is over, and gives them a moment to hear it."""
        import ray

        try:
            ray.get(self.hub.finish.remote(), timeout=5)
            deadline = time.monotonic() + GOODBYE_WAIT
            while time.monotonic() < deadline:
                status = ray.get(self.hub.status.remote(), timeout=5)
                gone = set(status["finished"]) | set(status["left"])
                if set(status["joined"]) <= gone:
                    return
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - shutting down; the cluster may already be gone
            pass


def run_learner_task(
    cfg: Config,
    spec: JobSpec,
    env: EnvInfo,
    *,
    peer_timeout: float,
    run_dir: Path,
    signals: StopSignals,
    out: IO[str],
    point: ResumePoint | None = None,
    record: dict | None = None,
) -> int:
    """Runs learner task `spec.task` to its end (in a connected Ray cluster); returns 0 or the
    signal's exit code. RunFailed when the job cannot go on.

    Learner 0 writes the job's checkpoints. A resumed job (`point`, learner 0's checkpoint):
    learner 0 loads it and hands the weights, optimizer state and counters to the others;
    explorers make what is left of the budget."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = spec.description(cfg)
    resumed = point is not None and spec.task == 0
    counters = point.state["counters"] if resumed else {}
    steps_before = int(counters.get("job_steps", counters.get("steps", 0)))
    hub_class = ray.remote(num_cpus=0, max_concurrency=16)(Hub)
    # On this task's own node: Ray would place it anywhere, and a node goes with its task.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    hub = hub_class.options(name=f"hub-{spec.task}", scheduling_strategy=here).remote(
        spec.task, job, 4 * cfg.slots_per_batch + 8, steps_before
    )
    if spec.task > 0:
        hub0 = ray_support.wait_for_actor("hub-0", peer_timeout, f"{spec.name}: learner 0's hub")
        mismatch = ray.get(hub0.check.remote(job))
        if mismatch:
            raise ConfigError(f"this task's settings differ from learner 0's: {mismatch}")
    else:
        hub0 = hub
    budget = common.explorer_budget(cfg, len(spec.explorers))
    common.seed_everything(cfg.seed)
    model = common.build_model(cfg, env)
    store = ParameterStore(*ParameterStore.allocate(model))
    learner = Learner(cfg, model, store, total_steps=budget * len(spec.explorers))
    if resumed:
        point.restore(learner, cfg, out)
    group = None
    if len(spec.learners) > 1:
        group = LearnerGroup(spec.task, len(spec.learners), hub0, peer_timeout)
        group.join(spec.head_host)
        group.broadcast_parameters(learner.model)
        group.broadcast_learner_state(learner)
        learner.grad_sync = group.average_gradients
        if resumed:
            group.steps_offset = steps_before - int(counters.get("steps", 0))
    resume_counters = point.tracker_state() if resumed else None
    tracker = Tracker(cfg, run_dir, out, signals=signals, resume=resume_counters)
    source = HubSource(cfg, spec, env, learner, hub, tracker, peer_timeout)
    checkpointer = None
    if spec.task == 0:
        checkpointer = Checkpointer(cfg, run_dir, learner, tracker, source, record or {})
        if group is not None:
            checkpointer.job_steps = lambda: group.last_steps
    try:
        run_learner(
            cfg,
            learner,
            source,
            tracker,
            signals,
            run_dir,
            consensus=group,
            checkpointer=checkpointer,
        )
    except BaseException as exc:
        if group is not None:
            group.report_failure(one_line(exc))
        raise
    if group is not None:
        group.finish()
    result = tracker.result()
    print(
        f"learner {spec.task} {'stopped' if signals.requested else 'done'} "
        f"({result.stop_reason}): {result.steps:,} steps, {result.updates:,} updates in "
        f"{result.seconds:.1f} s; model and logs in {run_dir}",
        file=out,
        flush=True,
    )
    return 0
