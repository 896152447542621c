"""Networks and environment factories that break the contracts, for the one-line error tests
(`--net extend_for_tests:NAME`, `--env extend_for_tests:NAME`, with this folder on the path)."""

import torch
from torch import nn

from impala.examples.custom_net import TwoTowerMLP, build


class WrongPolicyWidth(TwoTowerMLP):
    """Policy parameters one wider than the action space's."""

    def forward(self, obs):
        logits, values = super().forward(obs)
        return torch.cat([logits, logits[:, :1]], dim=-1), values


def wrong_policy_width(observation_space, action_spec, config):
    return WrongPolicyWidth(observation_space.shape[0], action_spec, 8, config.num_tasks)


class ValuesWithAnAxis(TwoTowerMLP):
    """Values `[N, 1]` where one task's are `[N]`."""

    def forward(self, obs):
        logits, values = super().forward(obs)
        return logits, values.unsqueeze(-1)


def values_with_an_axis(observation_space, action_spec, config):
    return ValuesWithAnAxis(observation_space.shape[0], action_spec, 8, config.num_tasks)


def raises(observation_space, action_spec, config):
    raise RuntimeError("no GPU kernel for this layer")


def not_a_module(observation_space, action_spec, config):
    return {"weights": torch.zeros(3)}


def no_action_spec(observation_space, action_spec, config):
    net = build(observation_space, action_spec, config)
    del net.action_spec
    return net


def lstm_less(observation_space, action_spec, config):
    """Says it is recurrent but has no recurrent methods."""
    net = build(observation_space, action_spec, config)
    net.is_recurrent = True
    return net


def no_parameters(observation_space, action_spec, config):
    net = nn.Module()
    net.action_spec, net.is_recurrent = action_spec, False
    return net


NOT_CALLABLE = 42  # an attribute that is no function


def factory_raises(**kwargs):
    raise ConnectionError("the simulator at 127.0.0.1:9 refused the connection")


def factory_returns_a_dict(**kwargs):
    return {"obs": 0}


def logged_cartpole(log_dir: str, render_mode=None, **kwargs):
    """The example factory, noting in `log_dir` which process called it with which arguments
    (a file per process): where the environments of a run were built."""
    import json
    import os
    from pathlib import Path

    from impala.examples.envs import make_cartpole

    with open(Path(log_dir) / f"{os.getpid()}.jsonl", "a") as log:
        log.write(json.dumps({"kwargs": kwargs, "render_mode": render_mode}) + "\n")
    return make_cartpole(render_mode=render_mode, **kwargs)


def no_render_mode(pole_length: float = 0.5):
    """A factory that takes no render_mode (what `impala eval --video` passes)."""
    from impala.examples.envs import make_cartpole

    return make_cartpole(pole_length=pole_length)
