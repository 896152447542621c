"""Building the roles' parts from a config: the network and an explorer with its environments."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from impala.agent.explorer import ActingPolicy, Explorer
from impala.agent.learner import resolve_device, uses_bf16
from impala.agent.params import ParameterStore
from impala.config import Config
from impala.envs import EnvInfo, make_vector_env
from impala.envs.atari import protocol_record
from impala.nets import build_net, resolve_net, resolve_obs_norm
from impala.nets.custom import build_custom_net, is_custom, observation_space_of


def settle(cfg: Config, env: EnvInfo, *, learner: bool = True) -> Config:
    """The run's config with what depends on the environment made explicit (the network 'auto'
    stands for), after the checks that need the environment or the machine: ConfigError, one
    line, for observations no network takes, a network that does not fit them (your own network
    is built once and checked, see `impala.nets.contract`), or (for a learner) a device this
    machine lacks."""
    if learner:
        resolve_device(cfg.device)
    net = resolve_net(cfg.net, env)  # a registered name becomes its reference here
    settled = dataclasses.replace(cfg, net=net, obs_norm=resolve_obs_norm(cfg.obs_norm, net, env))
    if is_custom(net):
        build_model(settled, env)  # your network, checked against the contract before any start
    return settled


def run_record(cfg: Config, env: EnvInfo) -> dict[str, Any]:
    """What a run's config.json says beyond the config: the Atari protocol used."""
    if env.family == "atari":
        return {"atari_protocol": protocol_record(cfg.atari_protocol)}
    return {}


def build_model(cfg: Config, env: EnvInfo) -> nn.Module:
    """The run's network for `env`: a built-in one (`impala.nets.build_net`) or your own
    (`--net package.module:build`, built and checked by `impala.nets.custom`), the same in
    every process that calls this."""
    if is_custom(cfg.net):
        return build_custom_net(
            cfg.net,
            observation_space_of(env),
            env.action,
            cfg,
            net_kwargs=cfg.net_kwargs,
            num_tasks=env.num_tasks,
            core_size=cfg.recurrent_state_size,
            popart=cfg.value_norm == "popart",
        )
    return build_net(
        cfg.net,
        env,
        num_hidden=cfg.num_hidden,
        num_layers=cfg.num_layers,
        core=cfg.core,
        core_size=cfg.core_size,
        popart_beta=cfg.popart_beta if cfg.value_norm == "popart" else None,
        obs_norm=cfg.obs_norm,
    )


def explorer_seed(cfg: Config, index: int, start: tuple[int, int] = (0, 0)) -> int:
    """The seed of explorer `index`'s environments and action sampling. `start` says which start
    of that explorer this is: `(env steps the run had made before it was resumed, times this
    explorer was started again since)`. A run's first explorers keep the run's own seeds (the
    serial runtime rebuilds its explorers exactly from them); a replacement or a resumed run's
    explorer gets seeds of its own, so that a run preempted again and again does not replay the
    same episodes each time."""
    if start == (0, 0):
        return cfg.seed * 10_007 + 1_000 * (index + 1)
    entropy = [cfg.seed, index, *start]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def build_explorer(
    cfg: Config,
    env: EnvInfo,
    index: int,
    store: ParameterStore,
    *,
    record_actions: bool = False,
    start: tuple[int, int] = (0, 0),
    policy: ActingPolicy | None = None,
) -> Explorer:
    """Explorer `index` with its own environments and a fresh copy of the network
    (`record_actions`: keeps what its state for a checkpoint needs, see `Explorer.state`;
    `start`: which start of the explorer this is, see `explorer_seed`), or with `policy`
    acting for it (an inference server's client: no network in this process)."""
    model = None
    if policy is None:
        model = build_model(cfg, env)
        model.requires_grad_(False)
    # A multi-task run: explorer `index` plays task index % K, its frames padded to the shape
    # the network takes.
    vec_env = make_vector_env(
        env.task_id(index),
        cfg.envs_per_explorer,
        obs_shape=env.padded_shape,
        **cfg.env_options,
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
        seed=explorer_seed(cfg, index, start),
        step_printer=(lambda line: print(line, flush=True)) if cfg.print_steps else None,
        reward_clip=cfg.reward_clip,
        episodic_life=cfg.episodic_life,
        record_actions=record_actions,
        task=index % env.num_tasks if env.tasks else None,
        bf16=model is not None and explorer_bf16(cfg, model),
        policy=policy,
    )


def explorer_bf16(cfg: Config, model: nn.Module) -> bool:
    """Whether explorers act under bf16 autocast (`--explorer-precision`): 'bf16', or 'auto'
    where the learner's 'auto' would take bf16 on this CPU (conv nets, native bf16). Never for
    a feed-forward network that acts in numpy (`numpy_net`: the MLPs)."""
    make_numpy = getattr(model, "numpy_net", None)
    if not getattr(model, "is_recurrent", False) and make_numpy is not None and make_numpy():
        return False
    if cfg.explorer_precision == "auto":
        return uses_bf16("auto", model, torch.device("cpu"))
    return cfg.explorer_precision == "bf16"
