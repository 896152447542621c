"""The serial runtime: explorers and the learner take turns in one process.

Deterministic under a seed (one thread, fixed env and sampling seeds); for tests and debugging.
Explorers are stepped inline, in turn, whenever the loop asks for a batch.
"""

from __future__ import annotations

import torch

from impala.agent import Learner, ReplayBuffer, ReplayStaging, UnrollInfo, rollout_spec
from impala.agent.buffer import allocate, as_stored
from impala.agent.experience import Experience, ListQueue
from impala.config import Config
from impala.envs import EnvInfo
from impala.loop import Batch
from impala.runtime import common


class SerialSource:
    """Explorers in this process, as a `BatchSource` (see `impala.loop`): the explorers are
    stepped in turn whenever the shared `Experience` has no batch due."""

    def __init__(
        self, cfg: Config, env: EnvInfo, learner: Learner, tracker, steps_before: int = 0
    ) -> None:
        self.cfg, self.env, self.learner = cfg, env, learner
        self.budget = common.explorer_budget(cfg)
        self.made = [0] * cfg.num_explorers
        self.explorers: list = []
        self.counters: dict[str, int] = {}
        self._infos: list[UnrollInfo] = []
        self._turn = 0
        self.queue: ListQueue | None = None
        self.replay: ReplayBuffer | None = None
        self.experience: Experience | None = None

    def start(self) -> None:
        cfg, env = self.cfg, self.env
        spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
        for i in range(cfg.num_explorers):
            self.explorers.append(
                common.build_explorer(
                    cfg, env, i, self.learner.store, record_actions=cfg.algo == "vtrace"
                )
            )
        generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.buffer == "replay":
            slots = cfg.replay_slots_per_explorer
            self.replay = ReplayBuffer.allocate(spec, cfg.num_explorers, slots)
            self.staging = [
                ReplayStaging(spec, slots, i, self.replay, cfg.upload_frequency)
                for i in range(cfg.num_explorers)
            ]
            self.experience = Experience(cfg, replay=self.replay, generator=generator)
        else:
            self.scratch = {k: v[0].numpy() for k, v in allocate(spec, 1).items()}
            self.queue = ListQueue(cfg.algo)
            self.experience = Experience(cfg, queue=self.queue, generator=generator)

    def _active(self) -> list[int]:
        return [i for i in range(self.cfg.num_explorers) if self.made[i] < self.budget]

    def next_batch(self, timeout: float) -> Batch | None:
        """Steps the explorers in turn until the experience has a batch due (or all have made
        their steps and nothing more is due)."""
        cfg = self.cfg
        while True:
            batch = self.experience.next_batch(sum(self.made), not self._active())
            if batch is not None or not self._active():
                return batch
            i = self._turn % cfg.num_explorers
            self._turn += 1
            if self.made[i] >= self.budget:
                continue
            if self.replay is not None:
                info = self.explorers[i].fill(self.staging[i].next_slot())
                self.staging[i].commit(len(info.episode_returns))
            else:
                info = self.explorers[i].fill(self.scratch)
                self.queue.put({k: v.copy() for k, v in self.scratch.items()})
            self.made[i] += info.steps
            self._infos.append(info)

    # --- checkpoints: the serial runtime resumes exactly ----------------------------------------
    def state(self) -> dict:
        """Everything that decides what comes next, taken between two updates: the explorers
        (see `Explorer.state`), their turn, budgets, the sampling generator and the replay
        buffer with its staging. Empty for REINFORCE (its explorers' collected episodes are
        not kept; a resumed REINFORCE run starts fresh episodes)."""
        unfinished_batch = self.queue is not None and len(self.queue) > 0
        if self.cfg.algo != "vtrace" or not self.explorers or unfinished_batch:
            return {}
        state = {
            "kind": "serial",
            "made": list(self.made),
            "turn": self._turn,
            "generator": self.experience.generator.get_state(),
            "explorers": [explorer.state() for explorer in self.explorers],
        }
        if self.cfg.buffer == "replay":
            state["replay"] = {
                "storage": {k: v.clone() for k, v in self.replay.storage.items()},
                "filled": self.replay.filled.clone(),
                "seq": self.replay.seq.clone(),
                "sampled": self.experience.rate.sampled,
                "staging": [
                    {
                        "local": {k: torch.from_numpy(v.copy()) for k, v in s.local.items()},
                        "next": s._next,
                        "count": s._count,
                        "episodes": s._episodes_since_upload,
                        "written": s._written_since_upload,
                    }
                    for s in self.staging
                ],
            }
        return state

    def restore(self, state: dict) -> bool:
        """After `start()`: back to a checkpoint's `state`. Returns False when it holds none or
        the environments did not come back where they were (then the run goes on, not exactly
        as it would have)."""
        if state.get("kind") != "serial" or len(state["explorers"]) != len(self.explorers):
            return False
        self.made = list(state["made"])
        self._turn = int(state["turn"])
        self.experience.generator.set_state(state["generator"])
        exact = all(e.restore(s) for e, s in zip(self.explorers, state["explorers"], strict=True))
        if "replay" in state:
            r = state["replay"]
            for k, v in self.replay.storage.items():
                v.copy_(as_stored(r["storage"][k], v))
            self.replay.filled.copy_(r["filled"])
            self.replay.seq.copy_(r["seq"])
            self.experience.rate.sampled = int(r["sampled"])
            for staging, s in zip(self.staging, r["staging"], strict=True):
                for k, v in staging.local.items():
                    v[...] = s["local"][k].numpy()
                staging._next, staging._count = int(s["next"]), int(s["count"])
                staging._episodes_since_upload = int(s["episodes"])
                staging._written_since_upload = int(s.get("written", 0))
        return exact

    def poll(self) -> list[UnrollInfo]:
        infos, self._infos = self._infos, []
        return infos

    def check(self) -> None:
        pass

    def exhausted(self) -> bool:
        return self.experience.exhausted(sum(self.made), not self._active())

    def close(self) -> None:
        for explorer in self.explorers:
            explorer.vec_env.close()
        self.explorers = []
