"""The serial runtime: explorers and the learner take turns in one process.

Deterministic under a seed (one thread, fixed env and sampling seeds); for tests and debugging.
"""

from __future__ import annotations

import torch
from torch import nn

from impala.agent import ReplayBuffer, ReplayStaging, rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.config import Config
from impala.envs import EnvInfo
from impala.metrics import Tracker
from impala.runtime import common


def run(cfg: Config, env: EnvInfo, tracker: Tracker) -> nn.Module:
    learner = common.build_learner(cfg, env)
    model, store = learner.model, learner.store
    explorers = [common.build_explorer(cfg, env, i, store) for i in range(cfg.num_explorers)]
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    generator = torch.Generator().manual_seed(cfg.seed)
    budget = common.explorer_budget(cfg)
    made = [0] * cfg.num_explorers

    if cfg.buffer == "replay":
        slots = cfg.replay_slots_per_explorer
        buffer = ReplayBuffer(
            allocate(spec, cfg.num_explorers * slots),
            torch.zeros(cfg.num_explorers, dtype=torch.int64),
            slots,
        )
        staging = [
            ReplayStaging(spec, slots, i, buffer, cfg.upload_frequency)
            for i in range(cfg.num_explorers)
        ]
    else:
        storage = allocate(spec, cfg.slots_per_batch)
        filled: list[int] = []

    def learn(batch: dict[str, torch.Tensor]) -> None:
        tracker.on_update(learner.update(batch, common.progress(tracker, cfg)))
        tracker.maybe_log()

    try:
        while not tracker.should_stop():
            active = [i for i in range(cfg.num_explorers) if made[i] < budget]
            if not active:
                break
            for i in active:
                if cfg.buffer == "replay":
                    info = explorers[i].fill(staging[i].next_slot())
                    staging[i].commit(len(info.episode_returns))
                    batch = buffer.sample(cfg.learn_batch_size, cfg.algo, generator)
                else:
                    slot = len(filled)
                    info = explorers[i].fill(numpy_views(storage, slot))
                    filled.append(slot)
                    batch = None
                    if len(filled) == cfg.slots_per_batch:
                        batch = slots_to_batch(storage, filled, cfg.algo)
                        filled = []
                made[i] += info.steps
                tracker.on_unroll(info)
                if batch is not None:
                    learn(batch)
        if cfg.buffer == "fifo" and filled and not tracker.stop_reason:
            learn(slots_to_batch(storage, filled, cfg.algo))
    finally:
        for explorer in explorers:
            explorer.vec_env.close()
    return model
