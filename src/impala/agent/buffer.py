"""The global buffer between explorers and learners: its layout, FIFO batching and the seed's
round-robin replay buffer.

Every unroll has the same layout (`rollout_spec`), time-major, one column per environment of the
explorer that made it. The runtime pre-allocates the storage (plain or shared memory) and moves
unrolls by index; these functions only read and write tensors.

Batches handed to the learner:
- V-trace: time-major sequences, `obs [T+1, B, *obs]`, `action [T, B, *action_shape]`,
  `behaviour_logits [T, B, P]` (mu's policy parameters, see `impala.distributions`), other fields
  `[T, B]`; with a recurrent core also the core's inputs `prev_action`, `prev_reward`, `first`
  (`[T+1, B, ...]`) and its state at the unroll's start `core_h`, `core_c [B, H]`; in a
  multi-task run each sequence's task, `task [B]`;
- REINFORCE: independent steps, every field `[N, ...]` (`obs [N, *obs]`, `mc_return [N]`).

Observations are one field per part of the observation space (`impala.envs.spaces`): `obs` for
a lone space, `obs/<name>` for each part of a Dict or Tuple, each in its own dtype; everything
above said of `obs` holds for each of them. Image observations `[C, H, W]` (parts of rank 3) are
stored frames-last, `[H, W, C]` (see `Part.stored_shape`): the layout the convolutions take
(channels-last), so that the learner reads a batch's frames as they are where it used to reorder
every frame of every batch, and the explorer, which reorders its frames once anyway to act on
them (or gets them so from an `[H, W, C]` environment), writes them with a plain copy. Batches
give them back as `[..., C, H, W]` views (`frames_first`).
"""

from __future__ import annotations

import numpy as np
import torch

from impala import faults
from impala.envs import EnvInfo
from impala.envs.spaces import IMAGE_RANK, obs_keys

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]

# IMAGE_RANK: observations (parts) of this rank are images [C, H, W], stored [H, W, C]


def stored_obs_shape(obs_shape: tuple[int, ...]) -> tuple[int, ...]:
    """How an observation of `obs_shape` is laid out in an unroll: images frames-last."""
    if len(obs_shape) != IMAGE_RANK:
        return tuple(obs_shape)
    channels, height, width = obs_shape
    return (height, width, channels)


def frames_last(obs: np.ndarray) -> np.ndarray:
    """Images `[..., C, H, W]` as stored, `[..., H, W, C]` (a view; a plain copy to write when
    `obs` is laid out channels-last, see `impala.agent.explorer`)."""
    lead = tuple(range(obs.ndim - IMAGE_RANK))
    return obs.transpose(*lead, obs.ndim - 2, obs.ndim - 1, obs.ndim - 3)


def frames_first(stored: torch.Tensor) -> torch.Tensor:
    """Stored images `[..., H, W, C]` as the networks take them, `[..., C, H, W]` (a view, in
    the channels-last layout)."""
    return stored.movedim(-1, -3)


def rollout_spec(
    env: EnvInfo, unroll_length: int, num_envs: int, core_size: int | None = None
) -> Spec:
    """Field name -> (shape, dtype) of one unroll of `num_envs` environments (`core_size`: the
    LSTM's units, for a recurrent network). Observations have a field per part of the space
    (`impala.envs.spaces`), each of the environment's type (uint8 frames stay uint8 until the
    learner's forward pass); images are stored frames-last."""
    T, E, P = unroll_length, num_envs, env.action.params_size
    action_shape, action_dtype = env.action.action_shape, env.action.action_dtype
    obs: Spec = {
        part.key: ((T + 1, E, *part.stored_shape), _torch_dtype(part.dtype))
        for part in env.obs.parts
    }
    extra: Spec = {}
    if env.num_tasks > 1:  # a multi-task run: the task each column's sequence belongs to
        extra["task"] = ((E,), torch.int64)
    if core_size is not None:
        extra |= {
            "prev_action": ((T + 1, E, *action_shape), action_dtype),
            "prev_reward": ((T + 1, E), torch.float32),
            "first": ((T + 1, E), torch.bool),
            "core_h": ((E, core_size), torch.float32),
            "core_c": ((E, core_size), torch.float32),
        }
    return (
        extra
        | obs
        | {
            "action": ((T, E, *action_shape), action_dtype),
            "behaviour_logits": ((T, E, P), torch.float32),
            "reward": ((T, E), torch.float32),
            "discount": ((T, E), torch.float32),
            "truncation_value": ((T, E), torch.float32),
            "mc_return": ((T, E), torch.float32),
            "policy_version": ((T, E), torch.int64),
        }
    )


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def as_stored(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A saved field (a checkpoint's replay storage) in the layout of `like`, the storage it goes
    back into: images saved frames-first, before they were stored frames-last, are reordered."""
    if saved.shape != like.shape and saved.dim() == like.dim() >= IMAGE_RANK:
        reordered = saved.movedim(-3, -1)
        if reordered.shape == like.shape:
            return reordered
    return saved


def allocate(spec: Spec, num_slots: int, *, shared: bool = False) -> dict[str, torch.Tensor]:
    """`num_slots` unrolls of `spec`, as tensors `[num_slots, *shape]` (shared memory if asked)."""
    storage = {
        k: torch.zeros((num_slots, *shape), dtype=dtype) for k, (shape, dtype) in spec.items()
    }
    if shared:
        for tensor in storage.values():
            tensor.share_memory_()
    return storage


def numpy_views(storage: dict[str, torch.Tensor], slot: int) -> dict[str, np.ndarray]:
    """Numpy views of one slot (writes go straight into the storage)."""
    return {k: v[slot].numpy() for k, v in storage.items()}


def slots_to_batch(
    storage: dict[str, torch.Tensor], slots: list[int], algo: str
) -> dict[str, torch.Tensor]:
    """Gathers whole unrolls into one learner batch (a copy; the slots can be reused at once)."""
    index = torch.as_tensor(slots, dtype=torch.int64)
    return stacked_to_batch({k: v.index_select(0, index) for k, v in storage.items()}, algo)


def unrolls_to_batch(unrolls: list[dict[str, np.ndarray]], algo: str) -> dict[str, torch.Tensor]:
    """One learner batch from unrolls received as separate arrays (from other processes)."""
    return stacked_to_batch(
        {k: torch.from_numpy(np.stack([u[k] for u in unrolls])) for k in unrolls[0]}, algo
    )


def stacked_to_batch(stacked: dict[str, torch.Tensor], algo: str) -> dict[str, torch.Tensor]:
    """Unrolls stacked as `[S, T(+1), E, ...]` -> the learner's layout (see the module doc)."""
    if algo == "reinforce":
        # [S, T, E, ...] -> [S * T * E, ...]; obs[T] is not part of a REINFORCE unroll.
        T = stacked["action"].shape[1]
        fields = _reinforce_fields(stacked)
        return _obs_as_taken({k: stacked[k][:, :T].flatten(0, 2) for k in fields}, 1)
    # [S, T(+1), E, ...] -> [T(+1), S * E, ...]; a state [S, E, H] -> [S * E, H]
    batch = {k: stacked[k].transpose(0, 1).flatten(1, 2) for k in _vtrace_fields(stacked)}
    for k in _STATE_FIELDS:
        if k in stacked:
            batch[k] = stacked[k].flatten(0, 1)
    return _obs_as_taken(batch, 2)


def _obs_as_taken(batch: dict[str, torch.Tensor], lead: int) -> dict[str, torch.Tensor]:
    """`batch` with its stored observations as the networks take them (images frames-first);
    `lead`: the batch dims in front of each observation (V-trace's [T+1, B], REINFORCE's [N])."""
    for key in obs_keys(batch):
        if batch[key].dim() == lead + IMAGE_RANK:
            batch[key] = frames_first(batch[key])
    return batch


_VTRACE_FIELDS = (
    "action",
    "behaviour_logits",
    "reward",
    "discount",
    "truncation_value",
    "policy_version",
)
_CORE_INPUTS = ("prev_action", "prev_reward", "first")
_STATE_FIELDS = ("core_h", "core_c", "task")  # no time axis


def _vtrace_fields(fields) -> tuple[str, ...]:
    """A V-trace batch's time-major fields among `fields`: the observation parts', then the
    rest."""
    return (*obs_keys(fields), *_VTRACE_FIELDS, *(k for k in _CORE_INPUTS if k in fields))


_REINFORCE_FIELDS = ("action", "behaviour_logits", "mc_return", "policy_version")


def _reinforce_fields(fields) -> tuple[str, ...]:
    return (*obs_keys(fields), *_REINFORCE_FIELDS)


class ReplayBuffer:
    """The seed prototype's global buffer: each explorer owns a slice of `slots_per_explorer`
    unrolls (its `-b` time steps), overwritten round robin by its uploads; learners sample at
    random from everything uploaded so far.

    `storage` is `[num_explorers * slots_per_explorer, ...]` (see `allocate`); `filled` and
    `seq` are int64 tensors `[num_explorers]`: the uploaded slots of each slice, and a sequence
    counter per slice, odd while its explorer is uploading. A sample that overlapped an upload
    is drawn again, so it never mixes two uploads, and no lock is held: an explorer killed in
    the middle of an upload only takes its own slice out of sampling until it uploads again.
    The runtime supplies the tensors (plain or in shared memory).
    """

    def __init__(
        self,
        storage: dict[str, torch.Tensor],
        filled: torch.Tensor,
        slots_per_explorer: int,
        seq: torch.Tensor | None = None,
    ) -> None:
        self.storage = storage
        self.filled = filled
        self.slots_per_explorer = slots_per_explorer
        self.seq = seq if seq is not None else torch.zeros_like(filled)

    @classmethod
    def allocate(
        cls, spec: Spec, num_explorers: int, slots_per_explorer: int, *, shared: bool = False
    ) -> ReplayBuffer:
        """An empty buffer of `num_explorers` slices of `slots_per_explorer` unrolls of `spec`
        (in shared memory if asked)."""
        storage = allocate(spec, num_explorers * slots_per_explorer, shared=shared)
        filled = torch.zeros(num_explorers, dtype=torch.int64)
        seq = torch.zeros(num_explorers, dtype=torch.int64)
        if shared:
            filled.share_memory_()
            seq.share_memory_()
        return cls(storage, filled, slots_per_explorer, seq)

    @property
    def num_slots_filled(self) -> int:
        return int(self.filled.sum())

    def num_readable(self) -> int:
        """Slots the learner can sample now: those of slices no upload is writing (or left torn)."""
        seq, filled = self.seq.tolist(), self.filled.tolist()
        return sum(int(n) for s, n in zip(seq, filled, strict=True) if s % 2 == 0)

    def _begin_write(self, explorer: int) -> int:
        """Marks `explorer`'s slice as being written (odd, and never seen before); returns the
        mark, whose successor ends the write."""
        seq = int(self.seq[explorer])
        writing = seq + 1 if seq % 2 == 0 else seq + 2
        self.seq[explorer] = writing
        return writing

    def upload(self, explorer: int, local: dict[str, np.ndarray], count: int) -> None:
        """Copies an explorer's local buffer (`count` valid slots) into its slice."""
        start = explorer * self.slots_per_explorer
        writing = self._begin_write(explorer)
        for i, (k, v) in enumerate(self.storage.items()):
            # Into the storage's numpy view: `local` may be read-only (arrays Ray delivered).
            v[start : start + count].numpy()[...] = local[k][:count]
            if i == 0:
                faults.point("replay-upload")  # tests: killed with the slice half written
        self.filled[explorer] = count
        self.seq[explorer] = writing + 1

    def claim(self, explorer: int) -> None:
        """An explorer (re)starting takes over its slice. If its predecessor died in the middle of
        an upload, the slice is still marked as being written and holds a mix of two uploads: it
        is emptied and marked readable again, so that the learner, which skips such a slice, is
        not left waiting for data that no upload will ever complete. A slice left whole keeps
        what it holds until the new explorer's first upload."""
        if int(self.seq[explorer]) % 2 == 0:
            return
        writing = self._begin_write(explorer)
        self.filled[explorer] = 0
        self.seq[explorer] = writing + 1

    def sample(
        self, learn_batch_size: int, algo: str, generator: torch.Generator, tries: int = 10
    ) -> dict[str, torch.Tensor] | None:
        """`learn_batch_size` time steps drawn uniformly at random, or None while nothing is
        readable.

        REINFORCE draws single steps. V-trace needs sequences, so it draws
        `max(1, learn_batch_size // T)` whole environment columns of length T.
        """
        for _ in range(tries):
            seq = self.seq.clone()
            readable = [
                torch.arange(i * self.slots_per_explorer, i * self.slots_per_explorer + int(n))
                for i, n in enumerate(self.filled.tolist())
                if seq[i] % 2 == 0
            ]
            slots = torch.cat(readable) if readable else torch.zeros(0, dtype=torch.int64)
            if len(slots) == 0:
                return None
            batch = self._draw(slots, learn_batch_size, algo, generator)
            if torch.equal(self.seq, seq):
                return batch
        return None

    def _draw(self, slots, learn_batch_size, algo, generator) -> dict[str, torch.Tensor]:
        T, E = self.storage["action"].shape[1:3]
        if algo == "reinforce":
            n = learn_batch_size
            slot = slots[torch.randint(len(slots), (n,), generator=generator)]
            t = torch.randint(T, (n,), generator=generator)
            e = torch.randint(E, (n,), generator=generator)
            fields = _reinforce_fields(self.storage)
            return _obs_as_taken({k: self.storage[k][slot, t, e] for k in fields}, 1)
        n = max(1, learn_batch_size // T)
        slot = slots[torch.randint(len(slots), (n,), generator=generator)]
        e = torch.randint(E, (n,), generator=generator)
        # storage[k][slot, :, e] is [n, T(+1), ...]; the learner wants time-major.
        batch = {
            k: self.storage[k][slot, :, e].transpose(0, 1) for k in _vtrace_fields(self.storage)
        }
        for k in _STATE_FIELDS:
            if k in self.storage:
                batch[k] = self.storage[k][slot, e]
        return _obs_as_taken(batch, 2)


class ReplayRate:
    """The replay buffer's rate limit: the learner samples `ratio` time steps per env step made.

    `debt = ratio * made - sampled`: the learner may sample while it is positive, explorers may
    go on while it is below `slack` (so neither runs away from the other, however fast each is).
    The learner's side keeps `sampled` here; explorers in other processes pass it in.
    """

    def __init__(self, ratio: float, slack: float) -> None:
        self.ratio, self.slack = ratio, slack
        self.sampled = 0

    def explorers_may_act(self, made: int, sampled: int | None = None) -> bool:
        sampled = self.sampled if sampled is None else sampled
        return self.ratio * made - sampled < self.slack

    def sample(
        self,
        buffer: ReplayBuffer,
        made: int,
        learn_batch_size: int,
        algo: str,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor] | None:
        """A batch from `buffer` if the learner is owed one (`made` env steps so far), else
        None (it waits for new steps)."""
        if self.ratio * made - self.sampled <= 0:
            return None
        batch = buffer.sample(learn_batch_size, algo, generator)
        if batch is not None:
            self.sampled += batch["policy_version"].numel()  # time steps, whatever the action
        return batch


class ReplayStaging:
    """An explorer's local round-robin buffer, uploaded to its slice every `upload_frequency`
    episodes (the seed prototype's `-f`), and also once more unrolls were written since the last
    upload than it holds (it started overwriting what was never uploaded): with episodes longer
    than the buffer, the learner would otherwise wait for ever for data while the explorers wait
    for the learner (the rate limit)."""

    def __init__(
        self, spec: Spec, slots: int, explorer: int, buffer: ReplayBuffer, upload_frequency: int
    ) -> None:
        self.local = {
            k: np.zeros((slots, *shape), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
            for k, (shape, dtype) in spec.items()
        }
        self.slots = slots
        self.explorer = explorer
        self.buffer = buffer
        self.upload_frequency = upload_frequency
        self._next = 0
        self._count = 0
        self._episodes_since_upload = 0
        self._written_since_upload = 0

    def next_slot(self) -> dict[str, np.ndarray]:
        """Views of the local slot the next unroll goes to (the oldest one)."""
        return {k: v[self._next] for k, v in self.local.items()}

    def commit(self, episodes_finished: int) -> bool:
        """Marks the slot from `next_slot` as written; uploads when enough episodes ended."""
        self._next = (self._next + 1) % self.slots
        self._count = min(self._count + 1, self.slots)
        self._episodes_since_upload += episodes_finished
        self._written_since_upload += 1
        if (
            self._episodes_since_upload >= self.upload_frequency
            or self._written_since_upload > self.slots
        ):
            self.buffer.upload(self.explorer, self.local, self._count)
            self._episodes_since_upload = 0
            self._written_since_upload = 0
            return True
        return False


# --- whole columns of V-trace batches -------------------------------------------------------


def _batch_dim(key: str) -> int:
    """The batch (sequence) dim of a V-trace batch field: 1 for time-major fields, 0 for a
    recurrent state."""
    return 0 if key in _STATE_FIELDS else 1


def num_sequences(batch: dict[str, torch.Tensor]) -> int:
    """B, the sequences in a V-trace batch."""
    return batch["reward"].shape[1]


def select_sequences(
    batch: dict[str, torch.Tensor], index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The sequences `index` of a V-trace batch (a copy)."""
    return {k: v.index_select(_batch_dim(k), index.to(v.device)) for k, v in batch.items()}


def join_sequences(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """V-trace batches side by side: one batch with all their sequences, in order."""
    return {k: torch.cat([b[k] for b in batches], _batch_dim(k)) for k in batches[0]}


class SequenceReplay:
    """The learner's replay of past unroll sequences, for the paper's replay experiment
    (`--replay-fraction`, `--replay-size`): a ring of `capacity` sequences of V-trace batches,
    drawn uniformly at random with the learner's generator. Every field keeps its batch's dtype
    (frames stay uint8); the storage is allocated at the first batch, on the CPU."""

    def __init__(self, capacity: int, fraction: float, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.fraction = fraction
        self.generator = generator
        self.storage: dict[str, torch.Tensor] | None = None
        self.size = 0  # sequences held
        self.next = 0  # where the next one goes

    def mix(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` (B fresh sequences) with round(B f / (1 - f)) sequences drawn from the
        replay after them, so that a share f of the result is replayed; the fresh sequences
        are then kept (they are not drawn in their own batch). Nothing is added before the
        replay holds anything."""
        count = round(num_sequences(batch) * self.fraction / (1.0 - self.fraction))
        replayed = self.sample(count) if self.size and count else None
        self.add(batch)
        return batch if replayed is None else join_sequences(batch, replayed)

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        columns = {k: v.cpu().movedim(_batch_dim(k), 0) for k, v in batch.items()}
        if self.storage is None:
            self.storage = {
                k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
                for k, v in columns.items()
            }
        count = min(num_sequences(batch), self.capacity)  # a batch larger than the ring: its last
        where = (self.next + torch.arange(count)) % self.capacity
        for k, v in columns.items():
            self.storage[k][where] = v[-count:]
        self.next = int((self.next + count) % self.capacity)
        self.size = min(self.capacity, self.size + count)

    def sample(self, count: int) -> dict[str, torch.Tensor]:
        assert self.storage is not None and self.size > 0
        index = torch.randint(self.size, (count,), generator=self.generator)
        return {k: v[index].movedim(0, _batch_dim(k)) for k, v in self.storage.items()}

    def state(self) -> dict:
        """What a checkpoint keeps: the sequences held, the ring's position, the generator."""
        held = None  # copies: a view would save the whole ring's storage
        if self.storage is not None:
            held = {k: v[: self.size].clone() for k, v in self.storage.items()}
        return {"held": held, "next": self.next, "rng": self.generator.get_state()}

    def restore(self, state: dict) -> None:
        self.storage, self.size, self.next = None, 0, 0
        held = state["held"]
        if held is not None:
            self.storage = {
                k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
                for k, v in held.items()
            }
            self.size = len(next(iter(held.values())))
            for k, v in held.items():
                self.storage[k][: self.size] = v
            self.next = int(state["next"])
        self.generator.set_state(state["rng"])
