"""An explorer packaged for runtimes that move unrolls as messages between processes or hosts.

It keeps its own copy of the weights, takes new ones as `(version, flat)` and returns each unroll
(or, with the seed's replay buffer, each upload of its local buffer) as plain numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from impala.agent.buffer import ReplayStaging, rollout_spec
from impala.agent.explorer import UnrollInfo
from impala.agent.factory import build_explorer, build_model
from impala.agent.params import ParameterStore
from impala.config import Config
from impala.envs import EnvInfo

Payload = dict[str, Any]


class _CapturedUpload:
    """Stands in for the global replay buffer: keeps the upload to be sent as a message."""

    def __init__(self) -> None:
        self.payload: Payload | None = None

    def upload(self, explorer: int, local: dict[str, np.ndarray], count: int) -> None:
        self.payload = {"count": count, "local": {k: v[:count].copy() for k, v in local.items()}}


class ExplorerWorker:
    """`unroll(weights)` -> `(payload, info)`; `start` as in `impala.agent.factory.explorer_seed`.

    payload is `{"unroll": arrays}` for the FIFO buffer, `{"count", "local"}` when the seed's
    replay buffer is due an upload, or None.
    """

    def __init__(
        self, cfg: Config, env: EnvInfo, index: int, start: tuple[int, int] = (0, 0)
    ) -> None:
        self.cfg = cfg
        flat, version, layout = ParameterStore.allocate(build_model(cfg, env))
        version[0] = -2  # version -1: nothing received yet, the explorer must not act on these
        self.store = ParameterStore(flat, version, layout)
        self.explorer = build_explorer(cfg, env, index, self.store, start=start)
        spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
        if cfg.buffer == "replay":
            self._capture = _CapturedUpload()
            self._staging = ReplayStaging(
                spec, cfg.replay_slots_per_explorer, index, self._capture, cfg.upload_frequency
            )
        else:
            self._out = {
                k: np.zeros(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
                for k, (shape, dtype) in spec.items()
            }

    @property
    def version(self) -> int:
        return self.store.version

    def set_weights(self, version: int, flat: np.ndarray | torch.Tensor) -> None:
        if version != self.store.version:
            self.store.assign(version, torch.tensor(flat))  # a copy: Ray's arrays are read-only

    def unroll(self, weights: tuple[int, Any] | None = None) -> tuple[Payload | None, UnrollInfo]:
        if weights is not None:
            self.set_weights(*weights)
        if self.store.version < 0:
            raise RuntimeError("an explorer needs weights before its first unroll")
        if self.cfg.buffer == "replay":
            info = self.explorer.fill(self._staging.next_slot())
            payload = None
            if self._staging.commit(len(info.episode_returns)):
                payload, self._capture.payload = self._capture.payload, None
            return payload, info
        info = self.explorer.fill(self._out)
        return {"unroll": {k: v.copy() for k, v in self._out.items()}}, info

    def close(self) -> None:
        self.explorer.vec_env.close()
