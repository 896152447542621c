"""What every runtime builds the same way: the network, explorers, budgets and buffer sizes."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from impala.agent import Learner, ParameterStore
from impala.agent.factory import build_explorer, build_model
from impala.config import Config
from impala.envs import EnvInfo
from impala.metrics import Tracker

__all__ = [
    "Runtime",
    "build_explorer",
    "build_learner",
    "build_model",
    "explorer_budget",
    "progress",
    "seed_everything",
]


class Runtime(Protocol):
    """A runtime runs a whole training job and reports through the tracker."""

    def __call__(self, cfg: Config, env: EnvInfo, tracker: Tracker) -> nn.Module: ...


def build_learner(cfg: Config, env: EnvInfo, *, shared: bool = False) -> Learner:
    """The learner with a fresh network and its parameter store (in shared memory if asked),
    seeded and on one intra-op thread (the explorers need the other cores)."""
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    model = build_model(cfg, env)
    flat, version = ParameterStore.allocate(model)
    if shared:
        flat.share_memory_()
        version.share_memory_()
    return Learner(cfg, model, ParameterStore(flat, version))


def explorer_budget(cfg: Config) -> int:
    """Env steps each explorer makes (the run's total split evenly, rounded up)."""
    return math.ceil(cfg.steps_total / cfg.num_explorers)


def progress(tracker: Tracker, cfg: Config) -> float:
    return min(1.0, tracker.steps / cfg.steps_total)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
