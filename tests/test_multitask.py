"""Multi-task runs (`--env A,B,C`) and PopArt per task (Hessel et al. 2019): per-task statistics
against a float64 oracle with every output preserved, the learner's per-sequence normalisation,
tasks spread over explorers with padded frames, returns reported per task."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from impala import losses
from impala.agent import rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.agent.factory import build_explorer, build_model, settle
from impala.agent.params import ParameterStore
from impala.cli import main
from impala.config import resolve
from impala.envs import probe_env
from impala.errors import ConfigError
from impala.nets.popart import PopArt
from impala.runtime.common import build_learner
from impala.training import train

TASKS = "MinAtar/Breakout-v0,MinAtar/Freeway-v0,MinAtar/Asterix-v0"


def test_per_task_statistics_follow_their_own_targets_and_preserve_every_output():
    torch.manual_seed(0)
    popart = PopArt(6, beta=0.2, num_tasks=3).double()
    features = torch.randn(40, 6, dtype=torch.float64)
    before = popart(features)
    assert before.shape == (40, 3)
    mu, nu = np.zeros(3), np.ones(3)
    rng = np.random.default_rng(0)
    for scale in (1.0, 500.0, 0.01):
        task = torch.tensor([0, 2, 0, 2, 0])  # task 1 has no sequence in these batches
        targets = torch.from_numpy(rng.normal(size=(4, 5)) * scale + scale * task.numpy())
        popart.update(targets, task)
        t = targets.numpy()
        for k in (0, 2):  # the oracle: each task's moments from its own columns only
            mine = t[:, task.numpy() == k]
            mu[k] = 0.8 * mu[k] + 0.2 * mine.mean()
            nu[k] = 0.8 * nu[k] + 0.2 * (mine**2).mean()
        np.testing.assert_allclose(popart.mu.numpy(), mu, rtol=1e-12)
        np.testing.assert_allclose(popart.var.numpy(), nu - mu**2, rtol=1e-9)
        np.testing.assert_allclose(popart.sigma.numpy(), np.sqrt(nu - mu**2), rtol=1e-9)
        torch.testing.assert_close(popart(features), before, rtol=1e-12, atol=1e-9)
    assert (popart.mu[1].item(), popart.var[1].item()) == (0.0, 1.0)  # untouched
    with pytest.raises(ValueError, match="need targets"):
        popart.update(torch.zeros(4, 5))


def _multitask(**settings):
    cfg = resolve(
        {
            "env": TASKS,
            "num_explorers": 3,
            "envs_per_explorer": 2,
            "unroll_length": 6,
            "value_norm": "popart",
            "popart_beta": 0.5,
            "precision": "fp32",  # exact comparisons below (bf16 autocast is the conv default)
            **settings,
        }
    )
    env = probe_env(cfg.env, **cfg.env_options)
    return settle(cfg, env), env


def test_tasks_share_one_network_with_padded_frames_and_a_value_per_task():
    cfg, env = _multitask()
    assert env.tasks == tuple(TASKS.split(",")) and env.num_tasks == 3
    assert env.obs_shape == (7, 10, 10)  # Freeway's 7 planes; Breakout's 4 padded with zeros
    assert env.action.num_actions == 6  # the full action set of the -v0 ids
    store = ParameterStore(*ParameterStore.allocate(build_model(cfg, env)))
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    storage = allocate(spec, 3)
    for index in range(3):
        explorer = build_explorer(cfg, env, index, store)
        assert explorer.task == index
        info = explorer.fill(numpy_views(storage, index))
        assert info.task == index
        explorer.vec_env.close()
    batch = slots_to_batch(storage, [0, 1, 2], "vtrace")
    assert batch["task"].tolist() == [0, 0, 1, 1, 2, 2]
    breakout = batch["obs"][:, :2]
    assert breakout[:, :, 4:].sum() == 0 and breakout[:, :, :4].sum() > 0  # padded planes
    model = build_model(cfg, env)
    assert model(batch["obs"][0].float())[1].shape == (6, 3)


def test_the_learner_normalises_each_sequence_by_its_own_tasks_statistics(monkeypatch):
    cfg, env = _multitask()
    learner = build_learner(cfg, env)
    popart = learner.popart
    with torch.no_grad():
        popart.mu.copy_(torch.tensor([0.0, 100.0, -50.0]))
        popart.var.copy_(torch.tensor([1.0, 400.0, 25.0]))  # sigma 1, 20, 5
    store = learner.store
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    storage = allocate(spec, 3)
    for index in range(3):
        explorer = build_explorer(cfg, env, index, store)
        explorer.fill(numpy_views(storage, index))
        explorer.vec_env.close()
    batch = slots_to_batch(storage, [0, 1, 2], "vtrace")
    with torch.no_grad():
        _, values = learner._forward(batch)  # each column's own task's value
        every = learner.model(batch["obs"].flatten(0, 1))[1].view(7, 6, 3)
    for b, k in enumerate(batch["task"].tolist()):
        torch.testing.assert_close(values[:, b], every[:, b, k])
    seen = {}
    real = losses.actor_critic_loss

    def spy(logits, values, actions, targets, **kwargs):
        seen.update(values=values, vs=targets.vs)
        return real(logits, values, actions, targets, **kwargs)

    monkeypatch.setattr(losses, "actor_critic_loss", spy)
    learner.update(batch)
    # The baseline loss saw each sequence normalised by its own task's mu and sigma.
    mu = torch.tensor([0.0, 100.0, -50.0])[batch["task"]]
    sigma = torch.tensor([1.0, 20.0, 5.0])[batch["task"]]
    torch.testing.assert_close(seen["values"], (values[:-1] - mu) / sigma)
    torch.testing.assert_close(seen["vs"], (learner.value_targets - mu) / sigma)
    # The statistics moved per task, each towards its own sequences' targets.
    targets = learner.value_targets
    sigma_before = torch.tensor([1.0, 20.0, 5.0])
    for k in range(3):
        mine = targets[:, batch["task"] == k]
        expected_mu = 0.5 * torch.tensor([0.0, 100.0, -50.0])[k] + 0.5 * mine.mean()
        assert popart.mu[k].item() == pytest.approx(expected_mu.item(), rel=1e-4, abs=1e-4)
    assert not torch.allclose(popart.sigma, sigma_before)


def test_a_multitask_run_reports_returns_per_task(tmp_path):
    cfg, _ = _multitask(
        runtime="serial",
        total_steps=6_000,
        run_dir=str(tmp_path / "run"),
        log_interval=0.0,
        tensorboard=False,
        progress="lines",
        max_steps_per_episode=40,  # Freeway's episodes are 2,500 steps otherwise
    )
    out = io.StringIO()
    result = train(cfg, out=out)
    assert set(result.task_returns) == set(TASKS.split(","))
    assert all(math.isfinite(v) for v in result.task_returns.values())
    assert "Breakout-v0" in out.getvalue().splitlines()[-1]
    import json

    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {f"return_mean/{t}" for t in TASKS.split(",")} <= set(last)
    assert {"popart_sigma_task0", "popart_sigma_task2"} <= set(last)
    # Its per-task PopArt statistics in a one-task run (resumed with another --env): one line.
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(
            ["train", "--resume", cfg.run_dir, "--env", "MinAtar/Breakout-v0", "--override"]
        )
    assert code == 2
    assert "value outputs (and PopArt statistics, if any) for 3 task(s)" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1


def test_a_multitask_lstm_keeps_each_sequences_task():
    cfg, env = _multitask(core="lstm", core_size=16)
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
    assert spec["task"] == ((2,), torch.int64) and "core_h" in spec
    learner = build_learner(cfg, env)
    storage = allocate(spec, 3)
    for index in range(3):
        explorer = build_explorer(cfg, env, index, learner.store)
        explorer.fill(numpy_views(storage, index))
        explorer.vec_env.close()
    batch = slots_to_batch(storage, [0, 1, 2], "vtrace")
    assert batch["task"].tolist() == [0, 0, 1, 1, 2, 2]
    metrics = learner.update(batch)
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_explorers": 2}, "a multi-task run of 3 tasks needs at least as many explorers"),
        ({"env": "MinAtar/Breakout-v0,MinAtar/Breakout-v0"}, "--env names a task twice"),
        ({"algo": "reinforce"}, "a multi-task run needs --algo vtrace"),
    ],
)
def test_bad_multitask_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve({"env": TASKS, "num_explorers": 3, **settings})


def test_tasks_that_cannot_share_a_network_are_one_line():
    with pytest.raises(ConfigError, match="must share an action space.*Discrete.3.*Discrete.5"):
        probe_env("MinAtar/Breakout-v1,MinAtar/Asterix-v1")
    with pytest.raises(ConfigError, match="observations of one shape"):
        probe_env("Acrobot-v1,MountainCar-v0")
