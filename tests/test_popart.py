"""PopArt (`--value-norm popart`): the statistics against a float64 oracle, outputs preserved
exactly across an update, the learner's normalised losses, and explorers seeing the learner's
unnormalised values."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from impala import vtrace
from impala.agent import Explorer, rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.agent.factory import build_model, settle
from impala.config import resolve
from impala.envs import make_vector_env, probe_env
from impala.errors import ConfigError
from impala.nets.heads import value_outputs
from impala.nets.mlp import MLPNet
from impala.nets.popart import PopArt
from impala.runtime.common import build_learner
from impala.training import train


def test_update_preserves_every_output_and_tracks_the_targets_moments():
    torch.manual_seed(0)
    popart = PopArt(8, beta=0.1).double()
    popart.mu.fill_(3.0)
    popart.var.fill_(2.0**2)  # sigma 2
    features = torch.randn(64, 8, dtype=torch.float64)
    before = popart(features)
    mu, nu = 3.0, 13.0
    for scale in (1.0, 1000.0, 0.01):  # targets of very different sizes, one after the other
        targets = torch.randn(5, 7, dtype=torch.float64) * scale + scale
        popart.update(targets)
        # The oracle: the moments' moving averages, from the formula.
        t = targets.numpy()
        mu = 0.9 * mu + 0.1 * t.mean()
        nu = 0.9 * nu + 0.1 * (t**2).mean()
        assert float(popart.mu) == pytest.approx(mu, rel=1e-12)
        assert float(popart.var) == pytest.approx(nu - mu**2, rel=1e-12)
        assert float(popart.sigma) == pytest.approx(math.sqrt(nu - mu**2), rel=1e-12)
        after = popart(features)
        torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-9)
    # In float32, as trained, to float tolerance.
    popart32 = PopArt(8, beta=3e-4)
    x = torch.randn(32, 8)
    out = popart32(x)
    for _ in range(100):
        popart32.update(torch.randn(32) * 500 + 200)
    torch.testing.assert_close(popart32(x), out, rtol=1e-4, atol=1e-3)


def _popart_cartpole(**settings):
    cfg = resolve({"env": "CartPole-v1", "value_norm": "popart", "popart_beta": 0.5, **settings})
    env = probe_env(cfg.env, **cfg.env_options)
    return settle(cfg, env), env


def _batch(cfg, env, learner, scale: float):
    """One unroll of explorer 0 with rewards multiplied by `scale`."""
    model = build_model(cfg, env)
    vec_env = make_vector_env(cfg.env, cfg.envs_per_explorer)
    explorer = Explorer(0, vec_env, model, learner.store, unroll_length=8, gamma=cfg.gamma)
    spec = rollout_spec(env, 8, cfg.envs_per_explorer)
    storage = allocate(spec, 1)
    explorer.fill(numpy_views(storage, 0))
    vec_env.close()
    batch = slots_to_batch(storage, [0], cfg.algo)
    batch["reward"] = batch["reward"] * scale
    return batch


def test_learner_losses_are_normalised_by_the_statistics():
    cfg, env = _popart_cartpole(envs_per_explorer=4, batch_size=4)
    learner = build_learner(cfg, env)
    popart = learner.popart
    assert popart is not None
    with torch.no_grad():
        popart.mu.fill_(5.0)
        popart.var.fill_(3.0**2)  # sigma 3
    batch = _batch(cfg, env, learner, scale=10.0)
    terms = learner._loss(batch, learner.cfg.entropy_cost).terms
    # The oracle, from the unnormalised values the network outputs and the V-trace formula.
    with torch.no_grad():
        logits, values = learner.model(batch["obs"].flatten(0, 1))
        T1, B = batch["obs"].shape[:2]
        logits, values = logits.view(T1, B, -1), values.view(T1, B)
        returns = vtrace.from_logits(
            behaviour_policy_logits=batch["behaviour_logits"],
            target_policy_logits=logits[:-1],
            actions=batch["action"],
            discounts=batch["discount"],
            rewards=batch["reward"] + cfg.gamma * batch["truncation_value"],
            values=values[:-1],
            bootstrap_value=values[-1],
        )
        log_pi = torch.log_softmax(logits[:-1], -1).gather(-1, batch["action"][..., None])[..., 0]
    n = returns.vs.numel() if cfg.loss_reduction == "mean" else 1
    baseline = 0.5 * (((returns.vs - values[:-1]) / 3.0) ** 2).sum() / n
    policy = -(log_pi * returns.pg_advantages / 3.0).sum() / n
    torch.testing.assert_close(terms["baseline_loss"], baseline, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["policy_loss"], policy, rtol=1e-5, atol=1e-6)


def test_update_moves_the_statistics_and_explorers_see_the_same_values():
    cfg, env = _popart_cartpole(envs_per_explorer=4, batch_size=4)
    learner = build_learner(cfg, env)
    batch = _batch(cfg, env, learner, scale=1000.0)
    metrics = learner.update(batch)
    assert metrics["popart_mu"] > 100 and metrics["popart_sigma"] > 10  # big rewards, big targets
    # mu and nu travel in the parameter store with the weights: an explorer's copy of the
    # network gives the learner's unnormalised values.
    copy = build_model(cfg, env)
    learner.store.load_into(copy, -1)
    obs = batch["obs"].flatten(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(copy(obs)[1], learner.model(obs)[1])


def test_a_popart_run_trains_and_reports_its_statistics(tmp_path):
    settings = dict(env="CartPole-v1", runtime="serial", total_steps=6000, log_interval=0.0)
    cfg = resolve({**settings, "value_norm": "popart", "run_dir": str(tmp_path / "r")})
    result = train(cfg, out=io.StringIO())
    assert np.isfinite(result.last_metrics["loss"]) and result.last_metrics["popart_sigma"] > 1


@pytest.mark.parametrize(
    "settings",
    [
        {"value_norm": "popart", "algo": "reinforce", "env": "CartPole-v1"},
        {"value_norm": "popart"},  # the corridor's seed network has no value head to normalise
        {"popart_beta": 0.0},
    ],
)
def test_popart_bad_settings_are_one_line(settings):
    with pytest.raises(ConfigError):
        cfg = resolve(settings)
        settle(cfg, probe_env(cfg.env, **cfg.env_options))


def _ema_oracle(batches, tasks, betas, num_tasks):
    """The statistics' moving averages from the formula, in float64 with numpy: each task's first
    and second moments of its own columns' targets; sigma = sqrt(nu - mu^2)."""
    mu, nu = np.zeros(num_tasks), np.ones(num_tasks)
    for targets, task, beta in zip(batches, tasks, betas, strict=True):
        t = targets.double().numpy()
        for k in range(num_tasks):
            mine = t[:, task == k]
            mu[k] = (1 - beta) * mu[k] + beta * mine.mean()
            nu[k] = (1 - beta) * nu[k] + beta * (mine**2).mean()
    return mu, np.sqrt(nu - mu**2)


@pytest.mark.parametrize(
    ("means", "updates", "rtol"),
    [
        # rtol: mu is stored in float32 (resolution 2.4e-4 at 3,000, 7.8e-3 at 1e5) and the
        # variance's updates take their deviations from it: 1e-6 and 1e-4 measured.
        ((3000.0,), 1, 1e-6),
        ((3000.0,), 300, 1e-5),
        ((1e5,), 300, 5e-4),
        ((3000.0, 1e5), 300, 5e-4),  # two tasks, each its own statistics
    ],
)
def test_sigma_keeps_its_digits_where_the_returns_dwarf_their_spread(means, updates, rtol):
    """Targets of mean 3,000 (1e5) and std 1: sigma in float32 as the learner keeps it (the
    second moment's form gave 1e-4, its floor, and advantages divided by it) against the float64
    oracle of the moving averages. The first update has beta 1 (the batch's own statistics), the
    others 0.1."""
    torch.manual_seed(0)
    num_tasks = len(means)
    popart = PopArt(4, beta=1.0, num_tasks=num_tasks)
    features = torch.randn(16, 4)
    task = torch.arange(6) % num_tasks  # [B]
    centre = torch.tensor(means, dtype=torch.float64)[task]
    batches, betas = [], []
    for i in range(updates):
        targets = (torch.randn(20, 6, dtype=torch.float64) + centre).float()  # [T, B], std 1
        if i == 0:
            popart.update(targets, task if num_tasks > 1 else None)
            before = popart(features).double()
            popart.beta = 0.1
        else:
            popart.update(targets, task if num_tasks > 1 else None)
        batches.append(targets)
        betas.append(1.0 if i == 0 else 0.1)
    mu, sigma = _ema_oracle(batches, [task.numpy()] * updates, betas, num_tasks)
    assert popart.mu.dtype == popart.sigma.dtype == torch.float32  # as the parameter store holds
    np.testing.assert_allclose(popart.sigma.numpy(), sigma, rtol=rtol)
    np.testing.assert_allclose(popart.mu.detach().numpy(), mu, rtol=1e-7)
    assert (sigma > 0.9).all() and (sigma < 1.2).all()  # the oracle itself saw std 1
    # and every output stays what it was across the updates, to float32's resolution at mu (the
    # outputs were ~1 when mu was 0: sigma n(x) + mu cancels ~1e5 in float32 in forward)
    ulp = float(np.spacing(np.float32(max(means))))
    torch.testing.assert_close(popart(features).double(), before, rtol=0, atol=16 * ulp)


def test_a_state_dict_with_the_second_moment_loads_with_every_output_the_same():
    """Checkpoints written before the variance was kept hold `mu` and the second moment `nu`:
    they load (strictly) into `var = nu - mu^2` in float64, the value layer rescaled so that each
    output is the one the earlier code gave: task 0 ordinary (sigma 2), task 1 where float32 had
    cancelled every digit (sigma at its floor 1e-4; float64 of the stored moments says 0.64)."""
    torch.manual_seed(0)
    net = MLPNet(5, 3, popart_beta=0.1, num_tasks=2)
    mu = torch.tensor([2.0, 3000.1])
    nu = torch.stack([torch.tensor(8.0), mu[1] ** 2])  # float32: nu - mu^2 = 4 and 0
    old = {k: v.clone() for k, v in net.state_dict().items() if k != "value_head.var"}
    old["value_head.mu"], old["value_head.nu"] = mu.clone(), nu.clone()
    kept = {k: v.clone() for k, v in old.items()}
    assert value_outputs(old) == 2

    fresh = MLPNet(5, 3, popart_beta=0.1, num_tasks=2)
    fresh.load_state_dict(old)  # strict: no key missing or left over
    for key, tensor in kept.items():  # the caller's state dict is left as it was
        torch.testing.assert_close(old[key], tensor, rtol=0, atol=0)
    # The oracle, from the formulas: the earlier sigma in float32 (floored at 1e-4) and the
    # variance of the stored moments in float64.
    mu32, nu32 = mu.numpy(), nu.numpy()
    sigma_then = np.sqrt(np.maximum(nu32 - mu32 * mu32, np.float32(1e-8))).astype(np.float64)
    var = np.maximum(nu32.astype(np.float64) - mu32.astype(np.float64) ** 2, 0.0)
    assert sigma_then[1] == pytest.approx(1e-4) and var[1] == pytest.approx(0.404, abs=1e-3)
    np.testing.assert_allclose(fresh.value_head.var.detach().numpy(), var, rtol=1e-7)
    np.testing.assert_allclose(fresh.value_head.sigma.numpy(), np.sqrt(var), rtol=1e-6)
    features = torch.randn(32, 64)
    weight = old["value_head.linear.weight"].double().numpy()
    bias = old["value_head.linear.bias"].double().numpy()
    expected = (features.double().numpy() @ weight.T + bias) * sigma_then + mu32
    with torch.no_grad():
        got = fresh.value_head(features).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    # Everything else loaded as it was.
    new = fresh.state_dict()
    rescaled = {"value_head.nu", "value_head.linear.weight", "value_head.linear.bias"}
    for key in kept.keys() - rescaled:
        torch.testing.assert_close(new[key], kept[key], rtol=0, atol=0)
    # A new state dict round-trips untouched.
    again = MLPNet(5, 3, popart_beta=0.1, num_tasks=2)
    again.load_state_dict(new)
    for key, tensor in again.state_dict().items():
        torch.testing.assert_close(tensor, new[key], rtol=0, atol=0)
