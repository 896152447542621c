"""Unroll slots in shared memory passed between explorer processes and the learner, lock-free.

`multiprocessing.Queue`, `Event`, `Lock` and `Condition` all rest on semaphores shared between
processes: one killed while holding one (a `Queue.get` waiting for a slot holds the reader
lock) blocks every other process for good. Here nothing is shared that a dead process could hold:

- Slots `[i * k, (i + 1) * k)` belong to explorer `i`. `state[s]` goes FREE -> FULL only by the
  slot's explorer (after the unroll is written) and FULL -> FREE only by the learner (after it
  copied the unroll out): one writer per transition, so a process killed at any instant leaves
  every word valid. A dead explorer's FULL slots are still learned from; the slot it was writing
  is still FREE, and its replacement (which owns the same slots) writes it again.
- An explorer only writes into FREE slots of its own, so the learner never reads a torn unroll.
  Each slot carries the serial of the unroll written into it, set before (`serial[s, 0]`) and
  after (`serial[s, 1]`) the write. As in a seqlock, the learner reads the end serial before
  its copy and the begin serial after it: they differ if any write began before the copy ended
  or never ended, and such an unroll is counted as torn and not learned from (there should be
  none; the chaos check forces some with a broken writer to show they are caught).
- `made[i]`: env steps in explorer i's committed unrolls, written only by explorer i (its
  replacement continues from it, so a budget is never made twice).
- `beat[i]`: when explorer i last showed progress (CLOCK_MONOTONIC, ns: an env step, or a turn
  of a wait for the learner), written only by explorer i (and set to 0 by the learner before it
  starts one); the learner takes an explorer whose beat stops for --explorer-timeout as hung.
- `stop[0]`: written only by the learner; explorers poll it.
- `sampled[0]`: time steps the learner sampled from the seed's replay buffer, written only by the
  learner; explorers read it for the replay rate limit.

Wake-ups are by polling (sub-millisecond sleeps): no wait on anything another process could
fail to release. The ordering of plain stores relies on x86-64's total store order (as the
parameter store's seqlock does): each store is a separate numpy call, which neither the compiler
nor the CPU reorders with another store, and no protocol here needs a store ordered before a
later load. Other CPUs (aarch64) reorder stores; the local runtime refuses to start there
(`impala.runtime.local.check_memory_order`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from impala.agent.buffer import stacked_to_batch

FREE, FULL = 0, 1


class SlotBoard:
    """The shared words that say which slot holds what; the unrolls themselves live in the
    storage from `impala.agent.buffer.allocate`, indexed by the same slot numbers."""

    def __init__(self, num_explorers: int, slots_per_explorer: int) -> None:
        n = num_explorers * slots_per_explorer
        self.slots_per_explorer = slots_per_explorer
        self.state = torch.zeros(n, dtype=torch.int64).share_memory_()
        self.order = torch.zeros(n, dtype=torch.int64).share_memory_()  # commit time, ns
        self.serial = torch.zeros((n, 2), dtype=torch.int64).share_memory_()
        self.made = torch.zeros(num_explorers, dtype=torch.int64).share_memory_()
        self.stop = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.sampled = torch.zeros(1, dtype=torch.int64).share_memory_()  # replay rate limit
        self.beats = torch.zeros(num_explorers, dtype=torch.int64).share_memory_()
        self._views: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_views"] = None  # numpy views are made afresh in each process
        return state

    @property
    def _np(self) -> dict[str, np.ndarray]:
        if self._views is None:
            names = ("state", "order", "serial", "made", "stop", "sampled", "beats")
            self._views = {name: getattr(self, name).numpy() for name in names}
        return self._views

    def own(self, explorer: int) -> range:
        k = self.slots_per_explorer
        return range(explorer * k, (explorer + 1) * k)

    @property
    def stopping(self) -> bool:
        return bool(self._np["stop"][0])

    # --- the explorer's side ---------------------------------------------------------------------
    def take(self, explorer: int, go_on: Callable[[], bool]) -> int | None:
        """A FREE slot of `explorer`'s, waiting for one while `go_on()`; None once it is false."""
        state = self._np["state"]
        delay = 1e-4
        while True:
            for slot in self.own(explorer):
                if state[slot] == FREE:
                    return slot
            if not go_on():
                return None
            time.sleep(delay)
            delay = min(2 * delay, 2e-3)

    def begin(self, slot: int, serial: int) -> None:
        self._np["serial"][slot, 0] = serial

    def commit(self, explorer: int, slot: int, serial: int, steps: int) -> None:
        """The unroll in `slot` is whole: count its steps, then hand the slot to the learner."""
        views = self._np
        views["serial"][slot, 1] = serial
        views["made"][explorer] += steps
        views["order"][slot] = time.monotonic_ns()
        views["state"][slot] = FULL  # last: this store publishes the slot

    def publish_torn(self, slot: int) -> None:
        """Hands `slot` to the learner without its end serial, as a broken writer (or a memory
        order that reorders the stores) would: for the fault injection that shows the learner
        catches it (`impala.faults`, 'slot-torn')."""
        self._np["order"][slot] = time.monotonic_ns()
        self._np["state"][slot] = FULL

    def beat(self, explorer: int) -> None:
        """Explorer `explorer` shows progress (see `beats`)."""
        self._np["beats"][explorer] = time.monotonic_ns()

    def add_steps(self, explorer: int, steps: int) -> None:
        """Counts steps that went elsewhere (the seed's replay buffer has no slots to hand on)."""
        self._np["made"][explorer] += steps

    # --- the learner's side ----------------------------------------------------------------------
    def full(self) -> list[int]:
        """FULL slots, oldest commit first."""
        views = self._np
        slots = np.flatnonzero(views["state"] == FULL)
        return slots[np.argsort(views["order"][slots], kind="stable")].tolist()

    def end_serials(self, slots: list[int]) -> np.ndarray:
        """The end serials of `slots`, read before copying them out (see `whole`)."""
        return self._np["serial"][slots, 1].copy()

    def whole(self, slots: list[int], end_serials: np.ndarray) -> list[bool]:
        """After copying `slots` out: whether each copy is of one whole unroll, its begin serial
        now equal to the end serial read before the copy (`end_serials`)."""
        return (self._np["serial"][slots, 0] == end_serials).tolist()

    def release(self, slots: list[int]) -> None:
        self._np["state"][slots] = FREE

    def made_by(self, explorer: int) -> int:
        return int(self._np["made"][explorer])

    def made_in_total(self) -> int:
        return int(self._np["made"].sum())

    def sampled_steps(self) -> int:
        """Time steps the learner sampled from the replay buffer (written by the learner only)."""
        return int(self._np["sampled"][0])

    def set_sampled_steps(self, steps: int) -> None:
        self._np["sampled"][0] = steps

    def request_stop(self) -> None:
        self._np["stop"][0] = 1

    # --- liveness --------------------------------------------------------------------------------
    def last_beat(self, explorer: int) -> int:
        """When explorer `explorer` last showed progress (CLOCK_MONOTONIC ns), 0 for never."""
        return int(self._np["beats"][explorer])

    def reset_beat(self, explorer: int) -> None:
        """Before the learner starts explorer `explorer` (its predecessor is gone): never."""
        self._np["beats"][explorer] = 0


class SlotQueue:
    """The FIFO buffer's unrolls in the local runtime's slots, for `impala.agent.experience`: the
    FULL slots, oldest commit first. Taking copies them out, checks that each copy is whole
    (counting torn ones in `torn`, which are not learned from) and frees the slots."""

    def __init__(self, board: SlotBoard, storage: dict[str, torch.Tensor], algo: str) -> None:
        self.board, self.storage, self.algo = board, storage, algo
        self.torn = 0

    def __len__(self) -> int:
        return len(self.board.full())

    def take(self, n: int) -> dict[str, torch.Tensor] | None:
        slots = self.board.full()[:n]
        ends = self.board.end_serials(slots)
        index = torch.as_tensor(slots, dtype=torch.int64)
        stacked = {k: v.index_select(0, index) for k, v in self.storage.items()}
        whole = self.board.whole(slots, ends)
        self.board.release(slots)
        if not all(whole):
            self.torn += whole.count(False)
            if not any(whole):
                return None
            keep = torch.as_tensor([i for i, ok in enumerate(whole) if ok], dtype=torch.int64)
            stacked = {k: v.index_select(0, keep) for k, v in stacked.items()}
        return stacked_to_batch(stacked, self.algo)
