"""V-trace off-policy targets (Espeholt et al. 2018, arXiv 1802.01561, Sec. 4.1).

Notation follows the paper: ``mu`` is the *behaviour* policy (the explorer's possibly stale copy
that chose the actions) and ``pi`` is the *target* policy (the learner's current one). The
truncated importance weights are ratios pi(a_t|x_t) / mu(a_t|x_t), passed here as their
logarithms ``log_rhos``.

Every function is pure: tensors in, tensors out, nothing stored. Inputs are time-major,
``[T, B, ...]``: T steps of an unroll, B independent unrolls, and optionally extra trailing dims
that are treated as further independent columns. ``discounts`` is gamma * (1 - done_t), so it is 0
at the last step of an episode, which cuts every trace there.

The V-trace targets ``vs`` and the policy-gradient advantages are *targets*: they are computed
under ``torch.no_grad()`` and never carry gradient, even when the inputs do. The losses recompute
log pi(a_t|x_t) with gradient through `action_log_probs`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "VTraceFromLogitsReturns",
    "VTraceReturns",
    "action_log_probs",
    "from_importance_weights",
    "from_logits",
]


class VTraceReturns(NamedTuple):
    """Output of `from_importance_weights`; both fields `[T, B, ...]`, without gradient.

    vs: the V-trace targets v_s of eq. (1).
    pg_advantages: rho_s (r_s + discount_s v_{s+1} - V(x_s)), the policy-gradient advantages.
    """

    vs: torch.Tensor
    pg_advantages: torch.Tensor


class VTraceFromLogitsReturns(NamedTuple):
    """Output of `from_logits`; every field `[T, B]`, without gradient.

    vs, pg_advantages: as in `VTraceReturns`.
    log_rhos: log pi(a_t|x_t) - log mu(a_t|x_t), before any clipping.
    behaviour_action_log_probs: log mu(a_t|x_t).
    target_action_log_probs: log pi(a_t|x_t), detached (losses recompute it with gradient).
    """

    vs: torch.Tensor
    pg_advantages: torch.Tensor
    log_rhos: torch.Tensor
    behaviour_action_log_probs: torch.Tensor
    target_action_log_probs: torch.Tensor


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_threshold(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number or None, got {value!r}")
    if not (value > 0 and not math.isnan(value)):
        raise ValueError(f"{name} must be positive or None, got {value!r}")


def _check_lambda(lambda_: float) -> None:
    if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real):
        raise TypeError(f"lambda_ must be a number in [0, 1], got {lambda_!r}")
    if not 0.0 <= lambda_ <= 1.0:  # also rejects NaN
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_!r}")


def _check_options(
    clip_rho_threshold: float | None,
    clip_c_threshold: float | None,
    clip_pg_rho_threshold: float | None,
    lambda_: float,
) -> None:
    _check_threshold("clip_rho_threshold", clip_rho_threshold)
    _check_threshold("clip_c_threshold", clip_c_threshold)
    _check_threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)
    _check_lambda(lambda_)


def _check_like(
    shape_ref: tuple[str, torch.Size],
    dtype_ref: tuple[str, torch.dtype],
    device_ref: tuple[str, torch.device],
    **tensors: torch.Tensor,
) -> None:
    """Each tensor must have the reference shape, dtype and device; messages name both sides."""
    (shape_name, shape), (dtype_name, dtype), (device_name, device) = (
        shape_ref,
        dtype_ref,
        device_ref,
    )
    for name, tensor in tensors.items():
        if tensor.shape != shape:
            raise ValueError(
                f"{name} shape {_shape(tensor)} must equal {shape_name} shape {tuple(shape)}"
            )
        if tensor.dtype != dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} must equal {dtype_name} dtype {dtype}")
        if tensor.device != device:
            raise ValueError(
                f"{name} device {tensor.device} must equal {device_name} device {device}"
            )


def _check_sequence_inputs(
    ref_name: str,
    ref_shape: torch.Size,
    ref_tensor: tuple[str, torch.Tensor],
    bootstrap_value: torch.Tensor,
    **sequences: torch.Tensor,
) -> None:
    """`sequences` are `ref_shape` = `[T, B, ...]` with ref_tensor's (floating) dtype and device;
    bootstrap_value is `[B, ...]` with the same dtype and device."""
    dtype_name, dtype_tensor = ref_tensor
    if len(ref_shape) < 2:
        raise ValueError(f"{ref_name} must be at least [T, B], got shape {tuple(ref_shape)}")
    if not dtype_tensor.is_floating_point():
        raise ValueError(
            f"{dtype_name} must be a floating-point tensor, got dtype {dtype_tensor.dtype}"
        )
    dtype_ref = (dtype_name, dtype_tensor.dtype)
    device_ref = (dtype_name, dtype_tensor.device)
    _check_like((ref_name, ref_shape), dtype_ref, device_ref, **sequences)
    step_name = f"one time step of {ref_name}"
    _check_like((step_name, ref_shape[1:]), dtype_ref, device_ref, bootstrap_value=bootstrap_value)


def _clip(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return x if threshold is None else x.clamp(max=threshold)


def action_log_probs(policy_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | x_t) of the taken actions, *with* gradient through the logits.

    Shapes: policy_logits `[T, B, A]` (any leading shape `[..., A]`), actions `[T, B]`
    (``policy_logits.shape[:-1]``, any integer dtype) -> `[T, B]`. A log-softmax over the last
    dim followed by a gather (Espeholt et al. 2018, Sec. 4: pi and mu are softmax policies).
    """
    if policy_logits.dim() < 1:
        raise ValueError(
            f"policy_logits must have an action dim, got shape {_shape(policy_logits)}"
        )
    if actions.shape != policy_logits.shape[:-1]:
        raise ValueError(
            f"actions shape {_shape(actions)} must equal policy_logits shape without its last "
            f"(action) dim, {_shape(policy_logits)[:-1]}"
        )
    if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
        raise ValueError(f"actions must be an integer tensor, got dtype {actions.dtype}")
    log_probs = F.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


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
    """V-trace targets and policy-gradient advantages (Espeholt et al. 2018, eq. (1), Remarks 1-2).

    Args (time-major; all floating, one dtype, one device):
      log_rhos: `[T, B, ...]`, log(pi(a_t|x_t) / mu(a_t|x_t)).
      discounts: `[T, B, ...]`, gamma * (1 - done_t); 0 at an episode's last step.
      rewards: `[T, B, ...]`, r_t.
      values: `[T, B, ...]`, V(x_t) under the current value function.
      bootstrap_value: `[B, ...]`, V(x_T), the value of the state after the unroll.
      clip_rho_threshold: rho_bar; rho_t = min(rho_bar, pi/mu). None: no clipping.
      clip_c_threshold: c_bar; c_t = lambda_ * min(c_bar, pi/mu) (Remark 2). None: no clipping.
      clip_pg_rho_threshold: the clip of the ratio weighting the policy-gradient advantage
        (Sec. 4.2). None: no clipping.
      lambda_: in [0, 1], the trace-cutting factor of Remark 2 (1: plain V-trace, 0: one-step).

    With delta_t = rho_t (r_t + discount_t V(x_{t+1}) - V(x_t)) and V(x_T) = bootstrap_value,
    the targets follow the backward recursion of Remark 1,

        v_s - V(x_s) = delta_s + discount_s c_s (v_{s+1} - V(x_{s+1})),   v_T = V(x_T),

    which equals the explicit sum of eq. (1) with gamma^{t-s} replaced by the product of the
    per-step discounts. The advantages are

        pg_advantages_s = min(clip_pg_rho_threshold, pi/mu) (r_s + discount_s v_{s+1} - V(x_s)).

    Returns:
      `VTraceReturns(vs, pg_advantages)`, both `[T, B, ...]` in the inputs' dtype and device.
      Computed under ``torch.no_grad()``: neither carries gradient, whatever the inputs.

    Raises:
      ValueError: on a shape, dtype or device mismatch, inputs of rank < 2, a threshold that is
        neither positive nor None, or lambda_ outside [0, 1].
      TypeError: if a threshold or lambda_ is not a real number (or None for a threshold).
    """
    _check_options(clip_rho_threshold, clip_c_threshold, clip_pg_rho_threshold, lambda_)
    _check_sequence_inputs(
        "log_rhos",
        log_rhos.shape,
        ("log_rhos", log_rhos),
        bootstrap_value,
        discounts=discounts,
        rewards=rewards,
        values=values,
    )

    with torch.no_grad():
        ratios = torch.exp(log_rhos)
        rhos = _clip(ratios, clip_rho_threshold)
        cs = lambda_ * _clip(ratios, clip_c_threshold)
        values_tp1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = rhos * (rewards + discounts * values_tp1 - values)
        decay = discounts * cs

        # Reverse scan over time (Remark 1); every step is vectorised over the batch, one fused
        # multiply-add written in place (per-op overhead dominates at these sizes).
        vs_minus_v = torch.empty_like(values)
        acc = torch.zeros_like(bootstrap_value)  # v_T - V(x_T) = 0
        steps = zip(deltas.unbind(0), decay.unbind(0), vs_minus_v.unbind(0), strict=True)
        for delta_t, decay_t, out_t in reversed(list(steps)):
            acc = torch.addcmul(delta_t, decay_t, acc, out=out_t)
        vs = vs_minus_v + values

        vs_tp1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        pg_rhos = _clip(ratios, clip_pg_rho_threshold)
        pg_advantages = pg_rhos * (rewards + discounts * vs_tp1 - values)

    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)


def from_logits(
    behaviour_policy_logits: torch.Tensor,
    target_policy_logits: torch.Tensor,
    actions: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    *,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceFromLogitsReturns:
    """V-trace from the logits of mu and pi (Espeholt et al. 2018, Sec. 4.1, eq. (1)).

    Args:
      behaviour_policy_logits: `[T, B, A]`, mu's logits (recorded by the explorer).
      target_policy_logits: `[T, B, A]`, pi's logits (the learner's forward pass).
      actions: `[T, B]`, the actions taken (any integer dtype).
      discounts, rewards, values: `[T, B]`; bootstrap_value: `[B]`. See
        `from_importance_weights`, as are the keyword options.

    log_rhos = log pi(a_t|x_t) - log mu(a_t|x_t), via log-softmax and gather, then
    `from_importance_weights`.

    Returns:
      `VTraceFromLogitsReturns`, every field `[T, B]` and computed without gradient, including
      target_action_log_probs: the loss must recompute log pi(a_t|x_t) with gradient (see
      `action_log_probs` and `impala.losses.policy_gradient_loss`).

    Raises:
      ValueError: if the two logits differ in shape, dtype or device or are not `[T, B, A]`,
        if actions is not logits.shape[:-1] or not integer, and as `from_importance_weights`.
    """
    _check_options(clip_rho_threshold, clip_c_threshold, clip_pg_rho_threshold, lambda_)
    if target_policy_logits.dim() != 3:
        raise ValueError(
            f"target_policy_logits must be [T, B, A], got shape {_shape(target_policy_logits)}"
        )
    _check_like(
        ("target_policy_logits", target_policy_logits.shape),
        ("target_policy_logits", target_policy_logits.dtype),
        ("target_policy_logits", target_policy_logits.device),
        behaviour_policy_logits=behaviour_policy_logits,
    )
    if actions.shape != target_policy_logits.shape[:-1]:
        raise ValueError(
            f"actions shape {_shape(actions)} must equal the logits shape without its last "
            f"(action) dim, {_shape(target_policy_logits)[:-1]}"
        )
    if actions.device != target_policy_logits.device:
        raise ValueError(
            f"actions device {actions.device} must equal target_policy_logits device "
            f"{target_policy_logits.device}"
        )
    _check_sequence_inputs(
        "actions",
        actions.shape,
        ("target_policy_logits", target_policy_logits),
        bootstrap_value,
        discounts=discounts,
        rewards=rewards,
        values=values,
    )
    with torch.no_grad():
        behaviour_log_probs = action_log_probs(behaviour_policy_logits, actions)
        target_log_probs = action_log_probs(target_policy_logits, actions)
        log_rhos = target_log_probs - behaviour_log_probs
    returns = from_importance_weights(
        log_rhos,
        discounts,
        rewards,
        values,
        bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_c_threshold=clip_c_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        lambda_=lambda_,
    )
    return VTraceFromLogitsReturns(
        vs=returns.vs,
        pg_advantages=returns.pg_advantages,
        log_rhos=log_rhos,
        behaviour_action_log_probs=behaviour_log_probs,
        target_action_log_probs=target_log_probs,
    )
