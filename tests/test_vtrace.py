"""V-trace against a slow float64 oracle written straight from the paper's eq. (1).

Espeholt et al. 2018, Sec. 4.1: v_s = V(x_s) + sum_{t=s}^{s+n-1} gamma^{t-s} (prod_{i=s}^{t-1} c_i)
delta_t V, with delta_t V = rho_t (r_t + gamma V(x_{t+1}) - V(x_t)). Per-step discounts replace
gamma^{t-s} by the product of the discounts, so a zero discount (an episode end) cuts the sum.
"""

import math

import numpy as np
import pytest
import torch

from impala import vtrace


def oracle(log_rhos, discounts, rewards, values, bootstrap, rho_bar, c_bar, pg_rho_bar, lam):
    """Explicit-sum eq. (1), element by element, in float64 Python arithmetic."""
    T, B = log_rhos.shape
    clip = lambda x, bar: x if bar is None else min(bar, x)  # noqa: E731
    vs = np.zeros((T, B))
    pg = np.zeros((T, B))
    for b in range(B):
        V = [float(values[t, b]) for t in range(T)] + [float(bootstrap[b])]
        ratio = [math.exp(float(log_rhos[t, b])) for t in range(T)]
        rho = [clip(r, rho_bar) for r in ratio]
        c = [lam * clip(r, c_bar) for r in ratio]
        delta = [rho[t] * (rewards[t, b] + discounts[t, b] * V[t + 1] - V[t]) for t in range(T)]
        for s in range(T):
            total = V[s]
            for t in range(s, T):
                weight = 1.0
                for k in range(s, t):
                    weight *= discounts[k, b] * c[k]
                total += weight * delta[t]
            vs[s, b] = total
        for s in range(T):
            v_next = vs[s + 1, b] if s + 1 < T else V[T]
            pg[s, b] = clip(ratio[s], pg_rho_bar) * (rewards[s, b] + discounts[s, b] * v_next - V[s])
    return vs, pg


def random_inputs(T, B, seed, episode_ends=True, dtype=np.float64):
    rng = np.random.default_rng(seed)
    log_rhos = rng.uniform(-2.5, 2.5, size=(T, B))  # ratios from 0.08 to 12: across every threshold
    discounts = np.full((T, B), 0.93)
    if episode_ends:
        discounts[rng.random((T, B)) < 0.2] = 0.0
    rewards = rng.normal(size=(T, B))
    values = rng.normal(size=(T, B))
    bootstrap = rng.normal(size=(B,))
    return [x.astype(dtype) for x in (log_rhos, discounts, rewards, values, bootstrap)]


THRESHOLDS = [
    (1.0, 1.0, 1.0),
    (0.5, 3.7, 2.0),
    (3.7, 0.5, 1.0),
    (None, 1.0, 1.0),
    (1.0, None, 1.0),
    (1.0, 1.0, None),
    (None, None, None),
]


@pytest.mark.parametrize("rho_bar, c_bar, pg_bar", THRESHOLDS)
@pytest.mark.parametrize("lam", [1.0, 0.95, 0.3, 0.0])
def test_matches_oracle_float64(rho_bar, c_bar, pg_bar, lam):
    T, B = 9, 5
    inputs = random_inputs(T, B, seed=hash((rho_bar, c_bar, pg_bar, lam)) % 2**32)
    expected_vs, expected_pg = oracle(*inputs, rho_bar, c_bar, pg_bar, lam)
    got = vtrace.from_importance_weights(
        *[torch.from_numpy(x) for x in inputs],
        clip_rho_threshold=rho_bar, clip_c_threshold=c_bar, clip_pg_rho_threshold=pg_bar,
        lambda_=lam,
    )
    assert got.vs.dtype == torch.float64
    np.testing.assert_allclose(got.vs.numpy(), expected_vs, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.pg_advantages.numpy(), expected_pg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T, B", [(1, 1), (1, 4), (6, 1), (17, 3)])
def test_matches_oracle_shapes_and_float32(T, B):
    inputs = random_inputs(T, B, seed=T * 100 + B)
    expected_vs, expected_pg = oracle(*inputs, 1.0, 1.0, 1.0, 1.0)
    got = vtrace.from_importance_weights(*[torch.from_numpy(x.astype(np.float32)) for x in inputs])
    assert got.vs.dtype == torch.float32 and got.vs.shape == (T, B)
    np.testing.assert_allclose(got.vs.numpy(), expected_vs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.pg_advantages.numpy(), expected_pg, rtol=1e-4, atol=1e-4)


def test_extra_trailing_dims_are_independent_columns():
    T, B, K = 5, 2, 3
    inputs = random_inputs(T, B * K, seed=7)
    flat = vtrace.from_importance_weights(*[torch.from_numpy(x) for x in inputs])
    shaped = vtrace.from_importance_weights(
        *[torch.from_numpy(x).reshape(*x.shape[:-1], B, K) for x in inputs]
    )
    assert shaped.vs.shape == (T, B, K)
    torch.testing.assert_close(shaped.vs.reshape(T, B * K), flat.vs)


def test_on_policy_equals_n_step_bootstrapped_returns():
    """rho = 1, no clipping, lambda 1: v_s is the n-step return bootstrapped at the unroll end."""
    T, B = 8, 4
    _, discounts, rewards, values, bootstrap = random_inputs(T, B, seed=3)
    got = vtrace.from_importance_weights(
        torch.zeros(T, B, dtype=torch.float64), *[torch.from_numpy(x) for x in
                                                  (discounts, rewards, values, bootstrap)],
        clip_rho_threshold=None, clip_c_threshold=None, clip_pg_rho_threshold=None,
    )
    returns = np.zeros((T, B))
    acc = bootstrap.copy()
    for t in reversed(range(T)):
        acc = rewards[t] + discounts[t] * acc
        returns[t] = acc
    np.testing.assert_allclose(got.vs.numpy(), returns, rtol=1e-12)
    next_returns = np.concatenate([returns[1:], bootstrap[None]], 0)
    np.testing.assert_allclose(
        got.pg_advantages.numpy(), rewards + discounts * next_returns - values, rtol=1e-12
    )


def test_episode_end_splits_the_trace():
    """With discount 0 at step k, v_0..v_k do not depend on anything after k: the trace over the
    unroll equals the traces of its two episodes computed apart and joined."""
    T, B, k = 10, 3, 4
    log_rhos, discounts, rewards, values, bootstrap = random_inputs(T, B, seed=11, episode_ends=False)
    discounts[k] = 0.0
    as_t = lambda *xs: [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]  # noqa: E731
    whole = vtrace.from_importance_weights(*as_t(log_rhos, discounts, rewards, values, bootstrap))
    first = vtrace.from_importance_weights(
        *as_t(log_rhos[: k + 1], discounts[: k + 1], rewards[: k + 1], values[: k + 1],
              np.full(B, 123.0))  # any bootstrap: it is multiplied by the zero discount
    )
    second = vtrace.from_importance_weights(
        *as_t(log_rhos[k + 1 :], discounts[k + 1 :], rewards[k + 1 :], values[k + 1 :], bootstrap)
    )
    torch.testing.assert_close(whole.vs, torch.cat([first.vs, second.vs]))
    torch.testing.assert_close(whole.pg_advantages, torch.cat([first.pg_advantages, second.pg_advantages]))


def test_outputs_carry_no_gradient():
    inputs = [torch.from_numpy(x).requires_grad_() for x in random_inputs(4, 2, seed=5)]
    got = vtrace.from_importance_weights(*inputs)
    assert not got.vs.requires_grad and not got.pg_advantages.requires_grad


def test_from_logits_matches_importance_weights():
    T, B, A = 6, 3, 4
    rng = np.random.default_rng(2)
    behaviour = rng.normal(size=(T, B, A))
    target = rng.normal(size=(T, B, A))
    actions = rng.integers(0, A, size=(T, B))
    _, discounts, rewards, values, bootstrap = random_inputs(T, B, seed=9)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pick = lambda lp: np.take_along_axis(lp, actions[..., None], -1)[..., 0]  # noqa: E731
    b_lp, t_lp = pick(log_softmax(behaviour)), pick(log_softmax(target))
    got = vtrace.from_logits(
        torch.from_numpy(behaviour), torch.from_numpy(target).requires_grad_(),
        torch.from_numpy(actions), *[torch.from_numpy(x) for x in (discounts, rewards, values, bootstrap)],
        clip_rho_threshold=2.0,
    )
    np.testing.assert_allclose(got.behaviour_action_log_probs.numpy(), b_lp, rtol=1e-12)
    np.testing.assert_allclose(got.target_action_log_probs.detach().numpy(), t_lp, rtol=1e-12)
    np.testing.assert_allclose(got.log_rhos.detach().numpy(), t_lp - b_lp, rtol=1e-10, atol=1e-12)
    expected_vs, expected_pg = oracle(t_lp - b_lp, discounts, rewards, values, bootstrap, 2.0, 1.0, 1.0, 1.0)
    np.testing.assert_allclose(got.vs.numpy(), expected_vs, rtol=1e-10)
    np.testing.assert_allclose(got.pg_advantages.numpy(), expected_pg, rtol=1e-10)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "values": a["values"][:-1]}, "values"),
        (lambda a: {**a, "rewards": a["rewards"].float()}, "rewards"),
        (lambda a: {**a, "bootstrap_value": a["bootstrap_value"][:1]}, "bootstrap_value"),
        (lambda a: {**a, "log_rhos": a["log_rhos"][0], "discounts": a["discounts"][0],
                    "rewards": a["rewards"][0], "values": a["values"][0]}, "log_rhos"),
    ],
)
def test_shape_errors_name_the_argument(change, message):
    names = ["log_rhos", "discounts", "rewards", "values", "bootstrap_value"]
    args = dict(zip(names, [torch.from_numpy(x) for x in random_inputs(4, 3, seed=1)]))
    with pytest.raises(ValueError, match=message):
        vtrace.from_importance_weights(**change(args))


def test_bad_options_raise():
    args = [torch.from_numpy(x) for x in random_inputs(3, 2, seed=1)]
    with pytest.raises(ValueError, match="clip_rho_threshold"):
        vtrace.from_importance_weights(*args, clip_rho_threshold=-1.0)
    with pytest.raises(ValueError, match="lambda_"):
        vtrace.from_importance_weights(*args, lambda_=1.5)
    with pytest.raises(ValueError, match="actions"):
        vtrace.from_logits(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), torch.zeros(3, 3, dtype=torch.long),
                           *args[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    args = [torch.from_numpy(x) for x in random_inputs(12, 64, seed=4)]
    cpu = vtrace.from_importance_weights(*args, lambda_=0.9)
    gpu = vtrace.from_importance_weights(*[a.cuda() for a in args], lambda_=0.9)
    torch.testing.assert_close(gpu.vs.cpu(), cpu.vs)
    torch.testing.assert_close(gpu.pg_advantages.cpu(), cpu.pg_advantages)
