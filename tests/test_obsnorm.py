"""Observation normalisation (`--obs-norm`): the running statistics against a float64 oracle
(numpy's mean and variance of everything seen), the inputs the network gets, the learner updating
them, explorers acting on the learner's statistics, and the bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impala.agent import Explorer, rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.agent.factory import build_model, settle
from impala.config import resolve
from impala.envs import make_vector_env, probe_env
from impala.errors import ConfigError
from impala.nets.obsnorm import EPS, ObsNorm
from impala.runtime.common import build_learner


def test_statistics_are_those_of_every_observation_seen():
    rng = np.random.default_rng(0)
    norm = ObsNorm(3)
    seen = []
    # Batches of different sizes and very different scales per dimension (MountainCar-like).
    for size, scale in ((7, 1.0), (1, 100.0), (50, 0.01), (13, 5.0)):
        batch = rng.normal(size=(size, 3)) * np.array([scale, 0.07, 1200.0]) + np.array([3, -1, 0])
        norm.update(torch.as_tensor(batch, dtype=torch.float32))
        seen.append(batch.astype(np.float32).astype(np.float64))
        data = np.concatenate(seen)
        np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-4, atol=1e-9)
        assert float(norm.count) == len(data)
    obs = rng.normal(size=(5, 3)) * np.array([20.0, 0.07, 1200.0])
    expected = np.clip((obs - data.mean(0)) / np.sqrt(data.var(0) + EPS), -5.0, 5.0)
    out = norm(torch.as_tensor(obs, dtype=torch.float32))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
    # Far outliers are clipped to +-5.
    assert float(norm(torch.full((1, 3), 1e9)).max()) == 5.0


def test_a_new_normaliser_passes_observations_through_and_takes_no_gradient():
    norm = ObsNorm(4)
    x = torch.randn(6, 4)
    torch.testing.assert_close(norm(x), x.clamp(-5, 5), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in norm.parameters())


def _mountain_car(**settings):
    cfg = resolve({"env": "MountainCar-v0", "obs_norm": "on", "envs_per_explorer": 4, **settings})
    env = probe_env(cfg.env, **cfg.env_options)
    return settle(cfg, env), env


def _unroll(cfg, env, learner):
    model = build_model(cfg, env)
    vec_env = make_vector_env(cfg.env, cfg.envs_per_explorer)
    explorer = Explorer(0, vec_env, model, learner.store, unroll_length=8, gamma=cfg.gamma)
    core_size = cfg.core_size if cfg.core == "lstm" else None
    storage = allocate(rollout_spec(env, 8, cfg.envs_per_explorer, core_size), 1)
    explorer.fill(numpy_views(storage, 0))
    vec_env.close()
    return slots_to_batch(storage, [0], cfg.algo)


@pytest.mark.parametrize("core", ["ff", "lstm"])
def test_the_learner_updates_the_statistics_and_explorers_act_on_them(core):
    cfg, env = _mountain_car(core=core, buffer="fifo", batch_size=4)
    learner = build_learner(cfg, env)
    assert learner.obs_norm is not None
    batch = _unroll(cfg, env, learner)
    learner.update(batch)
    obs = batch["obs"].double().reshape(-1, 2).numpy()
    np.testing.assert_allclose(learner.obs_norm.mean.numpy(), obs.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(learner.obs_norm.var.numpy(), obs.var(0), rtol=1e-4, atol=1e-10)
    # The statistics travel with the weights: an explorer's copy standardises alike.
    copy = build_model(cfg, env)
    learner.store.load_into(copy, -1)
    norm = next(m for m in copy.modules() if isinstance(m, ObsNorm))
    torch.testing.assert_close(norm.mean, learner.obs_norm.mean)
    torch.testing.assert_close(norm.var, learner.obs_norm.var)


def test_auto_is_on_for_vectors_and_off_for_images():
    cfg, _ = _mountain_car(obs_norm="auto")
    assert cfg.obs_norm == "on"
    cfg = resolve({"env": "MinAtar/Breakout-v1", "obs_norm": "auto"})
    assert settle(cfg, probe_env(cfg.env)).obs_norm == "off"


@pytest.mark.parametrize(
    "settings",
    [
        {"env": "MinAtar/Breakout-v1", "obs_norm": "on"},  # images: no
        {"obs_norm": "on"},  # the corridor's seed network
        {"env": "CartPole-v1", "obs_norm": "yes"},
    ],
)
def test_obs_norm_bad_settings_are_one_line(settings):
    with pytest.raises(ConfigError):
        cfg = resolve(settings)
        settle(cfg, probe_env(cfg.env, **cfg.env_options))
