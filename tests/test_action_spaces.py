"""Action spaces beyond Discrete: a diagonal Gaussian for Box actions and independent categoricals
for MultiDiscrete ones (impala.distributions), checked against torch.distributions, and the whole
path (explorer, V-trace's joint ratios, learner) on real runs."""

import math

import envs_for_tests  # noqa: F401  (registers MatchDigits-v0, ReachPoint-v0)
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

from impala import distributions, losses, vtrace
from impala.agent import Learner, ParameterStore, rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.agent.factory import build_explorer, build_model
from impala.config import resolve
from impala.distributions import ActionSpec
from impala.envs import probe_env
from impala.training import train

BOX = ActionSpec("box", low=(-2.0, 0.0, -math.inf), high=(2.0, 1.0, math.inf))
MULTI = ActionSpec("multi_discrete", (3, 2, 4))
DISCRETE = ActionSpec.discrete(5)


def _reference(spec: ActionSpec, params: torch.Tensor):
    """The same policy as torch.distributions builds it."""
    if spec.kind == "box":
        mean, log_std = params.chunk(2, -1)
        return Independent(Normal(mean, log_std.exp()), 1)
    if spec.kind == "discrete":
        return Categorical(logits=params)
    return [Categorical(logits=p) for p in params.split(list(spec.nvec), -1)]


def _random(spec: ActionSpec, shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(*shape, spec.params_size, generator=g, dtype=torch.float64) * 2
    if spec.kind == "box":
        actions = torch.randn(*shape, spec.dim, generator=g, dtype=torch.float64) * 3
    else:
        actions = torch.stack([torch.randint(n, shape, generator=g) for n in spec.nvec], -1)
        if spec.kind == "discrete":
            actions = actions[..., 0]
    return params.requires_grad_(), actions


@pytest.mark.parametrize("spec", [DISCRETE, MULTI, BOX], ids=lambda s: s.kind)
def test_log_probs_and_entropies_equal_torch_distributions(spec):
    params, actions = _random(spec)
    ours_logp = distributions.log_prob(spec, params, actions)
    ours_entropy = distributions.entropy(spec, params)
    ref = _reference(spec, params)
    if isinstance(ref, list):  # independent components: the joint is the sum
        ref_logp = sum(d.log_prob(actions[..., i]) for i, d in enumerate(ref))
        ref_entropy = sum(d.entropy() for d in ref)
    else:
        ref_logp, ref_entropy = ref.log_prob(actions), ref.entropy()
    assert ours_logp.shape == ours_entropy.shape == (7, 5)
    torch.testing.assert_close(ours_logp, ref_logp)
    torch.testing.assert_close(ours_entropy, ref_entropy)
    # and their gradients with respect to the parameters
    ours = torch.autograd.grad((ours_logp + ours_entropy).sum(), params)[0]
    theirs = torch.autograd.grad((ref_logp + ref_entropy).sum(), params)[0]
    torch.testing.assert_close(ours, theirs)


def test_the_losses_take_the_joint_policy():
    """The policy-gradient and entropy terms of IMPALA's loss, and APPO's ratios, use the joint
    log-probabilities and the sum of the components' entropies."""
    params, actions = _random(MULTI)
    advantages = torch.randn(7, 5, dtype=torch.float64)
    pg = losses.policy_gradient_loss(params, actions, advantages, action_spec=MULTI)
    ref = _reference(MULTI, params)
    joint = sum(d.log_prob(actions[..., i]) for i, d in enumerate(ref))
    torch.testing.assert_close(pg, -(joint * advantages).sum())
    entropy = losses.entropy_loss(params, action_spec=MULTI)
    torch.testing.assert_close(entropy, -sum(d.entropy() for d in ref).sum())
    with pytest.raises(ValueError, match=r"actions shape \(7, 5\) must equal .* \(7, 5, 3\)"):
        losses.policy_gradient_loss(params, actions[..., 0], advantages, action_spec=MULTI)


def test_sampling_follows_the_distribution():
    rng = np.random.default_rng(0)
    n = 20000
    box_params = np.tile(np.array([[0.5, -1.0, 3.0, math.log(0.5), 0.0, math.log(2.0)]]), (n, 1))
    box = distributions.sample(BOX, box_params, rng)
    assert box.shape == (n, 3) and box.dtype == np.float32
    np.testing.assert_allclose(box.mean(0), [0.5, -1.0, 3.0], atol=0.05)
    np.testing.assert_allclose(box.std(0), [0.5, 1.0, 2.0], rtol=0.03)
    np.testing.assert_array_equal(distributions.mode(BOX, box_params[:2]), box_params[:2, :3])
    logits = np.log(np.array([0.2, 0.3, 0.5, 0.9, 0.1, 0.1, 0.2, 0.3, 0.4]))
    multi = distributions.sample(MULTI, np.tile(logits, (n, 1)), rng)
    assert multi.shape == (n, 3)
    for i, probs in enumerate([[0.2, 0.3, 0.5], [0.9, 0.1], [0.1, 0.2, 0.3, 0.4]]):
        freq = np.bincount(multi[:, i], minlength=len(probs)) / n
        np.testing.assert_allclose(freq, probs, atol=0.015)
    np.testing.assert_array_equal(distributions.mode(MULTI, logits[None]), [[2, 0, 3]])


def test_box_actions_are_scaled_to_the_bounds_and_clipped():
    u = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 5.0], [3.0, 2.0, -7.0]], np.float32)
    env = BOX.to_env(u)
    # [-2, 2]: centre 0, half range 2; [0, 1]: centre 0.5, half range 0.5; unbounded: as it is
    np.testing.assert_allclose(env, [[0.0, 0.5, 0.0], [2.0, 0.0, 5.0], [2.0, 1.0, -7.0]])
    np.testing.assert_allclose(BOX.from_env(env[:2]), u[:2])


def _one_unroll_batch(env_id, **overrides):
    cfg = resolve(dict(env=env_id, envs_per_explorer=4, unroll_length=6, **overrides))
    env = probe_env(cfg.env)
    torch.manual_seed(0)
    model = build_model(cfg, env)
    store = ParameterStore(*ParameterStore.allocate(model))
    learner = Learner(cfg, model, store)
    explorer = build_explorer(cfg, env, 0, store)
    storage = allocate(rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer), 2)
    for slot in range(2):
        explorer.fill(numpy_views(storage, slot))
    return learner, slots_to_batch(storage, [0, 1], "vtrace")


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "MatchDigits-v0"])
def test_vtrace_weights_are_joint_ratios(env_id, monkeypatch):
    """The learner's importance weights are pi(a|x)/mu(a|x) of the whole action: the product
    over components (the sum of their log-ratios), computed here with torch.distributions."""
    learner, batch = _one_unroll_batch(env_id, loss="impala", obs_norm="off")
    spec = learner.action_spec
    assert batch["action"].shape == (6, 8, spec.dim)
    learner.update(batch)  # pi moves away from mu
    with torch.no_grad():
        pi = learner._forward(batch)[0][:-1].double()
    seen = {}
    real = vtrace.from_importance_weights

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(vtrace, "from_importance_weights", spy)
    learner.update(batch)
    mu = batch["behaviour_logits"].double()
    actions = batch["action"]
    if spec.kind == "box":
        expected = _reference(spec, pi).log_prob(actions) - _reference(spec, mu).log_prob(actions)
    else:
        pis, mus = _reference(spec, pi), _reference(spec, mu)
        expected = sum(
            pis[i].log_prob(actions[..., i]) - mus[i].log_prob(actions[..., i])
            for i in range(spec.dim)
        )
    assert expected.abs().max() > 1e-3  # pi is not mu: the check is not trivial
    torch.testing.assert_close(seen["log_rhos"].double(), expected, atol=1e-4, rtol=1e-4)


def test_explorers_record_unclipped_gaussian_samples_and_send_clipped_actions():
    """ReachPoint-v0 asserts every action it gets is inside its box; the recorded actions are
    the policy's own samples in normalised units, some beyond [-1, 1] at a std of 1."""
    _, batch = _one_unroll_batch("ReachPoint-v0")
    assert batch["action"].dtype == torch.float32
    assert batch["action"].abs().max() > 1.0
    assert batch["behaviour_logits"].shape == (6, 8, 4)
    torch.testing.assert_close(batch["behaviour_logits"][..., 2:], torch.zeros(6, 8, 2))


@pytest.mark.parametrize("env_id, floor", [("MatchDigits-v0", 15.0), ("ReachPoint-v0", -23.0)])
def test_learns_multi_discrete_and_continuous_tasks(tmp_path, env_id, floor):
    """A uniform policy earns 6.7 on MatchDigits (the best 20); one that ignores the point
    earns about -27 on ReachPoint (the best 0). Serial runtime: the same result every time."""
    cfg = resolve(
        dict(
            env=env_id,
            runtime="serial",
            total_steps=60_000,
            loss="impala",
            buffer="fifo",
            batch_size=8,
            gamma=0.9,
            learning_rate=1e-3,
            value_norm="none",
            entropy_cost=0.0,
            run_dir=str(tmp_path / "run"),
            log_interval=1000.0,
            tensorboard=False,
        )
    )
    result = train(cfg)
    assert result.return_mean >= floor, result


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "MatchDigits-v0"])
def test_the_seeds_reinforce_takes_them_too(tmp_path, env_id):
    cfg = resolve(
        dict(
            env=env_id,
            algo="reinforce",
            runtime="serial",
            total_steps=3_000,
            max_steps_per_episode=50,
            run_dir=str(tmp_path / "run"),
            tensorboard=False,
        )
    )
    result = train(cfg)
    assert result.updates > 0 and math.isfinite(result.last_metrics["loss"])
