"""PopArt: a value head that learns values of any scale (van Hasselt et al. 2016, "Learning values
across many orders of magnitude"; Hessel et al. 2019, "Multi-task Deep RL with PopArt").

The linear layer predicts a normalised value `n(x) = w.f(x) + b`; the value is
`V(x) = sigma * n(x) + mu`, with `mu` and `sigma` running statistics of the value targets:

    mu    <- (1 - beta) mu + beta mean(v_s)          (first moment of the V-trace targets)
    nu    <- (1 - beta) nu + beta mean(v_s^2)        (second moment)
    sigma  = sqrt(nu - mu^2), clipped to [SIGMA_MIN, SIGMA_MAX]

After each change of the statistics the layer is rescaled so that every output `V(x)` stays
exactly what it was ("preserving outputs precisely"):

    w' = w sigma / sigma'        b' = (sigma b + mu - mu') / sigma'

V-trace runs on unnormalised values (what `forward` returns, and what explorers use); the learner
takes the baseline loss on normalised values and targets, `((v_s - V(x)) / sigma)^2 / 2`, and
divides the policy-gradient advantages by sigma (Hessel et al.), so that neither the size of the
gradient nor the step size depends on the reward scale.

`mu` and `nu` are parameters that take no gradient: they travel with the weights in the
parameter store, so explorers' unnormalised values are the learner's.

Multi-task (Hessel et al. 2019): with `num_tasks` K > 1 the head has one output, one `mu` and one
`nu` per task, `[N, F] -> [N, K]`; each task's statistics follow the targets of that task's
sequences only, and only its row of the layer is rescaled.
"""

from __future__ import annotations

import torch
from torch import nn

SIGMA_MIN = 1e-4
SIGMA_MAX = 1e6


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
        self.mu = nn.Parameter(torch.zeros(num_tasks), requires_grad=False)
        self.nu = nn.Parameter(torch.ones(num_tasks), requires_grad=False)

    @property
    def sigma(self) -> torch.Tensor:
        """The scale of the targets `[K]` (no gradient)."""
        variance = (self.nu - self.mu**2).clamp(min=SIGMA_MIN**2)
        return variance.sqrt().clamp(SIGMA_MIN, SIGMA_MAX).detach()

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
        targets = targets.detach().to(self.mu.dtype)
        if self.num_tasks == 1:
            first, second = targets.mean().view(1), (targets**2).mean().view(1)
            present = torch.ones(1, dtype=torch.bool, device=targets.device)
        else:
            if task is None or targets.dim() != 2 or task.shape != targets.shape[1:]:
                raise ValueError("K tasks need targets [T, B] and their tasks [B]")
            onehot = torch.nn.functional.one_hot(task.long(), self.num_tasks).to(targets.dtype)
            count = onehot.sum(0) * targets.shape[0]  # [K] targets of each task
            present = count > 0
            first = (targets.sum(0) @ onehot) / count.clamp(min=1)
            second = ((targets**2).sum(0) @ onehot) / count.clamp(min=1)
        beta = self.beta * present.to(targets.dtype)  # [K]: 0 for the absent tasks
        mu_old, sigma_old = self.mu.clone(), self.sigma.clone()
        self.mu.mul_(1.0 - beta).add_(beta * first)
        self.nu.mul_(1.0 - beta).add_(beta * second)
        sigma_new = self.sigma
        self.linear.weight.mul_((sigma_old / sigma_new).unsqueeze(1))
        self.linear.bias.mul_(sigma_old).add_(mu_old - self.mu).div_(sigma_new)
