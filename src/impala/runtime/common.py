"""What every runtime builds the same way: the network, explorers, budgets and buffer sizes."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from impala.agent.factory import build_explorer, build_model
from impala.config import Config
from impala.envs import EnvInfo
from impala.metrics import Tracker

__all__ = [
    "Runtime",
    "build_explorer",
    "build_model",
    "explorer_budget",
    "progress",
    "seed_everything",
]


class Runtime(Protocol):
    """A runtime runs a whole training job and reports through the tracker."""

    def __call__(self, cfg: Config, env: EnvInfo, tracker: Tracker) -> nn.Module: ...


def explorer_budget(cfg: Config) -> int:
    """Env steps each explorer makes (the run's total split evenly, rounded up)."""
    return math.ceil(cfg.steps_total / cfg.num_explorers)


def progress(tracker: Tracker, cfg: Config) -> float:
    return min(1.0, tracker.steps / cfg.steps_total)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
