"""Building the roles' parts from a config: the network and an explorer with its environments."""

from __future__ import annotations

from torch import nn

from impala.agent.explorer import Explorer
from impala.agent.params import ParameterStore
from impala.config import Config
from impala.envs import EnvInfo, make_vector_env
from impala.nets import build_net


def build_model(cfg: Config, env: EnvInfo) -> nn.Module:
    return build_net(cfg.net, env, num_hidden=cfg.num_hidden, num_layers=cfg.num_layers)


def explorer_seed(cfg: Config, index: int) -> int:
    return cfg.seed * 10_007 + 1_000 * (index + 1)


def build_explorer(cfg: Config, env: EnvInfo, index: int, store: ParameterStore) -> Explorer:
    """Explorer `index` with its own environments and a fresh copy of the network."""
    model = build_model(cfg, env)
    model.requires_grad_(False)
    vec_env = make_vector_env(
        cfg.env, cfg.envs_per_explorer, max_episode_steps=cfg.max_steps_per_episode
    )
    return Explorer(
        index,
        vec_env,
        model,
        store,
        unroll_length=cfg.unroll_length,
        gamma=cfg.gamma,
        algo=cfg.algo,
        sync=cfg.sync,
        seed=explorer_seed(cfg, index),
        step_printer=(lambda line: print(line, flush=True)) if cfg.print_steps else None,
    )
