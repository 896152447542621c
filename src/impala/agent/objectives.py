"""The learner's loss, one function per algorithm: the network's outputs and a batch in, the
loss to minimise and its terms out, built on the math of `impala.losses`, `impala.vtrace` and
`impala.corrections`.

- `impala_loss`: the paper's actor-critic loss with V-trace targets (or the --correction asked
  for): policy gradient, baseline and entropy terms (Espeholt et al. 2018, section 4.2).
- `appo_loss`: the same targets taken with pi_target as V-trace's target policy, and PPO's clipped
  surrogate against pi_target for the policy term (IMPACT, Luo et al. 2020).
- `reinforce_loss`: the seed's REINFORCE with a baseline, over single steps.

With PopArt (`popart`), V-trace runs on unnormalised values, the baseline loss on normalised
values and targets, and the advantages are divided by sigma (see `impala.nets.popart`); the
V-trace targets go back to the learner (`value_targets`) to move PopArt's statistics.
"""

from __future__ import annotations

import dataclasses

import torch

from impala import corrections, losses, vtrace
from impala.config import Config
from impala.distributions import ActionSpec
from impala.nets.popart import PopArt

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass
class LossOut:
    """`total` to minimise; `terms`, scalars reported as metrics (the total as 'loss');
    `policy_params` `[..., P]`, the policy's outputs at the steps learned from (for the policy
    metrics); `value_targets` `[T, B]`, V-trace's targets v_s (no gradient), for PopArt."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    policy_params: torch.Tensor
    value_targets: torch.Tensor | None = None


def impala_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    batch: Batch,
    *,
    cfg: Config,
    spec: ActionSpec,
    entropy_cost: float,
    popart: PopArt | None = None,
) -> LossOut:
    """The paper's loss for a V-trace batch; `logits [T+1, B, P]`, `values [T+1, B]` are pi's
    outputs for `batch["obs"]` (the last step only bootstraps)."""
    log_rhos, returns = _targets(logits[:-1], values, batch, cfg=cfg, spec=spec)
    targets, baseline_values, raw_vs = _normalised(returns, values[:-1], batch, popart)
    epsilon = corrections.EPSILON if cfg.correction == "epsilon" else None
    terms = losses.actor_critic_loss(
        logits[:-1],
        baseline_values,
        batch["action"],
        targets,
        log_epsilon=epsilon,
        **_costs(cfg, spec, entropy_cost),
    )
    return _out(terms, log_rhos, logits[:-1], raw_vs, popart)


def appo_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    reference: torch.Tensor,
    batch: Batch,
    *,
    cfg: Config,
    spec: ActionSpec,
    entropy_cost: float,
    popart: PopArt | None = None,
) -> LossOut:
    """APPO's loss for a V-trace batch: `reference [T, B, P]` is pi_target's policy at the
    steps learned from (no gradient), V-trace's target policy and the surrogate's reference."""
    log_rhos, returns = _targets(reference, values, batch, cfg=cfg, spec=spec)
    targets, baseline_values, raw_vs = _normalised(returns, values[:-1], batch, popart)
    terms = losses.appo_loss(
        logits[:-1],
        reference,
        baseline_values,
        batch["action"],
        targets,
        clip=cfg.appo_clip,
        **_costs(cfg, spec, entropy_cost),
    )
    out = _out(terms, log_rhos, logits[:-1], raw_vs, popart)
    with torch.no_grad():  # the share of steps whose ratio pi/pi_target left the clip's range
        log_ratio = losses.log_probs(logits[:-1], batch["action"], spec)
        log_ratio -= losses.log_probs(reference, batch["action"], spec)
        out.terms["clip_fraction"] = ((log_ratio.exp() - 1).abs() > cfg.appo_clip).float().mean()
    return out


def reinforce_loss(
    logits: torch.Tensor, values: torch.Tensor, batch: Batch, *, spec: ActionSpec
) -> LossOut:
    """The seed's REINFORCE with a baseline for a batch of single steps (`[N, ...]`)."""
    terms = losses.reinforce_loss(
        logits, values, batch["action"], batch["mc_return"], action_spec=spec
    )
    return LossOut(
        total=terms.total,
        terms={"loss": terms.total, "policy_loss": terms.policy, "baseline_loss": terms.baseline},
        policy_params=logits,
    )


def _targets(
    target_logits: torch.Tensor, values: torch.Tensor, batch: Batch, *, cfg: Config, spec
) -> tuple[torch.Tensor, vtrace.VTraceReturns]:
    """log(pi/mu) of the actions taken `[T, B]` (pi: `target_logits`, the joint policy's) and the
    off-policy returns (V-trace's by default) from `values [T+1, B]`."""
    # Truncated episodes: discount is 0 there and the explorer recorded V_mu of the last
    # observation, so the target is r + gamma * V(x_last), never the next episode's value.
    rewards = batch["reward"] + cfg.gamma * batch["truncation_value"]
    actions = batch["action"]
    with torch.no_grad():
        log_rhos = losses.log_probs(target_logits, actions, spec)
        log_rhos -= losses.log_probs(batch["behaviour_logits"], actions, spec)
    returns = corrections.off_policy_returns(
        cfg.correction,
        log_rhos=log_rhos,
        discounts=batch["discount"],
        rewards=rewards,
        values=values[:-1],
        bootstrap_value=values[-1],
        clip_rho_threshold=cfg.clip_rho_threshold,
        clip_c_threshold=cfg.clip_c_threshold,
        clip_pg_rho_threshold=cfg.clip_pg_rho_threshold,
        lambda_=cfg.vtrace_lambda,
    )
    return log_rhos, returns


def _normalised(
    returns: vtrace.VTraceReturns, values: torch.Tensor, batch: Batch, popart: PopArt | None
) -> tuple[vtrace.VTraceReturns, torch.Tensor, torch.Tensor | None]:
    """The targets and values the loss takes: as they are, or with PopArt normalised (targets
    and values to (x - mu) / sigma, advantages / sigma, each sequence's task's statistics);
    and the unnormalised targets for PopArt's statistics (None without PopArt)."""
    vs, advantages = returns.vs, returns.pg_advantages
    if popart is None:
        return vtrace.VTraceReturns(vs=vs, pg_advantages=advantages), values, None
    raw_vs = vs.detach()
    mu, sigma = popart.mu.detach(), popart.sigma  # [K]: each sequence's task's
    if popart.num_tasks > 1:
        mu, sigma = mu[batch["task"].long()], sigma[batch["task"].long()]
    vs, values, advantages = (vs - mu) / sigma, (values - mu) / sigma, advantages / sigma
    return vtrace.VTraceReturns(vs=vs, pg_advantages=advantages), values, raw_vs


def _costs(cfg: Config, spec: ActionSpec, entropy_cost: float) -> dict:
    return dict(
        baseline_cost=cfg.baseline_cost,
        entropy_cost=entropy_cost,
        reduction=cfg.loss_reduction,
        action_spec=spec,
    )


def _out(terms, log_rhos, policy_params, raw_vs, popart) -> LossOut:
    return LossOut(
        total=terms.total,
        terms={
            "loss": terms.total,
            "policy_loss": terms.policy,
            "baseline_loss": terms.baseline,
            "entropy_loss": terms.entropy,
            "mean_rho": log_rhos.exp().mean(),
        },
        policy_params=policy_params,
        value_targets=raw_vs if popart is not None else None,
    )
