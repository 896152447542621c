"""The parameter store: pi's weights as one flat vector with a version, published by learners."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector


class ParameterStore:
    """Versioned flat weights of the main policy pi.

    The learner `publish`es after each update (version + 1); explorers `load_into` their local
    copy mu when the version has moved. The runtime decides where the two tensors live (plain or
    shared memory), so this class works the same in every runtime.

    One writer, many readers, no lock: `seq` is a sequence counter, odd while the writer is
    copying and `2 * version` otherwise; a reader copies and tries again if `seq` was odd or moved
    meanwhile (a seqlock). A reader that is killed mid-copy therefore blocks nobody, which a lock
    held by a dead explorer process would. (Ordering relies on x86's total store order.)
    """

    def __init__(self, flat: torch.Tensor, seq: torch.Tensor) -> None:
        if flat.dim() != 1 or seq.shape != (1,):
            raise ValueError(
                f"flat must be 1-D and seq of shape (1,); got {tuple(flat.shape)} and "
                f"{tuple(seq.shape)}"
            )
        self.flat = flat
        self._seq = seq

    @staticmethod
    def allocate(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors for a store of `model`'s size, holding its weights at version 0."""
        flat = parameters_to_vector(model.parameters()).detach().clone()
        return flat, torch.zeros(1, dtype=torch.int64)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(flat, seq)`, to hand to another process that builds a store over the same memory."""
        return self.flat, self._seq

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
        version = self.version + 1
        self._write(version, parameters_to_vector(model.parameters()))
        return version

    def assign(self, version: int, flat: torch.Tensor) -> None:
        """Stores weights received from elsewhere (another process or host) as `version`."""
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
