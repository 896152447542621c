"""A torso with the policy and value heads on top: the feed-forward agent network."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from impala.distributions import ActionSpec, as_spec
from impala.errors import ConfigError
from impala.nets.popart import PopArt

# A Gaussian policy's log standard deviations are kept within these (std 0.007 to 7.4 in
# normalised action units): beyond them a step can make a log-probability overflow. They bound
# the parameter itself, projected back after each optimizer step (`constrain_parameters`), not
# its use in forward: a clamp there has no gradient, and a log_std that one step carried past a
# bound stayed pinned there for good.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def value_head(
    num_features: int, popart_beta: float | None = None, num_tasks: int = 1
) -> nn.Module:
    """A linear value layer `[N, F] -> [N, K]`, or PopArt if `popart_beta` is given; one output
    per task of a multi-task run (K = `num_tasks`). `values` reads either."""
    if popart_beta is not None:
        return PopArt(num_features, popart_beta, num_tasks)
    return nn.Linear(num_features, num_tasks)


def values(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The values of a `value_head`: `[N]` for one task, `[N, K]` for K (see `task_values`)."""
    out = head(features)
    if isinstance(head, PopArt):
        return out
    return out.squeeze(-1) if out.shape[-1] == 1 else out


def value_outputs(state_dict: dict[str, torch.Tensor]) -> int | None:
    """How many tasks a network's state dict has value outputs (and PopArt statistics) for, or
    None if it has no value head of `value_head`'s making."""
    for key, tensor in state_dict.items():
        if key.endswith(("value_head.bias", "value.bias", "value_head.mu", "value.mu")):
            return int(tensor.shape[0])
    return None


def check_value_outputs(state_dict: dict[str, torch.Tensor], model: nn.Module, what: str) -> None:
    """ConfigError, one line, if `state_dict` (`what`: a checkpoint) has value outputs for another
    number of tasks than `model`: multi-task PopArt statistics given to a one-task network, or
    the other way round."""
    if not isinstance(state_dict, dict):
        return  # not a state dict at all: the caller's loading says so
    theirs, ours = value_outputs(state_dict), value_outputs(model.state_dict())
    if theirs is not None and ours is not None and theirs != ours:
        raise ConfigError(
            f"{what} has value outputs (and PopArt statistics, if any) for {theirs} task(s), "
            f"this network for {ours}: a multi-task checkpoint needs its run's list of {theirs} "
            "ids in --env, and a one-task checkpoint one id"
        )


def task_values(values: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
    """Each sequence's own task's values: `values [T, B, K]` and `task [B]` -> `[T, B]` (K = 1:
    a single task's, `task` unused)."""
    if values.shape[-1] == 1:
        return values.squeeze(-1)
    index = task.long().view(1, -1, 1).expand(values.shape[0], -1, 1)
    return values.gather(-1, index).squeeze(-1)


class GaussianPolicy(nn.Module):
    """A diagonal Gaussian's parameters from features, `[N, F] -> [N, 2d]`: means from a linear
    layer, then log standard deviations that are parameters of their own (not of the state), as
    in PPO's usual continuous policy (see `impala.distributions`)."""

    def __init__(self, num_features: int, dim: int, log_std_init: float = 0.0) -> None:
        super().__init__()
        if not LOG_STD_MIN <= log_std_init <= LOG_STD_MAX:
            raise ValueError(
                f"log_std_init must be in [{LOG_STD_MIN}, {LOG_STD_MAX}], got {log_std_init}"
            )
        self.mean = nn.Linear(num_features, dim)
        self.log_std = nn.Parameter(torch.full((dim,), float(log_std_init)))
        self.register_load_state_dict_pre_hook(_load_log_std_in_bounds)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features `[N, F]` -> means and log standard deviations `[N, 2d]`. The log_std is used
        as it is (its gradient flows at the bounds too); `constrain_` keeps it within them."""
        mean = self.mean(features)
        return torch.cat([mean, self.log_std.to(mean.dtype).expand_as(mean)], dim=-1)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Projects log_std into [LOG_STD_MIN, LOG_STD_MAX], in place."""
        self.log_std.clamp_(LOG_STD_MIN, LOG_STD_MAX)


def _load_log_std_in_bounds(
    policy: GaussianPolicy, state_dict: dict, prefix: str, *args: object, **kwargs: object
) -> None:
    """A load_state_dict pre-hook: loads log_std projected into its bounds (a copy; the caller's
    tensor is left as it is). A checkpoint written while forward clamped could hold one beyond
    them: projected, forward gives what it gave then, from the first step on."""
    key = prefix + "log_std"
    log_std = state_dict.get(key)
    if isinstance(log_std, torch.Tensor) and log_std.is_floating_point():
        state_dict[key] = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


# Per model, the modules with parameter constraints (a `constrain_` method), found once: a model
# that has none costs a dictionary look-up per call.
_CONSTRAINED: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]] = (
    weakref.WeakKeyDictionary()
)


def constrain_parameters(model: nn.Module) -> None:
    """Applies the constraints of every module of `model` to its parameters, in place and without
    gradient (a `GaussianPolicy` projects its log_std into [LOG_STD_MIN, LOG_STD_MAX]). Call it
    after each optimizer step, before the weights are published, and after loading weights by any
    means other than `load_state_dict` (which projects as it loads). The constrained modules are
    looked up on the first call for `model`: modules swapped in later are not seen."""
    constrained = _CONSTRAINED.get(model)
    if constrained is None:
        constrained = tuple(m for m in model.modules() if callable(getattr(m, "constrain_", None)))
        _CONSTRAINED[model] = constrained
    for module in constrained:
        module.constrain_()


def policy_head(num_features: int, action: int | ActionSpec) -> nn.Module:
    """The policy's output layer for an action space, `[N, F] -> [N, P]` (P its parameters'
    width): logits for discrete spaces, a Gaussian's means and log standard deviations for a
    Box."""
    action = as_spec(action)
    if action.kind == "box":
        return GaussianPolicy(num_features, action.dim)
    return nn.Linear(num_features, action.params_size)


def init_policy_head(head: nn.Module, gain: float = 0.01) -> None:
    """Orthogonal weights with a small gain, zero biases: a first policy near uniform (near zero
    means for a Gaussian)."""
    linear = head.mean if isinstance(head, GaussianPolicy) else head
    nn.init.orthogonal_(linear.weight, gain=gain)
    nn.init.zeros_(linear.bias)


class Heads(nn.Module):
    """Policy parameters (logits for discrete actions) and state value from a feature vector."""

    def __init__(
        self,
        num_features: int,
        action: int | ActionSpec,
        popart_beta: float | None = None,
        num_tasks: int = 1,
    ) -> None:
        super().__init__()
        self.policy = policy_head(num_features, action)
        self.value = value_head(num_features, popart_beta, num_tasks)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features `[N, F]` -> policy parameters (logits for discrete actions) `[N, P]`, values
        `[N]` (`[N, K]` for K tasks)."""
        return self.policy(features), values(self.value, features)


class PolicyValueNet(nn.Module):
    """`torso` (obs `[N, ...]` -> `[N, F]`, with `num_features`), a policy head for the action
    space `action` (an int: that many discrete actions) and a value head."""

    is_recurrent = False

    def __init__(
        self,
        torso: nn.Module,
        action: int | ActionSpec,
        popart_beta: float | None = None,
        num_tasks: int = 1,
    ) -> None:
        super().__init__()
        self.action_spec = as_spec(action)
        self.torso = torso
        self.heads = Heads(torso.num_features, self.action_spec, popart_beta, num_tasks)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, ...]` -> policy parameters `[N, P]` (logits `[N, A]` for discrete actions),
        values `[N]`."""
        return self.heads(self.torso(obs))

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, ...]` -> policy parameters `[N, P]` (acting needs no value)."""
        return self.heads.policy(self.torso(obs))
