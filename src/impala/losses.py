"""Losses: the IMPALA actor-critic loss (Espeholt et al. 2018, Sec. 4.2) and the seed
prototype's REINFORCE with a learned baseline (Williams 1992).

Pure functions over time-major tensors; targets and advantages enter without gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from impala.vtrace import VTraceReturns, action_log_probs


class ActorCriticLoss(NamedTuple):
    total: torch.Tensor
    policy: torch.Tensor
    baseline: torch.Tensor
    entropy: torch.Tensor


class ReinforceLoss(NamedTuple):
    total: torch.Tensor
    policy: torch.Tensor
    baseline: torch.Tensor


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {shapes}")


def policy_gradient_loss(
    target_logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """sum_t,b -log pi(a_t|x_t) * A_t. logits `[T, B, A]`, actions and advantages `[T, B]`.

    The advantages (V-trace's rho_t (r_t + gamma v_{t+1} - V(x_t))) are constants here.
    """
    _same_shape(actions=actions, advantages=advantages)
    return -(action_log_probs(target_logits, actions) * advantages.detach()).sum()


def baseline_loss(vs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """0.5 * sum_t,b (v_t - V(x_t))^2 over `[T, B]`; the targets v_t are constants."""
    _same_shape(vs=vs, values=values)
    return 0.5 * ((vs.detach() - values) ** 2).sum()


def entropy_loss(target_logits: torch.Tensor) -> torch.Tensor:
    """Negative total entropy, sum_t,b sum_a pi log pi, over logits `[T, B, A]`.

    Adding `entropy_cost * entropy_loss` to a loss rewards entropy (paper: the entropy bonus).
    """
    log_probs = F.log_softmax(target_logits, dim=-1)
    return (log_probs.exp() * log_probs).sum()


def actor_critic_loss(
    target_logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    vtrace_returns: VTraceReturns,
    *,
    baseline_cost: float = 0.5,
    entropy_cost: float = 0.01,
    reduction: str = "sum",
) -> ActorCriticLoss:
    """The paper's loss: policy gradient with V-trace advantages + baseline_cost * 0.5 (v_s -
    V(x_s))^2 + entropy_cost * (negative entropy).

    Shapes: target_logits `[T, B, A]`, values and actions `[T, B]`. reduction 'sum' sums every
    term over time and batch (as the paper and TorchBeast do); 'mean' divides each by T * B.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    _same_shape(values=values, actions=actions, vs=vtrace_returns.vs)
    scale = 1.0 if reduction == "sum" else 1.0 / actions.numel()
    policy = policy_gradient_loss(target_logits, actions, vtrace_returns.pg_advantages) * scale
    baseline = baseline_loss(vtrace_returns.vs, values) * scale
    entropy = entropy_loss(target_logits) * scale
    total = policy + baseline_cost * baseline + entropy_cost * entropy
    return ActorCriticLoss(total, policy, baseline, entropy)


def discounted_returns(
    rewards: torch.Tensor, discounts: torch.Tensor, bootstrap_value: torch.Tensor
) -> torch.Tensor:
    """G_t = r_t + discount_t G_{t+1}, G_T = bootstrap_value; `[T, B]` in, `[T, B]` out.

    Monte Carlo returns when the bootstrap is 0 and discount_t is 0 at episode ends. No gradient.
    """
    _same_shape(rewards=rewards, discounts=discounts)
    if bootstrap_value.shape != rewards.shape[1:]:
        raise ValueError(
            f"bootstrap_value shape {tuple(bootstrap_value.shape)} must be {tuple(rewards.shape[1:])}"
        )
    with torch.no_grad():
        acc = bootstrap_value
        returns = []
        for t in reversed(range(rewards.shape[0])):
            acc = rewards[t] + discounts[t] * acc
            returns.append(acc)
        return torch.stack(returns[::-1])


def reinforce_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    returns: torch.Tensor,
    *,
    policy_weight: float = 0.5,
    baseline_weight: float = 0.4,
) -> ReinforceLoss:
    """The seed prototype's learner: REINFORCE with a learned state-value baseline.

    total = policy_weight * -mean(log pi(a) (G - V)) + baseline_weight * mean(0.5 (G - V)^2).
    Shapes: logits `[..., A]`, the rest `[...]`. Mean reduction, as in the seed. The advantage
    G - V is detached in the policy term, so the baseline learns from its own term only.
    """
    _same_shape(values=values, actions=actions, returns=returns)
    advantages = returns - values
    policy = -(action_log_probs(logits, actions) * advantages.detach()).mean()
    baseline = (0.5 * advantages**2).mean()
    return ReinforceLoss(policy_weight * policy + baseline_weight * baseline, policy, baseline)
