"""PopArt: a value head that learns values of any scale (van Hasselt et al. 2016, "Learning values
across many orders of magnitude"; Hessel et al. 2019, "Multi-task Deep RL with PopArt").

The linear layer predicts a normalised value `n(x) = w.f(x) + b`; the value is
`V(x) = sigma * n(x) + mu`, with `mu` and `sigma` running statistics of the value targets: the
exponential moving averages, with step beta, of the targets' first and second moments,

    mu    <- (1 - beta) mu + beta mean(v_s)
    nu    <- (1 - beta) nu + beta mean(v_s^2)
    sigma  = sqrt(nu - mu^2), clipped to [SIGMA_MIN, SIGMA_MAX]

The variance `var = nu - mu^2` is kept rather than `nu`: where the returns are far larger than
their spread (mean 3,000, std 1), `nu - mu^2` cancels all of float32's digits (sigma fell to its
floor and the advantages were divided by 1e-4). With m and v the batch's mean and (population)
variance of the targets, the same moving averages are, exactly,

    mu'  = mu + beta (m - mu)
    var' = (1 - beta) var + beta v + beta (1 - beta) (m - mu)^2

(expand `nu' - mu'^2` with `nu = var + mu^2` and `mean(v_s^2) = v + m^2`): a sum of non-negative
terms, nothing cancels. `update` computes it in float64 and stores float32 parameters.

After each change of the statistics the layer is rescaled so that every output `V(x)` stays
exactly what it was ("preserving outputs precisely"):

    w' = w sigma / sigma'        b' = (sigma b + mu - mu') / sigma'

V-trace runs on unnormalised values (what `forward` returns, and what explorers use); the learner
takes the baseline loss on normalised values and targets, `((v_s - V(x)) / sigma)^2 / 2`, and
divides the policy-gradient advantages by sigma (Hessel et al.), so that neither the size of the
gradient nor the step size depends on the reward scale.

`mu` and `var` are parameters that take no gradient: they travel with the weights in the
parameter store, so explorers' unnormalised values are the learner's. State dicts of the earlier
form, with the second moment `nu` in place of `var`, still load (see `_load_second_moment`).

Multi-task (Hessel et al. 2019): with `num_tasks` K > 1 the head has one output, one `mu` and one
`var` per task, `[N, F] -> [N, K]`; each task's statistics follow the targets of that task's
sequences only, and only its row of the layer is rescaled.
"""

from __future__ import annotations

import torch
from torch import nn

SIGMA_MIN = 1e-4
SIGMA_MAX = 1e6


def _sigma_of(var: torch.Tensor) -> torch.Tensor:
    """The scale for variances `var [K]`, clipped to [SIGMA_MIN, SIGMA_MAX], in `var`'s dtype."""
    return var.clamp(min=SIGMA_MIN**2).sqrt().clamp(SIGMA_MIN, SIGMA_MAX)


class PopArt(nn.Module):
    """A value head `[N, F] -> [N]` (`[N, K]` for K tasks) with adaptively rescaled targets (see
    the module doc)."""

    def __init__(self, num_features: int, beta: float = 3e-4, num_tasks: int = 1) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.beta = beta
        self.num_tasks = num_tasks
        self.linear = nn.Linear(num_features, num_tasks)
        # Registered in this order (mu, then var: where nu was), so that the flat parameter
        # vector of the parameter store keeps its layout.
        self.mu = nn.Parameter(torch.zeros(num_tasks), requires_grad=False)
        self.var = nn.Parameter(torch.ones(num_tasks), requires_grad=False)
        self.register_load_state_dict_pre_hook(_load_second_moment)

    @property
    def sigma(self) -> torch.Tensor:
        """The scale of the targets `[K]` (no gradient)."""
        return _sigma_of(self.var.detach())

    def _squeeze(self, out: torch.Tensor) -> torch.Tensor:
        return out.squeeze(-1) if self.num_tasks == 1 else out

    def normalized(self, features: torch.Tensor) -> torch.Tensor:
        """`n(x)`, `[N]` (`[N, K]`)."""
        return self._squeeze(self.linear(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The unnormalised value `V(x) = sigma n(x) + mu`, `[N]` (`[N, K]`)."""
        return self._squeeze(self.linear(features) * self.sigma + self.mu.detach())

    @torch.no_grad()
    def update(self, targets: torch.Tensor, task: torch.Tensor | None = None) -> None:
        """Moves the statistics towards the batch of value targets `targets` and rescales the
        layer so that every unnormalised output is unchanged. One task: `targets` of any shape.
        K tasks: `targets [T, B]` and the task of each sequence, `task [B]`; a task without
        sequences in the batch keeps its statistics."""
        targets = targets.detach().to(torch.float64)
        if self.num_tasks == 1:
            batch_mean = targets.mean().view(1)
            batch_var = (targets - batch_mean).square().mean().view(1)
            present = torch.ones(1, dtype=torch.bool, device=targets.device)
        else:
            if task is None or targets.dim() != 2 or task.shape != targets.shape[1:]:
                raise ValueError("K tasks need targets [T, B] and their tasks [B]")
            task = task.long()
            onehot = torch.nn.functional.one_hot(task, self.num_tasks).to(targets.dtype)  # [B, K]
            count = onehot.sum(0) * targets.shape[0]  # [K] targets of each task
            present = count > 0
            batch_mean = (targets.sum(0) @ onehot) / count.clamp(min=1)
            # Two passes: each target's deviation from its own task's batch mean, then the mean
            # square per task (the one-pass mean(v^2) - m^2 would cancel as nu - mu^2 did).
            deviation = targets - batch_mean[task]  # [T, B]
            batch_var = (deviation.square().sum(0) @ onehot) / count.clamp(min=1)
        beta = self.beta * present.to(targets.dtype)  # [K]: 0 for the absent tasks
        # The statistics as stored (and as forward uses them), in float64; copies, as a float64
        # head's parameters change in place below.
        mu_old = self.mu.to(torch.float64, copy=True)
        var_old = self.var.to(torch.float64, copy=True)
        sigma_old = self.sigma.to(torch.float64, copy=True)
        delta = batch_mean - mu_old
        self.mu.copy_(mu_old + beta * delta)
        self.var.copy_((1.0 - beta) * var_old + beta * batch_var + beta * (1.0 - beta) * delta**2)
        # Rescale against the statistics as stored after rounding, which forward will use.
        mu_new, sigma_new = self.mu.to(torch.float64), self.sigma.to(torch.float64)
        weight, bias = self.linear.weight, self.linear.bias
        weight.copy_(weight.to(torch.float64) * (sigma_old / sigma_new).unsqueeze(1))
        rescaled = (bias.to(torch.float64) * sigma_old + mu_old - mu_new) / sigma_new
        bias.copy_(torch.where(present, rescaled, bias.to(torch.float64)))


def _load_second_moment(
    popart: PopArt, state_dict: dict, prefix: str, *args: object, **kwargs: object
) -> None:
    """A load_state_dict pre-hook: a state dict of the earlier form holds the second moment
    `nu` where this one holds the variance `var`; turns it into `var = nu - mu^2` (in float64,
    no lower than 0) and rescales the layer's rows in the state dict so that every output is the
    one the earlier code gave for it (with its float32 `sigma`, which had lost its digits where
    the returns dwarfed their spread: the layer was trained against that sigma). Entries that do
    not fit (other shapes) are passed on renamed, for load_state_dict to name the mismatch."""
    old_key, new_key = prefix + "nu", prefix + "var"
    if old_key not in state_dict or new_key in state_dict:
        return
    nu = state_dict.pop(old_key)
    mu = state_dict.get(prefix + "mu")
    weight_key, bias_key = prefix + "linear.weight", prefix + "linear.bias"
    weight, bias = state_dict.get(weight_key), state_dict.get(bias_key)
    tensors = (nu, mu, weight, bias)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not (
        nu.shape == mu.shape == bias.shape == weight.shape[:1] and nu.dim() == 1
    ):
        state_dict[new_key] = nu
        return
    # Copies, never in place: the tensors are the caller's.
    var = (nu.to(torch.float64) - mu.to(torch.float64) ** 2).clamp(min=0.0).to(nu.dtype)
    sigma_then = _sigma_of(nu - mu**2)  # the earlier code's sigma: its formula, in its dtype
    ratio = sigma_then.to(torch.float64) / _sigma_of(var).to(torch.float64)
    state_dict[new_key] = var
    ratio = ratio.to(weight.device)
    state_dict[weight_key] = (weight.to(torch.float64) * ratio.unsqueeze(1)).to(weight.dtype)
    state_dict[bias_key] = (bias.to(torch.float64) * ratio.to(bias.device)).to(bias.dtype)
