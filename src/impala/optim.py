"""RMSProp with TensorFlow's semantics, the optimiser of the IMPALA paper.

The paper trained with TensorFlow's `RMSPropOptimizer` (decay 0.99, epsilon 0.01, momentum 0).
Its update differs from `torch.optim.RMSprop` in two ways that matter with so large an epsilon:

    TensorFlow (this class)                         torch.optim.RMSprop
    ms  <- decay * ms + (1 - decay) * g^2           v <- alpha * v + (1 - alpha) * g^2
    mom <- momentum * mom + lr * g / sqrt(ms + eps) b <- momentum * b + g / (sqrt(v) + eps)
    p   <- p - mom                                  p <- p - lr * b
    ms starts at 1                                  v starts at 0

Epsilon inside the square root (sqrt(0.01) = 0.1 bounds the step at 10 * lr * |g| rather than
100 * lr * |g|), the mean square starting at one (the first steps are about lr * g, not
lr * sign(g) / sqrt(1 - alpha) as from zero), and the learning rate inside the momentum buffer
(so a decaying learning rate also scales what momentum carries).

PyTorch has no such variant (nor an option for it), hence this one; the update uses PyTorch's
multi-tensor (`torch._foreach_*`) kernels, one call per step for all parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1's `tf.train.RMSPropOptimizer` computes it (see the module doc)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 6e-4,
        decay: float = 0.99,
        eps: float = 0.01,
        momentum: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or momentum < 0 or not 0 <= decay < 1:
            raise ValueError(
                f"bad RMSpropTF setting: lr={lr}, decay={decay}, eps={eps}, momentum={momentum}"
            )
        super().__init__(params, dict(lr=lr, decay=decay, eps=eps, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states, strict=True):
                if not state:
                    state["ms"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            mean_squares = [s["ms"] for s in states]
            decay, eps, lr = group["decay"], group["eps"], group["lr"]
            # ms <- decay * ms + (1 - decay) * g^2
            torch._foreach_mul_(mean_squares, decay)
            torch._foreach_addcmul_(mean_squares, grads, grads, value=1 - decay)
            # step = g / sqrt(ms + eps)
            denominators = torch._foreach_add(mean_squares, eps)
            torch._foreach_sqrt_(denominators)
            steps = torch._foreach_div(grads, denominators)
            if group["momentum"] > 0:
                momenta = [s["mom"] for s in states]
                torch._foreach_mul_(momenta, group["momentum"])
                torch._foreach_add_(momenta, steps, alpha=lr)
                torch._foreach_sub_(params, momenta)
            else:
                torch._foreach_add_(params, steps, alpha=-lr)
        return loss
