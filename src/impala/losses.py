"""Losses: the IMPALA actor-critic loss (Sec. 4.2) and the seed prototype's REINFORCE."""

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


def policy_gradient_loss(target_logits, actions, advantages):
    return -(action_log_probs(target_logits, actions) * advantages.detach()).sum()


def baseline_loss(vs, values):
    return 0.5 * ((vs.detach() - values) ** 2).sum()


def entropy_loss(target_logits):
    log_probs = F.log_softmax(target_logits, -1)
    return (log_probs.exp() * log_probs).sum()


def actor_critic_loss(target_logits, values, actions, vtrace_returns: VTraceReturns, *,
                      baseline_cost=0.5, entropy_cost=0.01, reduction="sum"):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    scale = 1.0 if reduction == "sum" else 1.0 / actions.numel()
    policy = policy_gradient_loss(target_logits, actions, vtrace_returns.pg_advantages) * scale
    baseline = baseline_loss(vtrace_returns.vs, values) * scale
    entropy = entropy_loss(target_logits) * scale
    total = policy + baseline_cost * baseline + entropy_cost * entropy
    return ActorCriticLoss(total, policy, baseline, entropy)


def discounted_returns(rewards, discounts, bootstrap_value):
    with torch.no_grad():
        acc = bootstrap_value
        out = []
        for t in reversed(range(rewards.shape[0])):
            acc = rewards[t] + discounts[t] * acc
            out.append(acc)
        return torch.stack(out[::-1])


def reinforce_loss(logits, values, actions, returns, *, policy_weight=0.5, baseline_weight=0.4):
    log_probs = F.log_softmax(logits, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    advantages = returns - values
    policy = -(log_probs * advantages.detach()).mean()
    baseline = (0.5 * advantages**2).mean()
    return ReinforceLoss(policy_weight * policy + baseline_weight * baseline, policy, baseline)
