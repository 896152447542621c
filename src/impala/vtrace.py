"""V-trace (Espeholt et al. 2018, Sec. 4.1, eq. 1, Remarks 1-2).

Paper letters: mu is the behaviour policy (the explorer's copy that chose the actions), pi the
target policy (the learner's current one). All functions are pure: tensors in, tensors out,
time-major `[T, B, ...]`. The returned targets carry no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class VTraceReturns(NamedTuple):
    vs: torch.Tensor
    pg_advantages: torch.Tensor


class VTraceFromLogitsReturns(NamedTuple):
    vs: torch.Tensor
    pg_advantages: torch.Tensor
    log_rhos: torch.Tensor
    behaviour_action_log_probs: torch.Tensor
    target_action_log_probs: torch.Tensor


def action_log_probs(policy_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | x_t): logits `[T, B, A]`, actions `[T, B]` -> `[T, B]` (keeps gradient)."""
    if policy_logits.shape[:-1] != actions.shape:
        raise ValueError(
            f"actions shape {tuple(actions.shape)} must equal policy_logits shape without its last "
            f"dim {tuple(policy_logits.shape[:-1])}"
        )
    log_probs = F.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive or None, got {value!r}")


def from_importance_weights(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    *,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceReturns:
    """V-trace targets v_s and policy-gradient advantages from log importance weights.

    Shapes: log_rhos, discounts, rewards, values `[T, B, ...]`; bootstrap_value `[B, ...]`.
    discounts_t = gamma * (1 - done_t). With rho_t = min(rho_bar, pi/mu), c_t = lambda min(c_bar,
    pi/mu) and delta_t = rho_t (r_t + discount_t V(x_{t+1}) - V(x_t)), the recursion of Remark 1:
    v_s - V(x_s) = delta_s + discount_s c_s (v_{s+1} - V(x_{s+1})), v_T = V(x_T) = bootstrap.
    pg_advantages_t = min(rho_pg_bar, pi/mu) (r_t + discount_t v_{t+1} - V(x_t)).
    Thresholds of None mean no clipping. Computed without gradient.
    """
    for name, value in (("clip_rho_threshold", clip_rho_threshold),
                        ("clip_c_threshold", clip_c_threshold),
                        ("clip_pg_rho_threshold", clip_pg_rho_threshold)):
        _check_threshold(name, value)
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_!r}")
    if log_rhos.dim() < 2:
        raise ValueError(f"log_rhos must be at least [T, B], got shape {tuple(log_rhos.shape)}")
    for name, tensor in (("discounts", discounts), ("rewards", rewards), ("values", values)):
        if tensor.shape != log_rhos.shape:
            raise ValueError(
                f"{name} shape {tuple(tensor.shape)} must equal log_rhos shape {tuple(log_rhos.shape)}"
            )
        if tensor.dtype != log_rhos.dtype or tensor.device != log_rhos.device:
            raise ValueError(f"{name} must have log_rhos' dtype and device")
    if bootstrap_value.shape != values.shape[1:]:
        raise ValueError(
            f"bootstrap_value shape {tuple(bootstrap_value.shape)} must equal values shape without "
            f"time {tuple(values.shape[1:])}"
        )
    with torch.no_grad():
        rhos = log_rhos.exp()
        clipped_rhos = rhos if clip_rho_threshold is None else rhos.clamp(max=clip_rho_threshold)
        cs = rhos if clip_c_threshold is None else rhos.clamp(max=clip_c_threshold)
        cs = lambda_ * cs
        values_tp1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_tp1 - values)
        acc = torch.zeros_like(bootstrap_value)
        vs_minus_v = []
        for t in reversed(range(log_rhos.shape[0])):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            vs_minus_v.append(acc)
        vs = torch.stack(vs_minus_v[::-1]) + values
        vs_tp1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        pg_rhos = rhos if clip_pg_rho_threshold is None else rhos.clamp(max=clip_pg_rho_threshold)
        pg_advantages = pg_rhos * (rewards + discounts * vs_tp1 - values)
    return VTraceReturns(vs=vs.detach(), pg_advantages=pg_advantages.detach())


def from_logits(
    behaviour_policy_logits: torch.Tensor,
    target_policy_logits: torch.Tensor,
    actions: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    **kwargs,
) -> VTraceFromLogitsReturns:
    """V-trace from policy logits `[T, B, A]` (mu's and pi's) and actions `[T, B]`.

    All outputs are detached; losses recompute pi's log-probabilities with gradient.
    """
    if behaviour_policy_logits.shape != target_policy_logits.shape:
        raise ValueError(
            f"behaviour_policy_logits shape {tuple(behaviour_policy_logits.shape)} must equal "
            f"target_policy_logits shape {tuple(target_policy_logits.shape)}"
        )
    with torch.no_grad():
        behaviour = action_log_probs(behaviour_policy_logits, actions)
        target = action_log_probs(target_policy_logits, actions)
        log_rhos = target - behaviour
    returns = from_importance_weights(
        log_rhos, discounts, rewards, values, bootstrap_value, **kwargs
    )
    return VTraceFromLogitsReturns(
        vs=returns.vs,
        pg_advantages=returns.pg_advantages,
        log_rhos=log_rhos,
        behaviour_action_log_probs=behaviour,
        target_action_log_probs=target,
    )


__all__ = [
    "VTraceFromLogitsReturns",
    "VTraceReturns",
    "action_log_probs",
    "from_importance_weights",
    "from_logits",
]
