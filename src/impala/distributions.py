"""Policies over Gymnasium's action spaces: what a network's policy output means, the
log-probabilities and entropies the learner takes of it, and how explorers sample from it.

A network's policy output is a flat vector of *policy parameters* per step, `[..., P]`, recorded
by the explorer for the behaviour policy mu and recomputed by the learner for pi:

- `Discrete(n)`: the logits of one softmax (categorical) policy, P = n;
- `MultiDiscrete(nvec)`: the logits of one independent categorical per component, concatenated,
  P = sum(nvec); the joint log-probability of an action is the sum of its components', and the
  entropy of the joint policy is the sum of the components' entropies;
- `Box(low, high, (d,))`: a diagonal Gaussian over *normalised* actions u, its d means then its d
  log standard deviations, P = 2d. For finite bounds the environment receives
  `clip(centre + half_range * u, low, high)`, so u in [-1, 1] spans the box whatever its units;
  unbounded dimensions take u as it is. Bounds are handled by **clipping**, not squashing: the
  recorded action is the unclipped sample u, and its log-probability is the Gaussian's, so
  importance ratios pi(u)/mu(u) are exact, and the mass beyond a bound acts as the bound (as
  Stable-Baselines3's and CleanRL's PPO do). Squashing (tanh) would need the change-of-variables
  term in every log-probability and has no closed-form entropy.

Everything here is pure: tensors (or numpy arrays, for sampling) in, tensors out. Shapes:
`params [..., P]`, `actions [..., *action_shape]` (`()` for Discrete, `(k,)` for MultiDiscrete,
`(d,)` for Box) -> `[...]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Kind = Literal["discrete", "multi_discrete", "box"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class ActionSpec:
    """An action space as the networks, buffers and losses see it.

    kind: 'discrete', 'multi_discrete' or 'box'.
    nvec: the number of choices per component ((n,) for Discrete); empty for Box.
    low, high: a Box's bounds per dimension (may be +-inf); empty otherwise.
    """

    kind: Kind
    nvec: tuple[int, ...] = ()
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    @staticmethod
    def discrete(n: int) -> ActionSpec:
        return ActionSpec("discrete", (int(n),))

    @property
    def dim(self) -> int:
        """Components of one action: 1 for Discrete, len(nvec), or the Box's dimensions."""
        return len(self.low) if self.kind == "box" else len(self.nvec)

    @property
    def params_size(self) -> int:
        """P, the width of the policy parameters per step."""
        return 2 * self.dim if self.kind == "box" else sum(self.nvec)

    @property
    def action_shape(self) -> tuple[int, ...]:
        return () if self.kind == "discrete" else (self.dim,)

    @property
    def action_dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "box" else torch.int64

    @property
    def feature_size(self) -> int:
        """Width of `action_features` (a recurrent core's last-action input)."""
        return self.dim if self.kind == "box" else sum(self.nvec)

    @property
    def num_actions(self) -> int:
        """The number of actions of a Discrete space (ValueError for the others)."""
        if self.kind != "discrete":
            raise ValueError(f"a {self.kind} action space has no single number of actions")
        return self.nvec[0]

    def describe(self) -> str:
        if self.kind == "discrete":
            return f"Discrete({self.nvec[0]})"
        if self.kind == "multi_discrete":
            return f"MultiDiscrete({list(self.nvec)})"
        return f"Box({self.dim},)"

    # --- the normalised Box actions ---------------------------------------------------------
    def _centre_and_scale(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        bounded = np.isfinite(low) & np.isfinite(high)
        centre = np.where(bounded, (np.where(bounded, low, 0) + np.where(bounded, high, 0)) / 2, 0)
        scale = np.where(bounded, (np.where(bounded, high, 1) - np.where(bounded, low, -1)) / 2, 1)
        return centre, scale

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        """What the environment receives for `actions` `[N, *action_shape]` (the recorded ones):
        Box actions mapped from normalised units to the box and clipped to it; others as they
        are."""
        if self.kind != "box":
            return actions
        centre, scale = self._centre_and_scale()
        out = centre + scale * np.asarray(actions, np.float64)
        return np.clip(out, self.low, self.high).astype(np.float32)

    def from_env(self, actions: np.ndarray) -> np.ndarray:
        """The normalised actions that `to_env` maps to `actions` (Box; others as they are)."""
        if self.kind != "box":
            return actions
        centre, scale = self._centre_and_scale()
        return ((np.asarray(actions, np.float64) - centre) / scale).astype(np.float32)


def _split(spec: ActionSpec, params: torch.Tensor) -> list[torch.Tensor]:
    """Per-component logits of a (multi-)categorical policy."""
    return list(torch.split(params, list(spec.nvec), dim=-1))


def _check(spec: ActionSpec, params: torch.Tensor, actions: torch.Tensor | None = None) -> None:
    if params.dim() < 1 or params.shape[-1] != spec.params_size:
        raise ValueError(
            f"policy parameters of {spec.describe()} must be [..., {spec.params_size}], got shape "
            f"{tuple(params.shape)}"
        )
    if actions is None:
        return
    want = tuple(params.shape[:-1]) + spec.action_shape
    if tuple(actions.shape) != want:
        raise ValueError(
            f"actions of {spec.describe()} must have shape {want} (the parameters' "
            f"{tuple(params.shape)} without their last dim, then {spec.action_shape}), got "
            f"{tuple(actions.shape)}"
        )
    if spec.kind != "box" and (actions.is_floating_point() or actions.dtype == torch.bool):
        raise ValueError(f"actions of {spec.describe()} must be integers, got {actions.dtype}")


def log_prob(spec: ActionSpec, params: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a | x) of `actions` under the policy with `params`, with gradient through the
    parameters: the joint log-probability (a sum over components) for MultiDiscrete and Box.

    params `[..., P]`, actions `[..., *action_shape]` -> `[...]`."""
    _check(spec, params, actions)
    if spec.kind == "box":
        mean, log_std = params.chunk(2, dim=-1)
        z = (actions.to(mean.dtype) - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)
    if spec.kind == "discrete":
        logp = F.log_softmax(params, dim=-1)
        return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    total = torch.zeros(params.shape[:-1], dtype=params.dtype, device=params.device)
    for i, logits in enumerate(_split(spec, params)):
        logp = F.log_softmax(logits, dim=-1)
        total = total + logp.gather(-1, actions[..., i].long().unsqueeze(-1)).squeeze(-1)
    return total


def entropy(spec: ActionSpec, params: torch.Tensor) -> torch.Tensor:
    """The entropy of the (joint) policy with `params`, `[..., P]` -> `[...]`, with gradient: a
    sum of the components' entropies (they are independent), for a Gaussian in closed form,
    sum(log sigma + 0.5 log(2 pi e))."""
    _check(spec, params)
    if spec.kind == "box":
        log_std = params.chunk(2, dim=-1)[1]
        return (log_std + _HALF_LOG_2PI + 0.5).sum(-1)
    if spec.kind == "discrete":
        logp = F.log_softmax(params, dim=-1)
        return -(logp.exp() * logp).sum(-1)
    total = torch.zeros(params.shape[:-1], dtype=params.dtype, device=params.device)
    for logits in _split(spec, params):
        logp = F.log_softmax(logits, dim=-1)
        total = total - (logp.exp() * logp).sum(-1)
    return total


def action_features(spec: ActionSpec, actions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A recurrent core's input for the last action, `[..., *action_shape]` -> `[..., F]`: one-hot
    (one per component, concatenated) for discrete spaces, the normalised action clipped to
    [-1, 1] for a Box."""
    if spec.kind == "box":
        return actions.to(dtype).clamp(-1.0, 1.0)
    if spec.kind == "discrete":
        return F.one_hot(actions.long(), spec.nvec[0]).to(dtype)
    return torch.cat(
        [F.one_hot(actions[..., i].long(), n).to(dtype) for i, n in enumerate(spec.nvec)], -1
    )


# --- acting (numpy: explorers sample thousands of small batches) -------------------------------


def _sample_categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row of `logits` `[N, A]` by inverse-CDF sampling, which costs a fraction of
    torch.multinomial's per-call overhead on small batches."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = probs.cumsum(axis=1)
    if not math.isfinite(cdf[:, -1].sum()):  # NaN if any logit was NaN or infinite
        _check_finite(cdf[:, -1])
    u = rng.random((len(logits), 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), logits.shape[1] - 1)


def _check_finite(values: np.ndarray) -> None:
    """ValueError, naming how many rows, if the policy's outputs were not finite: a sample from
    them would be meaningless (every comparison with NaN is false: action 0 for every row)."""
    bad = ~np.isfinite(values)
    if bad.any():
        rows = int(bad.reshape(len(values), -1).any(axis=1).sum())
        raise ValueError(
            f"the policy's outputs are not finite (NaN or infinite) for {rows} of {len(values)} "
            "environments: observations that are not finite, or a network that overflowed"
        )


def sample(spec: ActionSpec, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row of `params` `[N, P]`: `[N, *action_shape]` (int64, or float32 for a
    Box: normalised and unclipped, as recorded)."""
    if spec.kind == "discrete":
        return _sample_categorical(params, rng)
    if spec.kind == "box":
        mean, log_std = np.split(params, 2, axis=1)
        noise = rng.standard_normal(mean.shape)
        actions = (mean + np.exp(log_std) * noise).astype(np.float32)
        _check_finite(actions)
        return actions
    return np.stack([_sample_categorical(p, rng) for p in _columns(spec, params)], axis=1)


def mode(spec: ActionSpec, params: np.ndarray) -> np.ndarray:
    """The most probable action per row of `params` `[N, P]` (greedy evaluation)."""
    if spec.kind == "discrete":
        return params.argmax(axis=1)
    if spec.kind == "box":
        return np.split(params, 2, axis=1)[0].astype(np.float32)
    return np.stack([p.argmax(axis=1) for p in _columns(spec, params)], axis=1)


def _columns(spec: ActionSpec, params: np.ndarray) -> list[np.ndarray]:
    """A MultiDiscrete policy's per-component logits `[N, n_i]`."""
    return np.split(params, np.cumsum(spec.nvec)[:-1], axis=1)


def as_spec(action: int | ActionSpec) -> ActionSpec:
    """`action` as an ActionSpec: an int n is Discrete(n)."""
    return action if isinstance(action, ActionSpec) else ActionSpec.discrete(action)
