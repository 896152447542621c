"""The Gaussian policy head's bounds on its log standard deviations: forward uses the parameter as
it is (so its gradient flows at and past the bounds), `constrain_parameters` projects it back
after each step, and loading projects a checkpoint's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from impala.distributions import ActionSpec
from impala.nets import constrain_parameters
from impala.nets.heads import LOG_STD_MAX, LOG_STD_MIN, GaussianPolicy
from impala.nets.mlp import MLPNet

BOX = ActionSpec("box", low=(-1.0, -1.0), high=(1.0, 1.0))


def _neg_log_likelihood(policy: GaussianPolicy, features, actions) -> torch.Tensor:
    """Mean over the batch of -log N(actions; mean, exp(log_std)^2), summed over dimensions."""
    mean, log_std = policy(features).chunk(2, dim=-1)
    z = (actions - mean) * torch.exp(-log_std)
    return (0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi)).sum(-1).mean()


@pytest.mark.parametrize("log_std", [[-5.5, 2.5], [LOG_STD_MIN, LOG_STD_MAX]], ids=["past", "at"])
def test_log_std_has_its_gradient_at_and_past_the_bounds(log_std):
    """d/dlog_std of the mean negative log-likelihood is mean(1 - z^2) per dimension (z the
    standardised action): the oracle, from the formula in float64. A clamp in forward gave 0
    past the bounds."""
    torch.manual_seed(0)
    policy = GaussianPolicy(3, 2).double()
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor(log_std))
    features = torch.randn(16, 3, dtype=torch.float64)
    mean = policy.mean(features).detach()
    actions = mean + torch.randn(16, 2, dtype=torch.float64) * 0.5
    _neg_log_likelihood(policy, features, actions).backward()
    z = (actions - mean).numpy() / np.exp(np.array(log_std))
    expected = (1.0 - z**2).mean(0)
    assert np.abs(expected).min() > 0.1  # a gradient that a step would act on
    np.testing.assert_allclose(policy.log_std.grad.numpy(), expected, rtol=1e-10)


def test_log_std_pushed_past_its_floor_comes_back_up_and_stays_within_the_bounds():
    """SGD on log_std alone, projected after each step: first the actions sit on the mean (the
    likelihood grows as the std shrinks, without end), then they lie at mean +- 1, whose maximum
    likelihood std is 1 (log_std 0). It must reach the floor, come back up from it and settle at
    0, never leaving [LOG_STD_MIN, LOG_STD_MAX] after a step. With the clamp in forward and no
    projection it stayed past the floor for good."""
    torch.manual_seed(0)
    policy = GaussianPolicy(3, 2)
    optimizer = torch.optim.SGD([policy.log_std], lr=0.7)
    features = torch.randn(8, 3)
    mean = policy.mean(features).detach()
    sign = torch.tensor([1.0, -1.0]).repeat(4).view(8, 1)  # half above, half below the mean

    def step(actions: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        _neg_log_likelihood(policy, features, actions).backward()
        optimizer.step()
        constrain_parameters(policy)
        log_std = policy.log_std.detach().clone()
        assert (log_std >= LOG_STD_MIN).all() and (log_std <= LOG_STD_MAX).all()
        return log_std

    lowest = min(step(mean).min().item() for _ in range(12))  # 12 steps of -0.7: past -5
    assert lowest == LOG_STD_MIN  # projected onto the floor, not left past it
    optimizer.param_groups[0]["lr"] = 0.1
    trail = [step(mean + sign) for _ in range(150)]
    assert trail[0].min().item() > LOG_STD_MIN  # up from the floor at the first step
    torch.testing.assert_close(trail[-1], torch.zeros(2), rtol=0, atol=1e-4)


def test_constrain_parameters_projects_every_gaussian_head_of_a_network():
    torch.manual_seed(0)
    net = MLPNet(4, BOX)
    with torch.no_grad():
        net.policy_head.log_std.copy_(torch.tensor([-9.0, 3.5]))
    weights = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("log_std")}
    constrain_parameters(net)
    constrain_parameters(net)  # again, from the kept list of constrained modules
    assert net.policy_head.log_std.tolist() == [LOG_STD_MIN, LOG_STD_MAX]
    for key, tensor in weights.items():  # nothing else touched
        torch.testing.assert_close(net.state_dict()[key], tensor, rtol=0, atol=0)
    discrete = MLPNet(4, 3)  # no constraint at all: nothing to do, no error
    constrain_parameters(discrete)


def test_a_checkpoint_with_log_std_out_of_bounds_loads_projected():
    """Written while forward clamped, a checkpoint may hold a log_std past a bound: it loads
    projected, so forward gives what the clamp gave then (the oracle: numpy's clip), before any
    step; the caller's state dict is left as it was."""
    torch.manual_seed(0)
    net = MLPNet(4, BOX)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["policy_head.log_std"] = torch.tensor([-7.0, 2.75])
    fresh = MLPNet(4, BOX)
    fresh.load_state_dict(state)
    assert state["policy_head.log_std"].tolist() == [-7.0, 2.75]
    obs = torch.randn(5, 4)
    with torch.no_grad():
        log_std = fresh(obs)[0][:, 2:].numpy()
    clipped = np.clip(np.array([-7.0, 2.75]), LOG_STD_MIN, LOG_STD_MAX)
    np.testing.assert_array_equal(log_std, np.broadcast_to(clipped, (5, 2)))
