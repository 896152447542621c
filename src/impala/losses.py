"""Learner losses: IMPALA's actor-critic loss (Espeholt et al. 2018, arXiv 1802.01561, Sec. 4.2)
and the seed prototype's REINFORCE with a learned baseline (Williams 1992).

Pure functions over time-major tensors: logits `[T, B, A]`, everything per step `[T, B]`. For
other action spaces than Discrete pass `action_spec` (`impala.distributions`): the "logits" are
then the policy's parameters `[T, B, P]`, the actions `[T, B, *action_shape]`, and
log-probabilities and entropies are the joint policy's. The regression targets (V-trace's
``vs``, Monte-Carlo returns) and the policy-gradient advantages are constants inside every loss:
they are detached here, so gradient flows only into the network's logits (policy and entropy
terms) and values (baseline term). Each term returns a scalar; the reduction is stated per
function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from impala import distributions
from impala.distributions import ActionSpec
from impala.vtrace import VTraceReturns, action_log_probs

__all__ = [
    "ActorCriticLoss",
    "ReinforceLoss",
    "actor_critic_loss",
    "appo_loss",
    "baseline_loss",
    "discounted_returns",
    "entropy_loss",
    "policy_gradient_loss",
    "clipped_surrogate_loss",
    "reinforce_loss",
]

REDUCTIONS = ("sum", "mean")


class ActorCriticLoss(NamedTuple):
    """Output of `actor_critic_loss`; scalars.

    total = policy + baseline_cost * baseline + entropy_cost * entropy; the three terms are
    unweighted (but reduced as requested).
    """

    total: torch.Tensor
    policy: torch.Tensor
    baseline: torch.Tensor
    entropy: torch.Tensor


class ReinforceLoss(NamedTuple):
    """Output of `reinforce_loss`; scalars.

    total = policy_weight * policy + baseline_weight * baseline; the two terms are unweighted.
    """

    total: torch.Tensor
    policy: torch.Tensor
    baseline: torch.Tensor


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_per_step(
    ref_name: str, ref_shape: torch.Size | tuple[int, ...], **tensors: torch.Tensor
) -> None:
    """Each of `tensors` must have shape `ref_shape`; the message names both sides."""
    for name, tensor in tensors.items():
        if tensor.shape != tuple(ref_shape):
            raise ValueError(
                f"{name} shape {_shape(tensor)} must equal {ref_name} shape {tuple(ref_shape)}"
            )


def _check_logits(name: str, logits: torch.Tensor, rank: int | None = 3) -> None:
    if rank is not None and logits.dim() != rank:
        raise ValueError(f"{name} must be [T, B, A], got shape {_shape(logits)}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have an action dim, got shape {_shape(logits)}")


def _check_actions(logits: torch.Tensor, actions: torch.Tensor, spec: ActionSpec | None) -> None:
    """actions must be `logits.shape[:-1] + action_shape`."""
    want = tuple(logits.shape[:-1]) + (spec.action_shape if spec is not None else ())
    if tuple(actions.shape) != want:
        raise ValueError(
            f"actions shape {_shape(actions)} must equal target_logits shape without its last "
            f"dim{' then the action shape' if spec is not None and spec.action_shape else ''}, "
            f"{want}"
        )


def log_probs(
    logits: torch.Tensor, actions: torch.Tensor, action_spec: ActionSpec | None = None
) -> torch.Tensor:
    """log pi(a_t|x_t) `[T, B]` with gradient: a categorical policy's (`vtrace.action_log_probs`)
    without `action_spec`, else the joint log-probability of `impala.distributions`."""
    if action_spec is None or action_spec.kind == "discrete":
        return action_log_probs(logits, actions)
    return distributions.log_prob(action_spec, logits, actions)


def policy_gradient_loss(
    target_logits: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    *,
    action_spec: ActionSpec | None = None,
    log_epsilon: float | None = None,
) -> torch.Tensor:
    """Policy-gradient loss, -sum_{t,b} log pi(a_t|x_t) * A_t (Espeholt et al. 2018, Sec. 4.2).

    Shapes: target_logits `[T, B, A]`, actions `[T, B]` (integer), advantages `[T, B]` -> scalar
    (other action spaces: see the module doc). Reduction: sum over time and batch. The advantages
    (V-trace's rho_t (r_t + discount_t v_{t+1} - V(x_t))) are detached inside, so the gradient
    is -sum A_t grad log pi(a_t|x_t) and reaches the logits only.

    `log_epsilon`: the paper's epsilon-correction (Sec. 5.2, after Babaeizadeh et al. 2016):
    log(pi(a_t|x_t) + epsilon) in place of log pi(a_t|x_t), which keeps the gradient of a very
    unlikely action from exploding.
    """
    _check_logits("target_logits", target_logits)
    _check_actions(target_logits, actions, action_spec)
    _check_per_step(
        "target_logits without its last dim", target_logits.shape[:-1], advantages=advantages
    )
    log_pi = log_probs(target_logits, actions, action_spec)
    if log_epsilon is not None:
        log_pi = torch.logaddexp(log_pi, torch.full_like(log_pi, float(log_epsilon)).log())
    return -(log_pi * advantages.detach()).sum()


def clipped_surrogate_loss(
    target_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    *,
    action_spec: ActionSpec | None = None,
) -> torch.Tensor:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) against a reference policy, as
    APPO/IMPACT use it (Luo et al. 2020): with r_t = pi(a_t|x_t) / pi_ref(a_t|x_t),

        -sum_{t,b} min(r_t A_t, clip(r_t, 1 - clip, 1 + clip) A_t).

    Shapes: target_logits and reference_logits `[T, B, A]`, actions and advantages `[T, B]` ->
    scalar. Reduction: sum over time and batch. The reference policy and the advantages (V-trace
    computed with pi_ref as its target policy, so they carry the weight min(rho-bar, pi_ref/mu))
    are constants. Where pi = pi_ref the gradient equals `policy_gradient_loss`'s; once r_t has
    left the clip range in the direction A_t favours, the step's gradient is zero.
    """
    _check_logits("target_logits", target_logits)
    _check_logits("reference_logits", reference_logits)
    _check_actions(target_logits, actions, action_spec)
    _check_per_step(
        "target_logits without its last dim", target_logits.shape[:-1], advantages=advantages
    )
    if reference_logits.shape != target_logits.shape:
        raise ValueError(
            f"reference_logits shape {_shape(reference_logits)} must equal target_logits shape "
            f"{_shape(target_logits)}"
        )
    log_ratio = log_probs(target_logits, actions, action_spec) - log_probs(
        reference_logits.detach(), actions, action_spec
    )
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -surrogate.sum()


def baseline_loss(vs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Value regression, 0.5 * sum_{t,b} (v_t - V(x_t))^2 (Espeholt et al. 2018, Sec. 4.2).

    Shapes: vs `[T, B]` (the V-trace targets), values `[T, B]` -> scalar. Reduction: sum over
    time and batch. The targets vs are detached inside: the gradient, -(v_t - V(x_t)), reaches
    the values only.
    """
    _check_per_step("values", values.shape, vs=vs)
    return 0.5 * ((vs.detach() - values) ** 2).sum()


def entropy_loss(
    target_logits: torch.Tensor, *, action_spec: ActionSpec | None = None
) -> torch.Tensor:
    """Negative total entropy of pi, -sum_{t,b} H(pi(.|x_t)) = sum_{t,b,a} pi log pi
    (Espeholt et al. 2018, Sec. 4.2: the entropy bonus).

    Shape: target_logits `[T, B, A]` -> scalar. Reduction: sum over time and batch. The sign is
    that of a loss: adding ``entropy_cost * entropy_loss`` to the total and minimising it raises
    the policy's entropy (a more uniform policy gives a lower value). With `action_spec`: the
    joint policy's entropy, the sum of its components' (a Gaussian's in closed form).
    """
    _check_logits("target_logits", target_logits)
    spec = action_spec if action_spec is not None else ActionSpec.discrete(target_logits.shape[-1])
    return -distributions.entropy(spec, target_logits).sum()


def actor_critic_loss(
    target_logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    vtrace_returns: VTraceReturns,
    *,
    baseline_cost: float = 0.5,
    entropy_cost: float = 0.01,
    reduction: str = "sum",
    action_spec: ActionSpec | None = None,
    log_epsilon: float | None = None,
) -> ActorCriticLoss:
    """IMPALA's loss (Espeholt et al. 2018, Sec. 4.2):

        total = policy + baseline_cost * baseline + entropy_cost * entropy,

    with policy = `policy_gradient_loss` on vtrace_returns.pg_advantages, baseline =
    `baseline_loss` towards vtrace_returns.vs, entropy = `entropy_loss` (negative entropy).

    Shapes: target_logits `[T, B, A]`, values `[T, B]`, actions `[T, B]`, vtrace_returns fields
    `[T, B]` -> scalars. Reduction: "sum" sums each term over time and batch, as the paper and
    TorchBeast do; "mean" divides each term by T * B (learning-rate scale independent of the
    batch). The V-trace returns are treated as constants. `action_spec` (other action spaces)
    and `log_epsilon` (the epsilon-correction) as in `policy_gradient_loss`.

    Raises:
      ValueError: on an unknown reduction or mismatched shapes.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_logits("target_logits", target_logits)
    _check_actions(target_logits, actions, action_spec)
    _check_per_step(
        "target_logits without its last dim",
        target_logits.shape[:-1],
        values=values,
        **{
            "vtrace_returns.vs": vtrace_returns.vs,
            "vtrace_returns.pg_advantages": vtrace_returns.pg_advantages,
        },
    )
    policy = policy_gradient_loss(
        target_logits,
        actions,
        vtrace_returns.pg_advantages,
        action_spec=action_spec,
        log_epsilon=log_epsilon,
    )
    return _combine(
        policy,
        target_logits,
        values,
        vtrace_returns,
        baseline_cost,
        entropy_cost,
        reduction,
        action_spec,
    )


def appo_loss(
    target_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    vtrace_returns: VTraceReturns,
    *,
    clip: float = 0.2,
    baseline_cost: float = 0.5,
    entropy_cost: float = 0.01,
    reduction: str = "sum",
    action_spec: ActionSpec | None = None,
) -> ActorCriticLoss:
    """APPO's loss (IMPACT, Luo et al. 2020; RLlib's APPO): `actor_critic_loss` with the policy
    term replaced by `clipped_surrogate_loss` against `reference_logits` (the target network's),
    vtrace_returns computed with the reference as V-trace's target policy. Shapes, reduction and
    errors as in `actor_critic_loss`; reference_logits `[T, B, A]`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    policy = clipped_surrogate_loss(
        target_logits,
        reference_logits,
        actions,
        vtrace_returns.pg_advantages,
        clip,
        action_spec=action_spec,
    )
    return _combine(
        policy,
        target_logits,
        values,
        vtrace_returns,
        baseline_cost,
        entropy_cost,
        reduction,
        action_spec,
    )


def _combine(
    policy: torch.Tensor,
    target_logits: torch.Tensor,
    values: torch.Tensor,
    vtrace_returns: VTraceReturns,
    baseline_cost: float,
    entropy_cost: float,
    reduction: str,
    action_spec: ActionSpec | None,
) -> ActorCriticLoss:
    """The baseline and entropy terms beside a policy term, reduced and weighted. Without an
    entropy cost the entropy is only reported: it is computed outside the graph, which saves its
    backward pass (and keeps a non-finite entropy gradient, times zero, out of the total's)."""
    baseline = baseline_loss(vtrace_returns.vs, values)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_cost != 0):
        entropy = entropy_loss(target_logits, action_spec=action_spec)
    if reduction == "mean":
        count = values.numel()
        policy, baseline, entropy = policy / count, baseline / count, entropy / count
    total = policy + baseline_cost * baseline
    if entropy_cost != 0:
        total = total + entropy_cost * entropy
    return ActorCriticLoss(total=total, policy=policy, baseline=baseline, entropy=entropy)


def discounted_returns(
    rewards: torch.Tensor, discounts: torch.Tensor, bootstrap_value: torch.Tensor
) -> torch.Tensor:
    """Bootstrapped discounted returns, G_t = r_t + discount_t G_{t+1} with G_T = bootstrap_value
    (Sutton and Barto 2018, eq. 3.9, with per-step discounts).

    Shapes: rewards `[T, B]`, discounts `[T, B]` (gamma * (1 - done_t)), bootstrap_value `[B]`
    -> `[T, B]`. With discount 0 at episode ends and a zero bootstrap where the unroll ends an
    episode, these are the Monte-Carlo returns used by the seed's REINFORCE learner. They are
    targets: computed under ``torch.no_grad()``, without gradient.
    """
    if rewards.dim() < 1:
        raise ValueError(f"rewards must be at least [T], got shape {_shape(rewards)}")
    _check_per_step("rewards", rewards.shape, discounts=discounts)
    _check_per_step("one time step of rewards", rewards.shape[1:], bootstrap_value=bootstrap_value)
    with torch.no_grad():
        returns = torch.empty_like(rewards)
        acc = bootstrap_value
        for t in range(rewards.shape[0] - 1, -1, -1):
            acc = rewards[t] + discounts[t] * acc
            returns[t] = acc
    return returns


def reinforce_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    returns: torch.Tensor,
    *,
    policy_weight: float = 0.5,
    baseline_weight: float = 0.4,
    action_spec: ActionSpec | None = None,
) -> ReinforceLoss:
    """The seed prototype's learner: REINFORCE with a learned state-value baseline (Williams
    1992, with the baseline of Sutton and Barto 2018, Sec. 13.4):

        policy = -mean(log pi(a|x) * (G - V(x)))
        baseline = mean(0.5 * (G - V(x))^2)
        total = policy_weight * policy + baseline_weight * baseline.

    Shapes: logits `[N, A]` (any leading shape `[..., A]`, e.g. `[T, B, A]`), values, actions
    and returns `[N]` (resp. `[...]`) -> scalars. Reduction: mean, as in the seed. The advantage
    G - V is detached in the policy term, so the baseline is trained only by its own term; the
    returns are constants. Other action spaces: `action_spec`, as in `policy_gradient_loss`.
    """
    _check_logits("logits", logits, rank=None)
    _check_actions(logits, actions, action_spec)
    _check_per_step(
        "logits without its last dim", logits.shape[:-1], values=values, returns=returns
    )
    advantages = returns.detach() - values
    policy = -(log_probs(logits, actions, action_spec) * advantages.detach()).mean()
    baseline = (0.5 * advantages**2).mean()
    total = policy_weight * policy + baseline_weight * baseline
    return ReinforceLoss(total=total, policy=policy, baseline=baseline)
