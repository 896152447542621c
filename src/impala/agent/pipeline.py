"""The learner's batch pipeline: what happens to a batch between its arrival and the updates it
makes, in one fixed order:

    policy-lag filter -> minibatch split -> replay mixing -> extra passes (APPO)

Each stage takes a V-trace batch (see `impala.agent.buffer`) and yields the batches that go on:
the filter none or one, the split one per minibatch, the mixing one, the extra passes the batch
and then batches drawn from the last few. The pipeline chains them lazily, so each batch is made
just before its update (the random draws of the replay and of the extra passes come in the same
order as the updates).

Why this order: the lag limit judges sequences as they arrive (replayed sequences, old by design,
and APPO's later passes over batches that passed it are not held to it); an explorer's unroll
wider than --batch-size is learned from in minibatches, in order (V-trace corrects the later
ones' extra lag); each minibatch is joined by replayed sequences (the paper's replay share of
every update); APPO passes over the batches as they are learned from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from impala.agent.buffer import SequenceReplay, num_sequences, select_sequences

Batch = dict[str, torch.Tensor]
Stage = Callable[[Batch], Iterable[Batch]]


class PolicyLagFilter:
    """Drops the sequences whose oldest step was acted by a policy more than `max_lag` versions
    behind the learner's (`version()`), counting them in `dropped`; yields the rest, or
    nothing if none is left."""

    def __init__(self, max_lag: int, version: Callable[[], int]) -> None:
        self.max_lag, self.version = max_lag, version
        self.dropped = 0

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        oldest = batch["policy_version"].min(0).values  # [B]
        fresh = (self.version() - oldest) <= self.max_lag
        dropped = int((~fresh).sum())
        self.dropped += dropped
        if dropped == 0:
            yield batch
        elif dropped < num_sequences(batch):
            yield select_sequences(batch, torch.nonzero(fresh).squeeze(1))


class MinibatchSplit:
    """A batch wider than `size` sequences (an explorer's unroll of more environments than
    --batch-size) as consecutive minibatches of `size` sequences."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        width = num_sequences(batch)
        if width <= self.size:
            yield batch
            return
        for start in range(0, width, self.size):
            yield select_sequences(batch, torch.arange(start, start + self.size))


class ReplayMixing:
    """The paper's replay experiment: each batch joined by sequences drawn from a replay of past
    ones (see `SequenceReplay.mix`)."""

    def __init__(self, replay: SequenceReplay) -> None:
        self.replay = replay

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        yield self.replay.mix(batch)


class ExtraPasses:
    """APPO's passes: the batch (moved to the learner's device once, by `to_device`), then
    `passes - 1` batches drawn at random from a circular buffer of the last `keep` batches, this
    one included."""

    def __init__(
        self, passes: int, keep: int, seed: int, to_device: Callable[[Batch], Batch]
    ) -> None:
        self.passes, self.to_device = passes, to_device
        self.recent: deque[Batch] = deque(maxlen=keep)
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        batch = self.to_device(batch)
        self.recent.append(batch)
        yield batch
        for _ in range(self.passes - 1):
            yield self.recent[int(torch.randint(len(self.recent), (), generator=self.rng))]


class Pipeline:
    """`stages` applied in order, lazily: `pipeline(batch)` iterates over the batches to learn
    from."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        return self._run(batch, 0)

    def _run(self, batch: Batch, index: int) -> Iterator[Batch]:
        if index == len(self.stages):
            yield batch
            return
        for out in self.stages[index](batch):
            yield from self._run(out, index + 1)
