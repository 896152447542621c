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
from impala.nets.popart import PopArt
from impala.runtime.common import build_learner
from impala.train import train


def test_update_preserves_every_output_and_tracks_the_targets_moments():
    torch.manual_seed(0)
    popart = PopArt(8, beta=0.1).double()
    popart.mu.fill_(3.0)
    popart.nu.fill_(3.0**2 + 2.0**2)  # sigma 2
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
        assert float(popart.nu) == pytest.approx(nu, rel=1e-12)
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
        popart.nu.fill_(5.0**2 + 3.0**2)  # sigma 3
    batch = _batch(cfg, env, learner, scale=10.0)
    terms, _ = learner._vtrace_loss(batch, learner.cfg.entropy_cost)
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
