"""RMSpropTF against a float64 oracle written from TensorFlow 1's RMSPropOptimizer update."""

import numpy as np
import pytest
import torch

from impala.optim import RMSpropTF


def _oracle(p0, grads, lrs, decay, eps, momentum):
    """ms starts at 1; ms = decay ms + (1 - decay) g^2; mom = momentum mom + lr g / sqrt(ms + eps);
    p -= mom. One element at a time, in float64."""
    p = np.array(p0, dtype=np.float64).ravel().copy()
    ms = np.ones_like(p)
    mom = np.zeros_like(p)
    for g, lr in zip(grads, lrs, strict=True):
        g = np.asarray(g, dtype=np.float64).ravel()
        for i in range(p.size):
            ms[i] = decay * ms[i] + (1.0 - decay) * g[i] * g[i]
            mom[i] = momentum * mom[i] + lr * g[i] / np.sqrt(ms[i] + eps)
            p[i] -= mom[i]
    return p.reshape(np.shape(p0))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_tf_matches_the_formula(momentum):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,)]
    starts = [rng.normal(size=s) for s in shapes]
    steps = 25
    grads = [[rng.normal(scale=3.0, size=s) for s in shapes] for _ in range(steps)]
    lrs = np.linspace(6e-3, 1e-3, steps)  # a decaying rate, set between steps as the learner does
    params = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in starts]
    opt = RMSpropTF(params, lr=lrs[0], decay=0.9, eps=0.01, momentum=momentum)
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = float(lrs[k])
        for p, g in zip(params, grads[k], strict=True):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    for j, p in enumerate(params):
        want = _oracle(starts[j], [g[j] for g in grads], lrs, 0.9, 0.01, momentum)
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-12)


def test_rmsprop_tf_is_not_torchs_rmsprop():
    """The first step from ms = 1 with epsilon inside the root is about lr * g; PyTorch's, from
    v = 0 with epsilon outside, is about lr * sign(g) * 10."""
    g = torch.tensor([0.5, -2.0], dtype=torch.float64)
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    a.grad, b.grad = g.clone(), g.clone()
    RMSpropTF([a], lr=0.1, decay=0.99, eps=0.01).step()
    torch.optim.RMSprop([b], lr=0.1, alpha=0.99, eps=0.01).step()
    ms = 0.99 + 0.01 * g**2
    torch.testing.assert_close(a.detach(), -0.1 * g / torch.sqrt(ms + 0.01))
    assert not torch.allclose(a.detach(), b.detach(), rtol=0.1)


def test_learner_builds_rmsprop_tf_from_the_config():
    from impala.agent.learner import make_optimizer
    from impala.config import Config

    opt = make_optimizer(Config(optimizer="rmsprop-tf", learning_rate=6e-4), [torch.zeros(2)])
    assert isinstance(opt, RMSpropTF)
    assert opt.defaults["eps"] == 0.01 and opt.defaults["decay"] == 0.99
