"""The learner's optimisers: RMSProp with TensorFlow's semantics (the IMPALA paper's), the choice
by --optimizer (`make_optimizer`), and gradients kept in one flat buffer (`FlatGradients`).

RMSProp with TensorFlow's semantics, the optimiser of the IMPALA paper.

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
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from impala.config import Config


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


class FlatGradients:
    """The gradients of a model's trained parameters as views of one flat buffer, so that zeroing
    them and clipping their global norm are one operation each instead of a loop over the
    parameters (zero_grad and clip_grad_norm_ took 9% of a CartPole update's time).

    Autograd adds into an existing gradient in place, so after `zero()` a backward pass fills the
    buffer. A gradient that something replaced (a hook that assigns `p.grad`) is copied back into
    the buffer before the norm is taken. Every trained parameter gets a gradient at each update
    (zero where the loss does not reach it), where zero_grad(set_to_none=True) would have left
    such a parameter without one and the optimizer would have skipped it; every parameter of this
    project's networks is reached by every update's loss.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        total = sum(p.numel() for p in params)
        self.flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        chunks = torch.split(self.flat, [p.numel() for p in params])
        self.views = [v.view_as(p) for v, p in zip(chunks, params, strict=True)]
        self.zero()

    @classmethod
    def of(cls, params) -> FlatGradients | None:
        """Flat gradients of the parameters that take gradient, or None if they are not all of
        one dtype and device (or there are none)."""
        trained = [p for p in params if p.requires_grad]
        if not trained or len({(p.dtype, p.device) for p in trained}) > 1:
            return None
        return cls(trained)

    def zero(self) -> None:
        """Zeroes every gradient (and attaches any that was detached from the buffer)."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:
                p.grad = view
        self.flat.zero_()

    def clip_norm(self, max_norm: float) -> torch.Tensor:
        """As `nn.utils.clip_grad_norm_`: scales the gradients so that their global L2 norm is at
        most `max_norm` and returns the norm before scaling."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:  # replaced since `zero` (e.g. by a gradient hook)
                view.copy_(p.grad if p.grad is not None else torch.zeros_like(view))
                p.grad = view
        norm = torch.linalg.vector_norm(self.flat)
        if max_norm != float("inf"):
            self.flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer` with the config's settings.

    Fused (one kernel for all parameters) where PyTorch has it, else the multi-tensor version:
    on small networks the per-parameter loop of the default costs as much as the gradient
    (Adam on the CartPole MLP: 79 us fused, 225 us multi-tensor, 334 us default).
    """
    params = list(params)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params,
            lr=cfg.learning_rate,
            alpha=cfg.rmsprop_alpha,
            eps=cfg.optimizer_eps,
            momentum=cfg.rmsprop_momentum,
            foreach=True,
        )
    if cfg.optimizer == "rmsprop-tf":
        return RMSpropTF(
            params,
            lr=cfg.learning_rate,
            decay=cfg.rmsprop_alpha,
            eps=cfg.optimizer_eps,
            momentum=cfg.rmsprop_momentum,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.optimizer_eps, fused=True)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.learning_rate, fused=True)
    return torch.optim.SGD(params, lr=cfg.learning_rate, fused=True)
