"""The learner's step, checked where a review found the suite blind: the truncation bootstrap in
the rewards, the learning-rate decay, the policy-lag boundary, a run that goes non-finite, and a
Gaussian policy's log-std bound kept by projection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import env_with_tests_on_path, run_cli
from test_appo import cartpole_batch, make_learner

from impala.agent.learner import NonFiniteUpdate
from impala.nets.heads import LOG_STD_MIN


def _on_policy(learner, batch):
    """`batch` with its behaviour logits those of the learner's own policy (pi = mu: every
    importance weight 1, so V-trace's targets are the n-step returns)."""
    with torch.no_grad():
        logits, _ = learner._forward(batch)
    return {**batch, "behaviour_logits": logits[:-1].clone()}


def test_a_truncated_episode_bootstraps_from_its_own_last_value():
    """The learner's targets take r + gamma * V(x_last) where an episode was truncated (the
    explorer recorded V(x_last) as `truncation_value`, and the discount there is 0): only the
    explorer's half of this was tested, and a learner dropping it was let through."""
    learner = make_learner(loss="impala", entropy_cost=0.0)
    gamma = learner.cfg.gamma
    rng = np.random.default_rng(3)
    batch = cartpole_batch(rng, T_=6, B_=3)
    batch["discount"][2, 0] = 0.0  # episode of column 0 truncated at t = 2 ...
    batch["truncation_value"][2, 0] = 7.5  # ... from a last observation worth 7.5
    batch["discount"][4, 2] = 0.0
    batch["truncation_value"][4, 2] = -3.0
    batch = _on_policy(learner, batch)
    out = learner._loss(batch, 0.0)
    # The oracle, in float64: on-policy, V-trace's targets are the n-step returns
    # v_t = r_t + gamma tv_t + d_t v_{t+1}, from V(x_T) at the end.
    with torch.no_grad():
        _, values = learner._forward(batch)
    values = values.double().numpy()
    r = batch["reward"].double().numpy() + gamma * batch["truncation_value"].double().numpy()
    d = batch["discount"].double().numpy()
    vs = np.zeros_like(r)
    following = values[-1]
    for t in reversed(range(len(r))):
        vs[t] = r[t] + d[t] * following
        following = vs[t]
    baseline = 0.5 * ((vs - values[:-1]) ** 2).mean()  # CartPole's preset: mean reduction
    assert out.terms["baseline_loss"].item() == pytest.approx(baseline, rel=1e-5)
    assert out.terms["mean_rho"].item() == pytest.approx(1.0, rel=1e-6)


def test_the_learning_rate_decays_linearly_to_zero_over_the_run():
    """The rate at `steps` env steps is lr0 * (1 - steps / total), in the optimizer too (the
    only check was lr <= lr0, which a constant rate passes)."""
    learner = make_learner(loss="impala")
    lr0, total = learner.cfg.learning_rate, learner.total_steps
    batch = cartpole_batch(np.random.default_rng(0))
    for steps in (0, total // 4, total // 2, total - 1, total, 2 * total):
        metrics = learner.update(batch, steps)
        expected = lr0 * max(0.0, 1.0 - steps / total)
        assert metrics["learning_rate"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert learner.optimizer.param_groups[0]["lr"] == metrics["learning_rate"]


def test_the_policy_lag_limit_keeps_a_sequence_exactly_at_the_limit(monkeypatch):
    """--max-policy-lag N keeps sequences N versions behind and drops those N + 1 behind."""
    learner = make_learner(loss="impala", max_policy_lag=3)
    learner.store.assign(10, learner.store.flat.clone())
    seen = []
    monkeypatch.setattr(learner, "update", lambda batch, steps=0: seen.append(batch) or {})
    batch = cartpole_batch(np.random.default_rng(1), B_=4)
    batch["policy_version"] = torch.tensor([7, 6, 10, 8]).expand(5, 4).clone()  # lags 3, 4, 0, 2
    batch["obs"][0, :, 0] = torch.arange(4.0)  # tags the columns
    learner.learn(batch)
    assert seen[0]["obs"][0, :, 0].tolist() == [0.0, 2.0, 3.0]
    assert learner.stale_sequences == 1


def test_a_non_finite_loss_stops_before_the_step_with_the_last_finite_model():
    learner = make_learner(loss="impala")
    batch = cartpole_batch(np.random.default_rng(0))
    learner.update(batch)
    before = [p.detach().clone() for p in learner.model.parameters()]
    version = learner.store.version
    batch["reward"][1, 2] = float("nan")
    with pytest.raises(NonFiniteUpdate) as info:
        learner.update(batch)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("update 2 went non-finite: the loss is nan")
    assert "baseline_loss nan" in message and "the model of update 1" not in message
    assert "that of update 1, the last finite one" in message
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))
    assert learner.store.version == version and learner.updates == 1


def test_a_non_finite_gradient_names_where_it_is():
    learner = make_learner(loss="impala")
    weight = learner.model.policy_head.weight
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(NonFiniteUpdate, match=r"update 1 went non-finite: the gradient's norm is"):
        learner.update(cartpole_batch(np.random.default_rng(0)))
    try:
        learner.update(cartpole_batch(np.random.default_rng(0)))
    except NonFiniteUpdate as exc:
        assert "policy_head.weight" in str(exc)


def test_a_run_whose_rewards_go_nan_ends_in_one_line_with_a_finite_model(tmp_path):
    """A diverged run used to 'train' on for hours. Rewards that turn NaN (a broken reward)
    make the loss NaN: the run ends there, exit 1, one line naming the update, and the model
    and checkpoint it leaves are those of the last finite update."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        "--env",
        "envs_for_tests:NanRewardAfter-v0",
        "--runtime",
        "serial",
        "--total-steps",
        "20000",
        "--run-dir",
        str(run_dir),
        env=env_with_tests_on_path(),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "went non-finite: the loss is nan" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    model = torch.load(run_dir / "model.pt")
    assert all(torch.isfinite(t).all() for t in model.values())
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1:]
    saved = torch.load(checkpoint, weights_only=False)
    assert all(torch.equal(saved["model"][k], model[k]) for k in model)
    update = int(lines[0].split("update ")[1].split()[0])
    assert saved["counters"]["learner_updates"] == update - 1


def test_the_sampler_refuses_a_policy_that_is_not_finite():
    from impala.distributions import ActionSpec, sample

    rng = np.random.default_rng(0)
    logits = np.zeros((4, 3))
    logits[2, 1] = np.nan
    with pytest.raises(ValueError, match="not finite .* for 1 of 4 environments"):
        sample(ActionSpec.discrete(3), logits, rng)
    assert sample(ActionSpec.discrete(3), np.zeros((4, 3)), rng).shape == (4,)


def test_the_learner_keeps_a_gaussian_log_std_within_its_bounds_by_projection():
    """A step that carries the log-std past its floor is projected back onto it after the step,
    where the old clamp in the forward pass pinned it (and zeroed its gradient) for good."""
    learner = make_learner(env="Pendulum-v1", loss="impala")
    log_std = learner.model.policy_head.log_std
    with torch.no_grad():
        log_std.fill_(LOG_STD_MIN - 2.0)  # as a step past the floor left it
    rng = np.random.default_rng(0)
    T_, B_ = 5, 4
    batch = {
        "obs": torch.tensor(rng.normal(size=(T_ + 1, B_, 3)), dtype=torch.float32),
        "action": torch.tensor(rng.normal(size=(T_, B_, 1)), dtype=torch.float32),
        "behaviour_logits": torch.zeros(T_, B_, 2),
        "reward": torch.tensor(rng.normal(size=(T_, B_)), dtype=torch.float32),
        "discount": torch.full((T_, B_), 0.99),
        "truncation_value": torch.zeros(T_, B_),
        "policy_version": torch.zeros(T_, B_, dtype=torch.int64),
    }
    learner.update(_on_policy(learner, batch))
    assert math.isclose(log_std.min().item(), LOG_STD_MIN) or log_std.min().item() > LOG_STD_MIN
    assert log_std.grad is not None and log_std.grad.abs().sum() > 0  # a gradient it can follow
