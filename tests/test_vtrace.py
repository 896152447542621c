"""V-trace against a slow float64 oracle written from the explicit-sum form of eq. (1).

Espeholt et al. 2018, Sec. 4.1, eq. (1):

    v_s = V(x_s) + sum_{t=s}^{s+n-1} gamma^{t-s} (prod_{i=s}^{t-1} c_i) delta_t V,
    delta_t V = rho_t (r_t + gamma V(x_{t+1}) - V(x_t)),

with per-step discounts in place of gamma^{t-s} (their product over k = s..t-1), so a zero
discount (an episode end) cuts the sum, and V(x_T) = the bootstrap value. The implementation
uses the recursion of Remark 1 instead; agreement of the two is the main check.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from impala import vtrace

# ---------------------------------------------------------------------------------------------
# Oracle and helpers


def _clip(x: float, threshold: float | None) -> float:
    return x if threshold is None else min(threshold, x)


def oracle(
    log_rhos, discounts, rewards, values, bootstrap, *, rho_bar=1.0, c_bar=1.0, pg_bar=1.0, lam=1.0
):
    """Eq. (1) as an explicit sum, element by element, in Python float64 arithmetic.

    Arrays `[T, N]` (N: all non-time dims flattened), bootstrap `[N]`; returns (vs, pg) `[T, N]`.
    """
    T, N = log_rhos.shape
    vs = np.zeros((T, N))
    pg = np.zeros((T, N))
    for n in range(N):
        V = [float(values[t, n]) for t in range(T)] + [float(bootstrap[n])]  # V[T] = bootstrap
        d = [float(discounts[t, n]) for t in range(T)]
        r = [float(rewards[t, n]) for t in range(T)]
        ratio = [math.exp(float(log_rhos[t, n])) for t in range(T)]
        rho = [_clip(x, rho_bar) for x in ratio]
        c = [lam * _clip(x, c_bar) for x in ratio]
        delta = [rho[t] * (r[t] + d[t] * V[t + 1] - V[t]) for t in range(T)]
        for s in range(T):
            total = V[s]
            for t in range(s, T):
                discount_product = 1.0
                trace_product = 1.0
                for k in range(s, t):
                    discount_product *= d[k]
                    trace_product *= c[k]
                total += discount_product * trace_product * delta[t]
            vs[s, n] = total
        for s in range(T):
            v_next = vs[s + 1, n] if s + 1 < T else V[T]
            pg[s, n] = _clip(ratio[s], pg_bar) * (r[s] + d[s] * v_next - V[s])
    return vs, pg


def oracle_nd(log_rhos, discounts, rewards, values, bootstrap, **options):
    """`oracle` on `[T, B, ...]` arrays: flatten the non-time dims, then restore them."""
    T = log_rhos.shape[0]
    flat = [
        np.asarray(x, dtype=np.float64).reshape(T, -1)
        for x in (log_rhos, discounts, rewards, values)
    ]
    vs, pg = oracle(*flat, np.asarray(bootstrap, dtype=np.float64).reshape(-1), **options)
    return vs.reshape(log_rhos.shape), pg.reshape(log_rhos.shape)


def random_inputs(shape, seed, *, episode_ends=True):
    """float64 arrays (log_rhos, discounts, rewards, values, bootstrap) for `shape` = [T, B, ...].

    log_rhos uniform in [-2.5, 2.5]: ratios from 0.08 to 12, on both sides of every threshold.
    Discounts vary in [0.8, 1.0] and are exactly 0 at about a quarter of the steps.
    """
    rng = np.random.default_rng(seed)
    log_rhos = rng.uniform(-2.5, 2.5, size=shape)
    discounts = rng.uniform(0.8, 1.0, size=shape)
    if episode_ends:
        discounts[rng.random(shape) < 0.25] = 0.0
    rewards = rng.normal(size=shape)
    values = rng.normal(size=shape)
    bootstrap = rng.normal(size=shape[1:])
    return log_rhos, discounts, rewards, values, bootstrap


def to_torch(arrays, dtype=torch.float64):
    return [torch.as_tensor(np.ascontiguousarray(x), dtype=dtype) for x in arrays]


def call(arrays, dtype=torch.float64, **options):
    names = {
        "rho_bar": "clip_rho_threshold",
        "c_bar": "clip_c_threshold",
        "pg_bar": "clip_pg_rho_threshold",
        "lam": "lambda_",
    }
    return vtrace.from_importance_weights(
        *to_torch(arrays, dtype), **{names[k]: v for k, v in options.items()}
    )


def n_step_returns(discounts, rewards, bootstrap):
    """G_t = r_t + d_t G_{t+1}, G_T = bootstrap, as explicit sums (independent of vtrace)."""
    T = rewards.shape[0]
    returns = np.zeros_like(rewards)
    for t in range(T):
        g = np.zeros_like(bootstrap)
        weight = np.ones_like(bootstrap)
        for k in range(t, T):
            g = g + weight * rewards[k]
            weight = weight * discounts[k]
        returns[t] = g + weight * bootstrap
    return returns


# ---------------------------------------------------------------------------------------------
# Against the oracle

THRESHOLDS = [
    pytest.param(1.0, 1.0, 1.0, id="all-1"),
    pytest.param(0.5, 3.7, 1.0, id="rho0.5-c3.7"),
    pytest.param(3.7, 0.5, 2.0, id="rho3.7-c0.5-pg2"),
    pytest.param(None, 1.0, 1.0, id="rho-None"),
    pytest.param(1.0, None, 1.0, id="c-None"),
    pytest.param(1.0, 1.0, None, id="pg-None"),
    pytest.param(None, None, None, id="all-None"),
]


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.3, 0.0])
@pytest.mark.parametrize("rho_bar, c_bar, pg_bar", THRESHOLDS)
def test_matches_oracle_float64(rho_bar, c_bar, pg_bar, lam):
    arrays = random_inputs((9, 4), seed=zlib.crc32(repr((rho_bar, c_bar, pg_bar, lam)).encode()))
    options = {"rho_bar": rho_bar, "c_bar": c_bar, "pg_bar": pg_bar, "lam": lam}
    expected_vs, expected_pg = oracle_nd(*arrays, **options)
    got = call(arrays, **options)
    assert got.vs.dtype == got.pg_advantages.dtype == torch.float64
    np.testing.assert_allclose(got.vs.numpy(), expected_vs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.pg_advantages.numpy(), expected_pg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (1, 5), (7, 1), (16, 3), (5, 2, 3), (4, 2, 2, 2)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_oracle_shapes_and_dtypes(shape, dtype):
    arrays = random_inputs(shape, seed=sum(shape) * 31 + len(shape))
    options = {"rho_bar": 1.3, "c_bar": 0.9, "pg_bar": 1.1, "lam": 0.95}
    expected_vs, expected_pg = oracle_nd(*arrays, **options)
    got = call(arrays, dtype, **options)
    assert got.vs.shape == got.pg_advantages.shape == shape
    assert got.vs.dtype == got.pg_advantages.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(got.vs.double().numpy(), expected_vs, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.pg_advantages.double().numpy(), expected_pg, rtol=tol, atol=tol)


def test_extra_trailing_dims_are_independent_columns():
    T, B, K = 6, 2, 3
    arrays = random_inputs((T, B * K), seed=7)
    flat = call(arrays, lam=0.9)
    shaped = call([x.reshape(*x.shape[:-1], B, K) for x in arrays], lam=0.9)
    assert shaped.vs.shape == (T, B, K)
    torch.testing.assert_close(shaped.vs.reshape(T, B * K), flat.vs, rtol=0, atol=0)
    torch.testing.assert_close(
        shaped.pg_advantages.reshape(T, B * K), flat.pg_advantages, rtol=0, atol=0
    )


def test_batch_columns_are_independent():
    """Changing one column's inputs leaves the other columns' outputs unchanged."""
    arrays = random_inputs((8, 3), seed=12)
    base = call(arrays)
    changed = [x.copy() for x in arrays]
    for x in changed:
        x[..., 1] += 1.0
    other = call(changed)
    for field in ("vs", "pg_advantages"):
        a, b = getattr(base, field), getattr(other, field)
        torch.testing.assert_close(a[:, [0, 2]], b[:, [0, 2]], rtol=0, atol=0)
        assert not torch.equal(a[:, 1], b[:, 1])


# ---------------------------------------------------------------------------------------------
# Properties


def test_on_policy_equals_n_step_bootstrapped_returns():
    """pi = mu (log_rhos = 0), no clipping, lambda 1: v_s is the n-step return bootstrapped at
    the end of the unroll, and the advantage is that return minus V(x_s)."""
    _, discounts, rewards, values, bootstrap = random_inputs((10, 4), seed=3)
    got = call(
        (np.zeros_like(rewards), discounts, rewards, values, bootstrap),
        rho_bar=None,
        c_bar=None,
        pg_bar=None,
        lam=1.0,
    )
    returns = n_step_returns(discounts, rewards, bootstrap)
    np.testing.assert_allclose(got.vs.numpy(), returns, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.pg_advantages.numpy(), returns - values, rtol=1e-12, atol=1e-12)


def test_on_policy_with_default_clipping_is_unchanged():
    """Ratios of exactly 1 are untouched by thresholds >= 1."""
    arrays = list(random_inputs((6, 3), seed=4))
    arrays[0] = np.zeros_like(arrays[0])
    clipped = call(arrays)
    unclipped = call(arrays, rho_bar=None, c_bar=None, pg_bar=None)
    torch.testing.assert_close(clipped.vs, unclipped.vs, rtol=0, atol=0)


def test_lambda_zero_is_the_one_step_target():
    """c_t = 0 cuts every trace: v_s = V(x_s) + rho_s (r_s + discount_s V(x_{s+1}) - V(x_s))."""
    log_rhos, discounts, rewards, values, bootstrap = arrays = random_inputs((7, 3), seed=5)
    got = call(arrays, rho_bar=1.0, lam=0.0)
    values_tp1 = np.concatenate([values[1:], bootstrap[None]])
    rho = np.minimum(1.0, np.exp(log_rhos))
    expected = values + rho * (rewards + discounts * values_tp1 - values)
    np.testing.assert_allclose(got.vs.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [0, 3, 8])
def test_episode_end_splits_the_unroll(k):
    """With discount 0 at step k, v_0..v_k do not depend on anything after k: the first segment
    computed alone (with any bootstrap, since it is multiplied by the zero discount) and the
    second computed alone with the real bootstrap join into the whole unroll's result."""
    T, B = 9, 3
    log_rhos, discounts, rewards, values, bootstrap = random_inputs(
        (T, B), seed=11 + k, episode_ends=False
    )
    discounts[k] = 0.0
    options = {"rho_bar": 1.0, "c_bar": 0.8, "pg_bar": 1.0, "lam": 0.95}
    whole = call((log_rhos, discounts, rewards, values, bootstrap), **options)
    head = slice(0, k + 1)
    first = call(
        (log_rhos[head], discounts[head], rewards[head], values[head], np.full(B, 1234.5)),
        **options,
    )
    parts_vs, parts_pg = [first.vs], [first.pg_advantages]
    if k + 1 < T:
        tail = slice(k + 1, T)
        second = call(
            (log_rhos[tail], discounts[tail], rewards[tail], values[tail], bootstrap), **options
        )
        parts_vs.append(second.vs)
        parts_pg.append(second.pg_advantages)
    torch.testing.assert_close(whole.vs, torch.cat(parts_vs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.pg_advantages, torch.cat(parts_pg), rtol=1e-12, atol=1e-12)
    # and the first segment is blind to the rest of the unroll
    rewards_after = rewards.copy()
    rewards_after[k + 1 :] += 100.0
    changed = call((log_rhos, discounts, rewards_after, values, bootstrap), **options)
    torch.testing.assert_close(changed.vs[: k + 1], whole.vs[: k + 1], rtol=0, atol=0)


def test_extreme_ratios_stay_finite_when_clipped():
    log_rhos, discounts, rewards, values, bootstrap = random_inputs((5, 2), seed=6)
    log_rhos[0, 0], log_rhos[1, 1] = 200.0, -200.0  # exp overflows float32 / underflows
    got = call((log_rhos, discounts, rewards, values, bootstrap), torch.float32)
    assert torch.isfinite(got.vs).all() and torch.isfinite(got.pg_advantages).all()
    expected_vs, _ = oracle_nd(np.clip(log_rhos, -50, 50), discounts, rewards, values, bootstrap)
    np.testing.assert_allclose(got.vs.double().numpy(), expected_vs, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Gradient, dtype, device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_carry_no_gradient_and_keep_dtype(dtype):
    inputs = [t.requires_grad_() for t in to_torch(random_inputs((4, 2), seed=5), dtype)]
    got = vtrace.from_importance_weights(*inputs)
    for out in got:
        assert not out.requires_grad and out.grad_fn is None
        assert out.dtype == dtype


def test_inputs_are_not_modified():
    tensors = to_torch(random_inputs((5, 3), seed=8))
    copies = [t.clone() for t in tensors]
    vtrace.from_importance_weights(*tensors, lambda_=0.5)
    for t, c in zip(tensors, copies, strict=True):
        assert torch.equal(t, c)


# ---------------------------------------------------------------------------------------------
# from_logits and action_log_probs


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def pick(log_probs, actions):
    return np.take_along_axis(log_probs, actions[..., None], -1)[..., 0]


@pytest.mark.parametrize("action_dtype", [torch.int64, torch.int32, torch.uint8])
def test_from_logits_matches_importance_weights(action_dtype):
    T, B, A = 6, 3, 4
    rng = np.random.default_rng(2)
    behaviour = rng.normal(size=(T, B, A)) * 2
    target = rng.normal(size=(T, B, A)) * 2
    actions = rng.integers(0, A, size=(T, B))
    _, discounts, rewards, values, bootstrap = random_inputs((T, B), seed=9)
    b_lp = pick(np_log_softmax(behaviour), actions)
    t_lp = pick(np_log_softmax(target), actions)
    options = {
        "clip_rho_threshold": 2.0,
        "clip_c_threshold": 0.9,
        "clip_pg_rho_threshold": 1.5,
        "lambda_": 0.95,
    }

    target_t = torch.from_numpy(target).requires_grad_()
    values_t = torch.from_numpy(values).requires_grad_()
    got = vtrace.from_logits(
        torch.from_numpy(behaviour),
        target_t,
        torch.from_numpy(actions).to(action_dtype),
        torch.from_numpy(discounts),
        torch.from_numpy(rewards),
        values_t,
        torch.from_numpy(bootstrap),
        **options,
    )
    np.testing.assert_allclose(got.behaviour_action_log_probs.numpy(), b_lp, rtol=1e-12)
    np.testing.assert_allclose(got.target_action_log_probs.numpy(), t_lp, rtol=1e-12)
    np.testing.assert_allclose(got.log_rhos.numpy(), t_lp - b_lp, rtol=1e-10, atol=1e-12)
    reference = vtrace.from_importance_weights(
        *to_torch((t_lp - b_lp, discounts, rewards, values, bootstrap)), **options
    )
    torch.testing.assert_close(got.vs, reference.vs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.pg_advantages, reference.pg_advantages, rtol=1e-12, atol=1e-12)
    expected_vs, expected_pg = oracle_nd(
        t_lp - b_lp,
        discounts,
        rewards,
        values,
        bootstrap,
        rho_bar=2.0,
        c_bar=0.9,
        pg_bar=1.5,
        lam=0.95,
    )
    np.testing.assert_allclose(got.vs.numpy(), expected_vs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.pg_advantages.numpy(), expected_pg, rtol=1e-10, atol=1e-12)
    for name, out in got._asdict().items():
        assert not out.requires_grad, name
        assert out.shape == (T, B), name


def test_action_log_probs_keeps_gradient():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(4, 2, 3))).requires_grad_()
    actions = torch.from_numpy(rng.integers(0, 3, size=(4, 2)))
    log_pi = vtrace.action_log_probs(logits, actions)
    expected = pick(np_log_softmax(logits.detach().numpy()), actions.numpy())
    np.testing.assert_allclose(log_pi.detach().numpy(), expected, rtol=1e-12)
    assert log_pi.requires_grad
    log_pi.sum().backward()
    # d log softmax(z)_a / dz = onehot(a) - softmax(z)
    probs = np.exp(np_log_softmax(logits.detach().numpy()))
    onehot = np.eye(3)[actions.numpy()]
    np.testing.assert_allclose(logits.grad.numpy(), onehot - probs, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors

NAMES = ["log_rhos", "discounts", "rewards", "values", "bootstrap_value"]


def _kwargs(shape=(4, 3)):
    return dict(zip(NAMES, to_torch(random_inputs(shape, seed=1)), strict=True))


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(
            lambda a: {"values": a["values"][:-1]}, r"values shape \(3, 3\)", id="values-T"
        ),
        pytest.param(
            lambda a: {"rewards": a["rewards"][:, :2]}, r"rewards shape \(4, 2\)", id="rewards-B"
        ),
        pytest.param(
            lambda a: {"discounts": a["discounts"][..., None]},
            "discounts shape",
            id="discounts-rank",
        ),
        pytest.param(
            lambda a: {"bootstrap_value": a["bootstrap_value"][:1]},
            r"bootstrap_value shape \(1,\)",
            id="bootstrap-B",
        ),
        pytest.param(
            lambda a: {"bootstrap_value": a["values"]},
            "bootstrap_value shape",
            id="bootstrap-with-time",
        ),
        pytest.param(
            lambda a: {k: a[k][0] for k in NAMES[:4]} | {"bootstrap_value": torch.zeros(())},
            r"log_rhos must be at least \[T, B\]",
            id="rank-1",
        ),
        pytest.param(
            lambda a: {"rewards": a["rewards"].float()}, "rewards dtype", id="rewards-dtype"
        ),
        pytest.param(
            lambda a: {"bootstrap_value": a["bootstrap_value"].float()},
            "bootstrap_value dtype",
            id="bootstrap-dtype",
        ),
        pytest.param(
            lambda a: {"values": a["values"].to("meta")}, "values device", id="values-device"
        ),
        pytest.param(
            lambda a: {k: a[k].long() for k in NAMES},
            "log_rhos must be a floating",
            id="integer-inputs",
        ),
    ],
)
def test_input_errors_name_the_argument(change, message):
    args = _kwargs()
    with pytest.raises(ValueError, match=message):
        vtrace.from_importance_weights(**(args | change(args)))


@pytest.mark.parametrize(
    "name", ["clip_rho_threshold", "clip_c_threshold", "clip_pg_rho_threshold"]
)
@pytest.mark.parametrize(
    "value, error",
    [(-1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError), ("1", TypeError)],
)
def test_bad_threshold_raises(name, value, error):
    with pytest.raises(error, match=name):
        vtrace.from_importance_weights(**_kwargs(), **{name: value})


@pytest.mark.parametrize(
    "value, error",
    [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), (None, TypeError)],
)
def test_bad_lambda_raises(value, error):
    with pytest.raises(error, match="lambda_"):
        vtrace.from_importance_weights(**_kwargs(), lambda_=value)


def _logits_args(T=4, B=3, A=5):
    rng = np.random.default_rng(0)
    return dict(
        behaviour_policy_logits=torch.from_numpy(rng.normal(size=(T, B, A))),
        target_policy_logits=torch.from_numpy(rng.normal(size=(T, B, A))),
        actions=torch.from_numpy(rng.integers(0, A, size=(T, B))),
        **dict(zip(NAMES[1:], to_torch(random_inputs((T, B), seed=2)[1:]), strict=True)),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(
            lambda a: {"behaviour_policy_logits": a["behaviour_policy_logits"][..., :4]},
            r"behaviour_policy_logits shape \(4, 3, 4\)",
            id="logits-A",
        ),
        pytest.param(
            lambda a: {"behaviour_policy_logits": a["behaviour_policy_logits"].float()},
            "behaviour_policy_logits dtype",
            id="logits-dtype",
        ),
        pytest.param(
            lambda a: {"target_policy_logits": a["target_policy_logits"][0]},
            r"target_policy_logits must be \[T, B, A\]",
            id="logits-rank",
        ),
        pytest.param(
            lambda a: {"actions": a["actions"][:, :2]},
            r"actions shape \(4, 2\)",
            id="actions-shape",
        ),
        pytest.param(
            lambda a: {"actions": a["actions"].double()},
            "actions must be an integer",
            id="actions-dtype",
        ),
        pytest.param(
            lambda a: {"rewards": a["rewards"][:3]}, r"rewards shape \(3, 3\)", id="rewards-shape"
        ),
        pytest.param(lambda a: {"values": a["values"].float()}, "values dtype", id="values-dtype"),
        pytest.param(
            lambda a: {"bootstrap_value": a["bootstrap_value"][:2]},
            "bootstrap_value shape",
            id="bootstrap-shape",
        ),
        pytest.param(lambda a: {"lambda_": 2.0}, "lambda_", id="lambda"),
        pytest.param(lambda a: {"clip_c_threshold": -1.0}, "clip_c_threshold", id="threshold"),
    ],
)
def test_from_logits_errors_name_the_argument(change, message):
    args = _logits_args()
    with pytest.raises(ValueError, match=message):
        vtrace.from_logits(**(args | change(args)))


def test_action_log_probs_shape_error():
    with pytest.raises(ValueError, match="actions shape"):
        vtrace.action_log_probs(torch.zeros(3, 2, 4), torch.zeros(3, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_oracle_and_cpu(dtype):
    arrays = random_inputs((12, 64), seed=4)
    cpu = call(arrays, dtype, lam=0.9, rho_bar=1.2)
    gpu = vtrace.from_importance_weights(
        *[t.cuda() for t in to_torch(arrays, dtype)], lambda_=0.9, clip_rho_threshold=1.2
    )
    assert gpu.vs.device.type == "cuda" and gpu.vs.dtype == dtype
    torch.testing.assert_close(gpu.vs.cpu(), cpu.vs)
    torch.testing.assert_close(gpu.pg_advantages.cpu(), cpu.pg_advantages)
    expected_vs, _ = oracle_nd(*arrays, lam=0.9, rho_bar=1.2)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(gpu.vs.double().cpu().numpy(), expected_vs, rtol=tol, atol=tol)
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(12, 64, 3))).to(dtype).cuda()
    actions = torch.from_numpy(rng.integers(0, 3, size=(12, 64))).cuda()
    out = vtrace.from_logits(
        logits, logits.flip(-1), actions, *[t.cuda() for t in to_torch(arrays[1:], dtype)]
    )
    assert out.vs.device.type == "cuda"
