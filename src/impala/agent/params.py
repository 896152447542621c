"""The parameter store: pi's weights as one flat vector with a version, published by learners."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector


class ParameterStore:
    """Versioned flat weights of the main policy pi.

    The learner `publish`es after each update (version + 1); explorers `load_into` their local
    copy mu when the version has moved. The runtime decides where the tensors live (plain or
    shared memory) and which lock guards them (a thread or a process lock), so this class works
    the same in every runtime. The lock makes a reader never see half of an update.
    """

    def __init__(
        self, flat: torch.Tensor, version: torch.Tensor, lock: ContextManager | None = None
    ) -> None:
        if flat.dim() != 1 or version.shape != (1,):
            raise ValueError(
                f"flat must be 1-D and version of shape (1,); got {tuple(flat.shape)} and "
                f"{tuple(version.shape)}"
            )
        self.flat = flat
        self._version = version
        self._lock = lock if lock is not None else contextlib.nullcontext()

    @staticmethod
    def allocate(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors for a store of `model`'s size, holding its weights at version 0."""
        flat = parameters_to_vector(model.parameters()).detach().clone()
        return flat, torch.zeros(1, dtype=torch.int64)

    @property
    def version(self) -> int:
        return int(self._version[0])

    def publish(self, model: nn.Module) -> int:
        """Writes `model`'s weights as the next version and returns that version."""
        with torch.no_grad(), self._lock:
            self.flat.copy_(parameters_to_vector(model.parameters()))
            self._version += 1
            return int(self._version[0])

    def assign(self, version: int, flat: torch.Tensor) -> None:
        """Stores weights received from elsewhere (another process or host) as `version`."""
        with torch.no_grad(), self._lock:
            self.flat.copy_(flat)
            self._version[0] = version

    def snapshot(self) -> tuple[int, torch.Tensor]:
        """The current version and a copy of its weights."""
        with self._lock:
            return int(self._version[0]), self.flat.clone()

    def load_into(self, model: nn.Module, have_version: int) -> int | None:
        """Copies the weights into `model` if newer than `have_version`; returns the new version."""
        if self.version == have_version:
            return None
        with torch.no_grad(), self._lock:
            # Copy, never alias: torch's vector_to_parameters would make the model's parameters
            # views of the store, which the learner overwrites while the explorer acts.
            offset = 0
            for param in model.parameters():
                n = param.numel()
                param.copy_(self.flat[offset : offset + n].view_as(param))
                offset += n
            return int(self._version[0])
