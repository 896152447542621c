"""The off-policy corrections the paper compares V-trace with (Espeholt et al. 2018, Sec. 5.2 and
Table 2), as value targets and policy-gradient advantages for the actor-critic loss.

- 'vtrace': V-trace (`impala.vtrace.from_importance_weights`).
- 'none': no correction: the targets are the n-step bootstrapped returns of the unroll, as if the
  behaviour policy were pi, and the advantages r_t + discount_t v_{t+1} - V(x_t) carry no weight.
- 'epsilon': the targets and advantages of 'none'; the policy gradient takes
  log(pi(a_t|x_t) + epsilon) with epsilon = 1e-6 instead of log pi (`EPSILON`, passed to the
  loss as `log_epsilon`), which keeps the gradient of very unlikely actions finite (after
  Babaeizadeh et al. 2016).
- 'is1': 1-step importance sampling: the value targets are those of 'none' (no correction when
  learning V), and each step's advantage is multiplied by its importance weight pi(a_t|x_t) /
  mu(a_t|x_t), unclipped and without traces.

Pure functions over time-major tensors as in `impala.vtrace`; the outputs are targets, computed
without gradient.
"""

from __future__ import annotations

from typing import Literal

import torch

from impala import vtrace
from impala.vtrace import VTraceReturns

Correction = Literal["vtrace", "none", "epsilon", "is1"]
CORRECTIONS: tuple[str, ...] = ("vtrace", "none", "epsilon", "is1")
EPSILON = 1e-6  # the paper's epsilon-correction


def off_policy_returns(
    correction: str,
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
    """Value targets `vs` and policy-gradient advantages, both `[T, B]`, for `correction` (see
    the module doc). Inputs as `impala.vtrace.from_importance_weights`; the clip thresholds and
    lambda apply to V-trace only ('none', 'epsilon' and 'is1' use plain n-step returns).

    Raises ValueError for an unknown correction, and as `from_importance_weights`.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if correction == "vtrace":
        return vtrace.from_importance_weights(
            log_rhos=log_rhos,
            discounts=discounts,
            rewards=rewards,
            values=values,
            bootstrap_value=bootstrap_value,
            clip_rho_threshold=clip_rho_threshold,
            clip_c_threshold=clip_c_threshold,
            clip_pg_rho_threshold=clip_pg_rho_threshold,
            lambda_=lambda_,
        )
    # With every log-ratio 0 (pi = mu) V-trace's recursion is the n-step bootstrapped return,
    # v_s = r_s + discount_s v_{s+1}, and its advantages are unweighted.
    uncorrected = vtrace.from_importance_weights(
        log_rhos=torch.zeros_like(log_rhos),
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
    )
    if correction != "is1":
        return uncorrected
    with torch.no_grad():
        weighted = torch.exp(log_rhos) * uncorrected.pg_advantages
    return VTraceReturns(vs=uncorrected.vs, pg_advantages=weighted)
