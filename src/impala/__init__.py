"""IMPALA (Espeholt et al. 2018) in PyTorch: the Python API.

    import impala

    config = impala.Config(env="CartPole-v1", total_steps=200_000)
    result = impala.train(config)               # the same run as `impala train`, any runtime
    policy = impala.load_policy(result.run_dir)  # action, state = policy.act(observation, state)
    print(impala.evaluate(result.run_dir, episodes=10).return_mean)

The names in `__all__` are the stable API; everything else in the package is internal and may
change. Importing `impala` imports none of them yet (each is loaded on first use), starts nothing
and imports no optional package (Ray, W&B, ale-py...); the command line is `impala` (see
`impala.cli`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it (loaded on first use, PEP 562); every one is in __all__
_EXPORTS: dict[str, str] = {
    # configuration
    "Config": "impala.config",
    # training
    "train": "impala.api",
    "TrainResult": "impala.api",
    "Callback": "impala.callbacks",
    "StopTraining": "impala.callbacks",
    # trained policies
    "load_policy": "impala.policy",
    "Policy": "impala.policy",
    "PolicyState": "impala.policy",
    "evaluate": "impala.api",
    "EvalResult": "impala.api",
    # your own networks (see impala.nets.contract)
    "register_net": "impala.nets.custom",
    "PolicyValueNetwork": "impala.nets.contract",
    "RecurrentPolicyValueNetwork": "impala.nets.contract",
    "check_network": "impala.nets.contract",
    # errors
    "ConfigError": "impala.errors",
    "RunFailed": "impala.errors",
}

__all__ = [
    "__version__",
    "Config",
    "train",
    "TrainResult",
    "Callback",
    "StopTraining",
    "load_policy",
    "Policy",
    "PolicyState",
    "evaluate",
    "EvalResult",
    "register_net",
    "PolicyValueNetwork",
    "RecurrentPolicyValueNetwork",
    "check_network",
    "ConfigError",
    "RunFailed",
]

if TYPE_CHECKING:  # what type checkers, IDEs and documentation tools see
    from impala.api import EvalResult, TrainResult, evaluate, train
    from impala.callbacks import Callback, StopTraining
    from impala.config import Config
    from impala.errors import ConfigError, RunFailed
    from impala.nets.contract import PolicyValueNetwork, RecurrentPolicyValueNetwork, check_network
    from impala.nets.custom import register_net
    from impala.policy import Policy, PolicyState, load_policy


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'impala' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
