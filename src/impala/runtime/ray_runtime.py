"""`impala train --runtime ray`: the explorers as Ray actors, the learner in this process.

Each explorer actor runs an `ExplorerWorker`; the learner keeps two unroll requests in flight per
explorer, each carrying a reference to the newest published weights, so explorers never wait for
the learner and pick up new weights at the start of every unroll. Explorer actors that die are
restarted by Ray (max_restarts) and training goes on; the lost requests are sent again.
"""

from __future__ import annotations

import torch
from torch import nn

from impala.agent import ParameterStore, ReplayBuffer, rollout_spec
from impala.agent.buffer import allocate, unrolls_to_batch
from impala.agent.worker import ExplorerWorker
from impala.config import Config
from impala.envs import EnvInfo
from impala.metrics import Tracker
from impala.runtime import common, ray_support

IN_FLIGHT = 2  # unroll requests queued per explorer


class _ExplorerActor(ExplorerWorker):
    def __init__(self, cfg: Config, env: EnvInfo, index: int) -> None:
        torch.set_num_threads(1)
        super().__init__(cfg, env, index)


def run(cfg: Config, env: EnvInfo, tracker: Tracker) -> nn.Module:
    import ray
    from ray.exceptions import RayActorError

    learner = common.build_learner(cfg, env)
    model, store = learner.model, learner.store
    generator = torch.Generator().manual_seed(cfg.seed)
    budget = common.explorer_budget(cfg)
    with ray_support.local_session(cfg.ray_address, num_cpus=max(cfg.num_explorers, 1) + 1):
        actor_cls = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(_ExplorerActor)
        actors = [actor_cls.remote(cfg, env, i) for i in range(cfg.num_explorers)]
        replay = None
        if cfg.buffer == "replay":
            spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
            slots = cfg.replay_slots_per_explorer
            replay = ReplayBuffer(
                allocate(spec, slots * cfg.num_explorers),
                torch.zeros(cfg.num_explorers, dtype=torch.int64),
                slots,
            )
        weights = ray.put(_weights(store))
        requested = [0] * cfg.num_explorers  # steps asked of each explorer so far
        inflight: dict = {}
        steps_per_unroll = cfg.unroll_length * cfg.envs_per_explorer

        idle: list[int] = []  # explorers owed a request once the learner catches up

        def request(i: int) -> None:
            # Backpressure: while the learner has a batch waiting, explorers are not asked for
            # more, so unrolls never pile up and the policy lag stays small.
            if requested[i] >= budget:
                return
            if len(pending) >= 2 * cfg.slots_per_batch:
                idle.append(i)
                return
            requested[i] += steps_per_unroll
            inflight[actors[i].unroll.remote(weights)] = i

        pending: list[dict] = []
        for i in range(cfg.num_explorers):
            for _ in range(IN_FLIGHT):
                request(i)
        try:
            while (inflight or idle or pending) and not tracker.should_stop():
                ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0.01)
                for ref in ready:
                    i = inflight.pop(ref)
                    try:
                        payload, info = ray.get(ref)
                    except RayActorError:
                        print(f"explorer {i} died; Ray restarts it", file=tracker.out, flush=True)
                        requested[i] -= steps_per_unroll
                        request(i)
                        continue
                    tracker.on_unroll(info)
                    requested[i] += info.steps - steps_per_unroll  # REINFORCE unrolls vary
                    if payload is not None and replay is not None:
                        replay.upload(i, payload["local"], payload["count"])
                    elif payload is not None:
                        pending.append(payload["unroll"])
                    request(i)
                while True:
                    batch = None
                    if replay is not None:
                        batch = replay.sample(cfg.learn_batch_size, cfg.algo, generator)
                    elif len(pending) >= cfg.slots_per_batch or (pending and not inflight):
                        batch = unrolls_to_batch(pending[: cfg.slots_per_batch], cfg.algo)
                        del pending[: cfg.slots_per_batch]
                    if batch is None:
                        break
                    tracker.on_update(learner.update(batch, common.progress(tracker, cfg)))
                    weights = ray.put(_weights(store))
                    tracker.maybe_log()
                    if replay is not None:
                        break  # one sampled update per round of messages
                waiting, idle[:] = idle[:], []
                for i in waiting:
                    request(i)
        finally:
            for actor in actors:
                ray.kill(actor)
    return model


def _weights(store: ParameterStore) -> tuple[int, object]:
    version, flat = store.snapshot()
    return version, flat.numpy()
