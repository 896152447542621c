"""The parameter store: pi's weights as one flat vector with a version, published by learners."""

from __future__ import annotations

import math
import time
import weakref

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from impala.errors import ConfigError

Layout = tuple[tuple[str, tuple[int, ...]], ...]
"""A network's parameters in the order the flat vector holds them: (name, shape) each."""


def layout_of(model: nn.Module) -> Layout:
    """The names and shapes of `model`'s parameters, in `model.parameters()`'s order."""
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def layout_mismatch(expected: Layout, found: Layout) -> str | None:
    """None if the layouts are the same, else what differs first, in words."""
    if expected == found:
        return None
    for i, (want, got) in enumerate(zip(expected, found, strict=False)):
        if want != got:
            return (
                f"parameter {i} is '{got[0]}' {list(got[1])} where the store holds "
                f"'{want[0]}' {list(want[1])}"
            )
    size = sum(math.prod(shape) for _, shape in found)
    store_size = sum(math.prod(shape) for _, shape in expected)
    return (
        f"{len(found)} parameter tensors ({size:,} numbers) where the store holds "
        f"{len(expected)} ({store_size:,})"
    )


class ParameterStore:
    """Versioned flat weights of the main policy pi.

    The learner `publish`es after each update (version + 1); explorers `load_into` their local
    copy mu when the version has moved. The runtime decides where the two tensors live (plain or
    shared memory), so this class works the same in every runtime.

    The store knows the `layout` (parameter names and shapes) it was allocated for: a network of
    another layout (a process that built another network than the learner's) is refused in one
    line (ConfigError) on its first load or publish, never filled by a prefix of the vector.

    One writer, many readers, no lock: `seq` is a sequence counter, odd while the writer is
    copying and `2 * version` otherwise; a reader copies and tries again if `seq` was odd or moved
    meanwhile (a seqlock). A reader that is killed mid-copy therefore blocks nobody, which a lock
    held by a dead explorer process would. (Ordering relies on x86's total store order.)
    """

    def __init__(self, flat: torch.Tensor, seq: torch.Tensor, layout: Layout) -> None:
        if flat.dim() != 1 or seq.shape != (1,):
            raise ValueError(
                f"flat must be 1-D and seq of shape (1,); got {tuple(flat.shape)} and "
                f"{tuple(seq.shape)}"
            )
        size = sum(math.prod(shape) for _, shape in layout)
        if size != flat.numel():
            raise ValueError(f"the layout holds {size} numbers, the flat vector {flat.numel()}")
        self.flat = flat
        self._seq = seq
        self.layout = layout
        self._checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models of this layout

    @staticmethod
    def allocate(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        """`(flat, seq, layout)` for a store of `model`'s parameters, holding its weights at
        version 0 (`ParameterStore(*ParameterStore.allocate(model))`)."""
        flat = parameters_to_vector(model.parameters()).detach().clone()
        return flat, torch.zeros(1, dtype=torch.int64), layout_of(model)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        """`(flat, seq, layout)`, to hand to another process that builds a store over the same
        memory."""
        return self.flat, self._seq, self.layout

    def check(self, model: nn.Module) -> None:
        """ConfigError, one line, unless `model` has the layout of this store (checked once per
        model)."""
        if model in self._checked:
            return
        mismatch = layout_mismatch(self.layout, layout_of(model))
        if mismatch is not None:
            raise ConfigError(
                f"the network built in this process is not the one the learner publishes: "
                f"{mismatch} (every process must build the same network: give it with --net "
                "package.module:build, not by patching impala in one process)"
            )
        self._checked.add(model)

    @property
    def version(self) -> int:
        return int(self._seq[0]) // 2

    def _write(self, version: int, values: torch.Tensor) -> None:
        with torch.no_grad():
            self._seq[0] = 2 * version - 1  # odd: readers wait
            self.flat.copy_(values)
            self._seq[0] = 2 * version

    def publish(self, model: nn.Module) -> int:
        """Writes `model`'s weights as the next version and returns that version."""
        self.check(model)
        version = self.version + 1
        self._write(version, parameters_to_vector(model.parameters()))
        return version

    def assign(self, version: int, flat: torch.Tensor) -> None:
        """Stores weights received from elsewhere (another process or host) as `version`;
        ConfigError, one line, for a vector of another size."""
        if flat.dim() != 1 or flat.numel() != self.flat.numel():
            raise ConfigError(
                f"weights of shape {list(flat.shape)} received for a network of "
                f"{self.flat.numel():,} parameters (every process must build the same network)"
            )
        self._write(version, flat)

    def _stable_seq(self) -> int:
        """The sequence counter once no write is in progress (a writer's copy takes micro- to
        milliseconds; one that never finishes is a writer that died)."""
        deadline = time.monotonic() + 10.0
        while (seq := int(self._seq[0])) % 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the parameter store's writer stopped in the middle of a write")
        return seq

    def snapshot(self) -> tuple[int, torch.Tensor]:
        """The current version and a copy of its weights."""
        while True:
            seq = self._stable_seq()
            copy = self.flat.clone()
            if int(self._seq[0]) == seq:
                return seq // 2, copy

    def load_into(self, model: nn.Module, have_version: int) -> int | None:
        """Copies the weights into `model` if newer than `have_version`; returns the new version."""
        if self.version == have_version:
            return None
        self.check(model)
        while True:
            seq = self._stable_seq()
            with torch.no_grad():
                # Copy, never alias: torch's vector_to_parameters would make the model's
                # parameters views of the store, which the learner overwrites while we act.
                offset = 0
                for param in model.parameters():
                    n = param.numel()
                    param.copy_(self.flat[offset : offset + n].view_as(param))
                    offset += n
            if int(self._seq[0]) == seq:
                return seq // 2
