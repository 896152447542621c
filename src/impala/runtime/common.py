"""What every runtime builds the same way: the network, explorers, budgets and buffer sizes."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from impala.agent import Explorer, ParameterStore
from impala.config import Config
from impala.envs import EnvInfo, make_vector_env
from impala.metrics import Tracker
from impala.nets import build_net


class Runtime(Protocol):
    """A runtime runs a whole training job and reports through the tracker."""

    def __call__(self, cfg: Config, env: EnvInfo, tracker: Tracker) -> nn.Module: ...


def build_model(cfg: Config, env: EnvInfo) -> nn.Module:
    return build_net(cfg.net, env, num_hidden=cfg.num_hidden, num_layers=cfg.num_layers)


def build_explorer(cfg: Config, env: EnvInfo, index: int, store: ParameterStore) -> Explorer:
    """Explorer `index` with its own environments and a fresh copy of the network."""
    model = build_model(cfg, env)
    model.requires_grad_(False)
    vec_env = make_vector_env(
        cfg.env, cfg.envs_per_explorer, max_episode_steps=cfg.max_steps_per_episode
    )
    return Explorer(
        index, vec_env, model, store,
        unroll_length=cfg.unroll_length, gamma=cfg.gamma, algo=cfg.algo, sync=cfg.sync,
        seed=explorer_seed(cfg, index),
    )


def explorer_seed(cfg: Config, index: int) -> int:
    return cfg.seed * 10_007 + 1_000 * (index + 1)


def explorer_budget(cfg: Config) -> int:
    """Env steps each explorer makes (the run's total split evenly, rounded up)."""
    return math.ceil(cfg.steps_total / cfg.num_explorers)


def replay_slots_per_explorer(cfg: Config) -> int:
    """Unroll slots in each explorer's slice of the replay buffer (its `-b` time steps)."""
    return max(1, cfg.buffer_size // (cfg.unroll_length * cfg.envs_per_explorer))


def progress(tracker: Tracker, cfg: Config) -> float:
    return min(1.0, tracker.steps / cfg.steps_total)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
