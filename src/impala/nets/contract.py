"""The network contract: what the learner and every explorer ask of a policy-value network.

The built-in networks obey it, and so must yours (`--net package.module:build`, see
`impala.nets.custom`). It is written once, here; a custom network is checked against it when it
is built (`check_network`: a dry forward pass on a sample observation), so that a mistake is one
line at the start of a run, not a shape error deep in the learner.

**Building.** `build(observation_space, action_spec, config, **net_kwargs) -> torch.nn.Module`:
`observation_space` is the Gymnasium space of the observations the network receives,
`action_spec` an `impala.distributions.ActionSpec` (what the policy's output means), `config`
the run's `impala.config.Config` (read `config.num_tasks`, `config.core_size`, ... from it), and
`net_kwargs` the JSON keyword arguments of `--net-kwargs`. It is called in the learner's process,
in every explorer process of every runtime and when a run is evaluated or loaded: build the same
network each time (its weights are copied from the learner's by parameter order and checked by
name and shape).

**Attributes.** `action_spec`: the `ActionSpec` given to `build`. `is_recurrent`: False for a
feed-forward network, True for one with a recurrent state (below).

**Observations.** A tensor `[N, *shape]` for an array (Box) space, of the space's dtype (image
frames arrive as uint8: convert them, e.g. `obs.float() / 255`); for `Dict` and `Tuple` spaces a
`dict[str, Tensor]` keyed by part name (a `Tuple`'s parts by their index, "0", "1", ...; nested
names joined with "."), each `[N, *part_shape]`. Images always arrive channels-first,
`[C, H, W]` (Gymnasium's `[H, W, C]` pixels are transposed, see `impala.envs.spaces`), and
`observation_space` describes exactly what arrives: images `[C, H, W]`, and for a `Dict` or
`Tuple` a flat `Dict` keyed by part name. N is the batch: an explorer's environments when
acting, `T x B` flattened time steps when learning.

**Outputs of a feed-forward network.** `forward(obs) -> (policy_params [N, P], values)`, where P
is `action_spec.params_size` (logits for Discrete and MultiDiscrete actions, a Gaussian's means
then log standard deviations for a Box: `impala.nets.heads.policy_head` makes such a layer) and
`values` is `[N]`, or `[N, K]` with one value per task in a multi-task run of K =
`config.num_tasks` tasks. `policy_logits(obs) -> policy_params [N, P]`: what acting needs (it
may skip the value). Floating-point tensors.

**Recurrent networks** (`is_recurrent = True`, run with `--core lstm`): `initial_state(B) ->
(h, c)`, two float32 tensors `[B, config.core_size]` (what each unroll records of the state), and
`unroll(obs, prev_action, prev_reward, first, state) -> (policy_params [T, B, P], values [T, B]
or [T, B, K], state)`, time-major: `obs [T, B, *shape]` (or a dict of such), `prev_action [T, B,
*action_shape]` (the action before each observation), `prev_reward [T, B]` float32, `first [T,
B]` bool (True where an episode starts: reset the state there), `state` the `(h, c)` before the
first step; it returns the state after the last. Explorers call it with T = 1.

**Optional parts the learner drives**: an `impala.nets.obsnorm.ObsNorm` module inside the network
has its statistics moved by the learner before each update (and shipped with the weights); an
`impala.nets.popart.PopArt` value head (`impala.nets.heads.value_head(F, popart_beta, K)`) is
needed by `--value-norm popart`.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from impala.distributions import ActionSpec
from impala.errors import ConfigError

Observation = Union[torch.Tensor, dict[str, torch.Tensor]]  # noqa: UP007 - a runtime alias
"""A batch of observations: a tensor `[N, *shape]`, or a dict of them for Dict/Tuple spaces."""

State = tuple[torch.Tensor, torch.Tensor]
"""A recurrent network's state: `(h, c)`, each `[B, core_size]` float32."""


@runtime_checkable
class PolicyValueNetwork(Protocol):
    """A feed-forward network as the learner and explorers call it (see the module doc)."""

    action_spec: ActionSpec
    is_recurrent: bool  # False

    def forward(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, ...]` -> policy parameters `[N, P]`, values `[N]` (`[N, K]` for K tasks)."""
        ...

    def policy_logits(self, obs: Observation) -> torch.Tensor:
        """obs `[N, ...]` -> policy parameters `[N, P]` (acting needs no value)."""
        ...


@runtime_checkable
class RecurrentPolicyValueNetwork(Protocol):
    """A network with a recurrent state `(h, c)` as the learner and explorers call it."""

    action_spec: ActionSpec
    is_recurrent: bool  # True

    def initial_state(self, batch_size: int) -> State:
        """Zeros, or a learned start: `(h [B, H], c [B, H])`, H = `config.core_size`."""
        ...

    def unroll(
        self,
        obs: Observation,
        prev_action: torch.Tensor,
        prev_reward: torch.Tensor,
        first: torch.Tensor,
        state: State,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """obs `[T, B, ...]`, prev_action `[T, B, *action_shape]`, prev_reward `[T, B]`, first
        `[T, B]` -> policy parameters `[T, B, P]`, values `[T, B]` (`[T, B, K]`), next state."""
        ...


# --- the check at start ----------------------------------------------------------------------

SAMPLE_BATCH = 2  # observations in the dry forward pass (2: a squeezed batch axis shows)


def sample_observation(space: gym.Space, batch: int) -> Observation:
    """A batch of `batch` zero observations of `space` as a network receives them: a tensor
    `[batch, *shape]` of the space's dtype, or for Dict and Tuple spaces a dict of such per part
    (a Tuple's parts keyed "0", "1", ...)."""
    if isinstance(space, gym.spaces.Dict):
        return {str(k): _as_tensor(sample_observation(s, batch)) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return {str(i): _as_tensor(sample_observation(s, batch)) for i, s in enumerate(space)}
    empty = gym.vector.utils.create_empty_array(space, n=batch, fn=np.zeros)
    return _as_tensor(empty)


def _as_tensor(value: object) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _describe_obs(obs: Observation) -> str:
    if isinstance(obs, dict):
        return "{" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in obs.items()) + "}"
    return _shape(obs)


def _shape(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    dtype = str(t.dtype).removeprefix("torch.")
    return f"[{', '.join(str(n) for n in t.shape)}] {dtype}"


def _with_time(obs: Observation, steps: int) -> Observation:
    """`obs` `[N, ...]` repeated along a new leading time axis: `[steps, N, ...]`."""
    if isinstance(obs, dict):
        return {k: _with_time(v, steps) for k, v in obs.items()}  # type: ignore[misc]
    return obs.unsqueeze(0).expand(steps, *obs.shape).contiguous()


class _Checker:
    """The checks of `check_network`, each raising ConfigError naming `where` and the part."""

    def __init__(self, where: str, action_spec: ActionSpec, num_tasks: int) -> None:
        self.where = where
        self.spec = action_spec
        self.num_tasks = num_tasks

    def fail(self, what: str) -> None:
        raise ConfigError(f"{self.where}: {what} (see impala.nets.contract)")

    def call(self, name: str, fn, *args):
        try:
            return fn(*args)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code, reported in one line
            text = " ".join(str(exc).split())[:300]
            self.fail(f"{name} raised {type(exc).__name__}: {text}")

    def tensor(self, value: object, name: str, shape: tuple[int, ...], float32: bool = False):
        if not isinstance(value, torch.Tensor):
            self.fail(f"{name} must be a torch.Tensor, got {_shape(value)}")
        if not value.is_floating_point() or (float32 and value.dtype != torch.float32):
            kind = "float32" if float32 else "floating-point"
            self.fail(f"{name} must be {kind}, got {_shape(value)}")
        if tuple(value.shape) != shape:
            self.fail(f"{name} has shape {_shape(value)}, expected [{', '.join(map(str, shape))}]")

    def outputs(self, out: object, call: str, lead: tuple[int, ...]) -> None:
        """The `(policy_params, values)` of a forward or unroll over leading axes `lead`."""
        if not isinstance(out, tuple | list) or len(out) < 2:
            self.fail(f"{call} must return (policy_params, values), got {_shape(out)}")
        P = self.spec.params_size
        self.tensor(
            out[0],
            f"the policy parameters of {call} (for {self.spec.describe()}: P = {P})",
            (*lead, P),
        )
        if self.num_tasks > 1:
            self.tensor(
                out[1], f"the values of {call} ({self.num_tasks} tasks)", (*lead, self.num_tasks)
            )
        else:
            self.tensor(out[1], f"the values of {call} (one task)", lead)


def check_network(
    model: object,
    observation_space: gym.Space,
    action_spec: ActionSpec,
    *,
    num_tasks: int = 1,
    core_size: int | None = None,
    popart: bool = False,
    where: str = "the network",
) -> None:
    """Checks `model` against the contract (module doc) with a dry pass on zero observations of
    `observation_space`: its attributes, the calls the learner and explorers make, and the
    shapes and dtypes they return. `core_size`: the state size of a recurrent run (`--core
    lstm`), None for a feed-forward one; `popart`: the run's `--value-norm popart` needs a
    PopArt head. ConfigError, one line naming `where` and what is wrong."""
    from impala.nets.popart import PopArt

    check = _Checker(where, action_spec, num_tasks)
    if not isinstance(model, nn.Module):
        check.fail(f"build must return a torch.nn.Module, got a {type(model).__name__}")
    assert isinstance(model, nn.Module)
    spec = getattr(model, "action_spec", None)
    if spec != action_spec:
        got = "none" if spec is None else repr(spec)
        check.fail(f"its action_spec must be the ActionSpec given to build, got {got}")
    recurrent = getattr(model, "is_recurrent", None)
    if not isinstance(recurrent, bool):
        check.fail("it must have is_recurrent = False (feed-forward) or True (recurrent)")
    if recurrent and core_size is None:
        check.fail("it is recurrent (is_recurrent = True): run it with --core lstm")
    if not recurrent and core_size is not None:
        check.fail("it is feed-forward (is_recurrent = False): run it without --core lstm")
    if not any(p.requires_grad for p in model.parameters()):
        check.fail("it has no parameters to learn")
    if popart and not any(isinstance(m, PopArt) for m in model.modules()):
        check.fail(
            "--value-norm popart needs a PopArt value head (impala.nets.heads.value_head with "
            "config.popart_beta); use --value-norm none"
        )
    obs = sample_observation(observation_space, SAMPLE_BATCH)
    training = model.training
    model.eval()  # no dropout, no batch-norm statistics moved by this pass
    try:
        with torch.no_grad():
            if recurrent:
                _check_recurrent(check, model, obs, core_size or 0)
            else:
                _check_feed_forward(check, model, obs)
    finally:
        model.train(training)


def _check_feed_forward(check: _Checker, model: nn.Module, obs: Observation) -> None:
    N = SAMPLE_BATCH
    call = f"forward(obs {_describe_obs(obs)})"
    check.outputs(check.call(call, model, obs), call, (N,))
    if not callable(getattr(model, "policy_logits", None)):
        check.fail("it must have policy_logits(obs) -> policy parameters (what acting calls)")
    call = f"policy_logits(obs {_describe_obs(obs)})"
    logits = check.call(call, model.policy_logits, obs)
    P = check.spec.params_size
    check.tensor(logits, f"the result of {call}", (N, P))


def _check_recurrent(check: _Checker, model: nn.Module, obs: Observation, core_size: int) -> None:
    B, T = SAMPLE_BATCH, 2
    for name in ("initial_state", "unroll"):
        if not callable(getattr(model, name, None)):
            check.fail(f"a recurrent network must have {name} (see RecurrentPolicyValueNetwork)")
    state = check.call(f"initial_state({B})", model.initial_state, B)
    _check_state(check, state, f"initial_state({B})", B, core_size)
    spec = check.spec
    prev_action = torch.zeros((T, B, *spec.action_shape), dtype=spec.action_dtype)
    prev_reward = torch.zeros((T, B), dtype=torch.float32)
    first = torch.ones((T, B), dtype=torch.bool)
    seq = _with_time(obs, T)
    call = f"unroll(obs {_describe_obs(seq)}, ...)"
    out = check.call(call, model.unroll, seq, prev_action, prev_reward, first, state)
    if not isinstance(out, tuple | list) or len(out) != 3:
        check.fail(f"{call} must return (policy_params, values, state), got {_shape(out)}")
    check.outputs(out[:2], call, (T, B))
    _check_state(check, out[2], f"the state {call} returns", B, core_size)


def _check_state(check: _Checker, state: object, name: str, batch: int, core_size: int) -> None:
    if not isinstance(state, tuple | list) or len(state) != 2:
        check.fail(f"{name} must be a pair (h, c) of tensors, got {_shape(state)}")
    for part, value in zip("hc", state, strict=True):  # type: ignore[arg-type]
        check.tensor(value, f"{part} of {name} (--core-size {core_size})", (batch, core_size), True)
