"""The CPU fast paths against the computations they replace: the sigmoid-form tanh against
float64 tanh, the explorers' numpy policy against the torch network, bf16 explorers against
fp32 ones, the learner's flat gradients
against zero_grad + clip_grad_norm_; the learner process's malloc settings against the page
faults they avoid."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import threadpoolctl
import torch

from impala.agent import Explorer, ParameterStore, rollout_spec
from impala.agent.buffer import allocate, numpy_views, slots_to_batch
from impala.agent.factory import build_model, explorer_bf16
from impala.agent.learner import FlatGradients, bf16_is_fast
from impala.config import resolve
from impala.distributions import ActionSpec
from impala.envs import make_vector_env, probe_env
from impala.nets import MLPNet, mlp
from impala.nets.mlp import Tanh
from impala.runtime.common import build_learner


@pytest.mark.parametrize("sigmoid_form", [True, False], ids=["sigmoid-form", "torch-tanh"])
def test_tanh_and_its_gradient_against_float64_tanh(monkeypatch, sigmoid_form):
    """Either form `Tanh` may take on a CPU (see `sigmoid_form_is_faster`)."""
    monkeypatch.setattr(mlp, "_SIGMOID_FORM", sigmoid_form)
    x = torch.cat([torch.randn(20000) * 4, torch.linspace(-30, 30, 6001), torch.tensor([0.0])])
    exact = torch.tanh(x.double())
    x = x.requires_grad_()
    y = Tanh()(x)
    assert y.dtype == torch.float32
    assert (y.double() - exact).abs().max() < 2.5e-7
    upstream = torch.rand(len(x)) + 0.5
    (y * upstream).sum().backward()
    # 1 - y^2 from a float32 y: within a few float32 steps of the exact derivative
    assert (x.grad.double() - (1 - exact**2) * upstream.double()).abs().max() < 1e-6
    with torch.no_grad():  # the inference path computes the same
        assert torch.equal(Tanh()(x), y.detach())
    assert torch.autograd.gradcheck(Tanh(), torch.randn(30, dtype=torch.float64).requires_grad_())


def test_the_tanh_form_is_chosen_once_per_process(monkeypatch):
    monkeypatch.setattr(mlp, "_SIGMOID_FORM", None)
    threads = torch.get_num_threads()
    choice = mlp.sigmoid_form_is_faster()
    assert isinstance(choice, bool) and mlp._SIGMOID_FORM is choice
    assert torch.get_num_threads() == threads  # measured on one thread, then as it was
    monkeypatch.setattr(mlp, "_SIGMOID_FORM", not choice)
    assert mlp.sigmoid_form_is_faster() is (not choice)  # not measured again


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(obs_norm=True),
        dict(shared=True, num_layers=3),
        dict(action=ActionSpec("multi_discrete", (3, 2))),
        dict(popart_beta=0.1),
        dict(popart_beta=0.1, num_tasks=3),
    ],
    ids=["mlp", "obs-norm", "shared-3-layers", "multi-discrete", "popart", "popart-3-tasks"],
)
def test_numpy_net_equals_the_network_and_follows_its_weights(options):
    torch.manual_seed(0)
    options = dict(options)
    action = options.pop("action", 2)
    model = MLPNet(6, action, num_hidden=32, **options)
    if model.obs_norm is not None:
        model.obs_norm.update(torch.randn(500, 6, dtype=torch.float64) * 7 + 3)
    if options.get("popart_beta"):
        for _ in range(3):  # statistics away from (0, 1)
            model.value_head.update(
                torch.randn(20, 3) * 40 + 25, torch.arange(3) % model.value_head.num_tasks
            )
    net = model.numpy_net()
    assert net is not None
    obs = np.random.default_rng(0).normal(size=(16, 6)) * 5  # float64, as some envs give

    def check(reference):
        with torch.no_grad():
            logits, values = reference(torch.from_numpy(obs))
        got_logits, got_values = net.policy_logits(obs), net.values(obs)
        assert got_logits.dtype == np.float32 and got_logits.shape == logits.shape
        assert got_values.shape == values.shape
        np.testing.assert_allclose(got_logits, logits.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_values, values.numpy(), rtol=1e-5, atol=1e-5)

    check(model)
    # New weights copied in place, as explorers receive them, are what the views see.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    store = ParameterStore(*ParameterStore.allocate(other))
    store.publish(other)
    store.load_into(model, have_version=0)
    check(other)


def test_no_numpy_net_for_a_gaussian_head_or_weights_off_float32():
    assert MLPNet(3, ActionSpec("box", low=(-1.0,), high=(1.0,))).numpy_net() is None
    assert MLPNet(3, 2).double().numpy_net() is None


def test_explorer_acts_with_the_numpy_policy_on_one_blas_thread():
    torch.manual_seed(1)
    threadpoolctl.threadpool_limits(2, user_api="blas")  # as a new process has it
    model = MLPNet(4, 2, num_hidden=16)
    store = ParameterStore(*ParameterStore.allocate(model))
    vec = make_vector_env("CartPole-v1", 4)
    explorer = Explorer(0, vec, model, store, unroll_length=6, gamma=0.99, seed=2)
    assert explorer._numpy is not None
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas)
    storage = allocate(rollout_spec(probe_env("CartPole-v1"), 6, 4), 1)
    out = numpy_views(storage, 0)
    explorer.fill(out)
    vec.close()
    with torch.no_grad():  # the learner's view of the same unroll: the torch network
        logits = model.policy_logits(torch.from_numpy(out["obs"][:6].reshape(24, 4)))
    np.testing.assert_allclose(out["behaviour_logits"].reshape(24, 2), logits.numpy(), atol=1e-6)


def _cartpole_learner_and_batch(**settings):
    cfg = resolve({"env": "CartPole-v1", "envs_per_explorer": 8, "batch_size": 8, **settings})
    env = probe_env(cfg.env)
    learner = build_learner(cfg, env)
    model = copy.deepcopy(learner.model)
    vec = make_vector_env(cfg.env, 8)
    explorer = Explorer(0, vec, model, learner.store, unroll_length=cfg.unroll_length, gamma=0.99)
    storage = allocate(rollout_spec(env, cfg.unroll_length, 8), 1)
    explorer.fill(numpy_views(storage, 0))
    vec.close()
    return cfg, env, learner, slots_to_batch(storage, [0], cfg.algo)


@pytest.mark.parametrize("grad_clip", [0.05, 1e6, None])
def test_flat_gradients_update_as_zero_grad_and_clip_grad_norm_do(grad_clip):
    torch.manual_seed(0)
    cfg, env, flat, batch = _cartpole_learner_and_batch(grad_clip=grad_clip)
    reference = build_learner(cfg, env)
    reference.model.load_state_dict(flat.model.state_dict())
    reference.grads = None  # the per-parameter path: zero_grad(set_to_none) + clip_grad_norm_
    assert flat.grads is not None
    for _ in range(3):
        got, want = flat.update(batch), reference.update(batch)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    for a, b in zip(flat.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if grad_clip == 0.05:  # the clip did bind (1e6 does not: no scaling up)
        assert want["grad_norm"] > grad_clip


def test_flat_gradients_take_back_gradients_a_hook_replaced():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    grads = FlatGradients.of(params)
    assert grads is not None
    (params[0].sum() * 2 + (params[1] ** 2).sum()).backward()
    params[1].grad = params[1].grad.clone() * 10  # a hook that assigns new gradients
    want = torch.cat([torch.full((6,), 2.0), params[1].detach() * 20])
    norm = grads.clip_norm(float("inf"))
    assert float(norm) == pytest.approx(float(want.norm()), rel=1e-6)
    torch.testing.assert_close(grads.flat, want)
    assert params[1].grad.data_ptr() == grads.views[1].data_ptr()
    norm = grads.clip_norm(1.0)
    assert float(grads.flat.norm()) == pytest.approx(1.0, rel=1e-5)
    assert FlatGradients.of([torch.nn.Parameter(torch.zeros(1), requires_grad=False)]) is None


_UPDATE_LIKE = """
import resource, sys, torch
from impala.runtime.common import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
first = torch.ones(30 << 20, dtype=torch.uint8)  # by default glibc then serves up to 30 MiB
del first  # from its heap, and trims the heap when more than 60 MiB at its top is free
def update():  # an update's large tensors, allocated and freed
    kept = [torch.ones(25 << 20, dtype=torch.uint8) for _ in range(3)]
    del kept
update()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    update()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_learner_process_keeps_freed_memory_instead_of_faulting_it_back_in():
    """By default glibc gives large freed blocks back and every update takes them again as
    fresh pages: this script's updates took 19,168 page faults each in most runs (1,280 in
    some, as glibc's heap happened to lie), a Pong learner 42,000 a second. Kept, none."""

    def faults(mode):
        run = subprocess.run(
            [sys.executable, "-c", _UPDATE_LIKE, mode], capture_output=True, text=True, check=True
        )
        return float(run.stdout)

    assert faults("keep") < 5_000  # where 75 MiB of fresh 4-KiB pages would be 19,200


def _minatar_unroll(bf16: bool, core: str = "ff"):
    """One 8-step unroll of 4 MinAtar Breakout games by an explorer with a fixed network."""
    cfg = resolve({"env": "MinAtar/Breakout-v1", "core": core, "envs_per_explorer": 4})
    env = probe_env(cfg.env)
    torch.manual_seed(0)
    model = build_model(cfg, env)
    model.requires_grad_(False)
    store = ParameterStore(*ParameterStore.allocate(model))
    store.publish(model)
    vec = make_vector_env(cfg.env, 4)
    explorer = Explorer(0, vec, model, store, unroll_length=8, gamma=0.99, seed=3, bf16=bf16)
    out = numpy_views(allocate(rollout_spec(env, 8, 4, cfg.recurrent_state_size), 1), 0)
    explorer.fill(out)
    vec.close()
    return out


@pytest.mark.parametrize("core", ["ff", "lstm"])
def test_bf16_explorers_record_the_bf16_networks_policy(core):
    """`--explorer-precision bf16`: the recorded behaviour policy is the bf16 network's, float32
    and close to fp32's (the same games and samples here: MinAtar is deterministic under a seed,
    and logits this close pick the same actions), but not equal, so autocast was on."""
    fp32, bf16 = _minatar_unroll(False, core), _minatar_unroll(True, core)
    assert bf16["behaviour_logits"].dtype == np.float32
    np.testing.assert_array_equal(bf16["obs"][0], fp32["obs"][0])
    np.testing.assert_allclose(bf16["behaviour_logits"], fp32["behaviour_logits"], atol=0.05)
    assert not np.array_equal(bf16["behaviour_logits"], fp32["behaviour_logits"])


def test_explorer_precision_resolves_per_network_and_cpu():
    """'auto' takes bf16 for conv nets where the CPU has native bf16, never for the MLPs that act
    in numpy (whatever is asked); 'auto' is the default."""
    conv = resolve({"env": "MinAtar/Breakout-v1"})
    conv_model = build_model(conv, probe_env(conv.env))
    mlp = resolve({"env": "CartPole-v1", "explorer_precision": "bf16"})
    assert conv.explorer_precision == "auto"
    assert explorer_bf16(conv, conv_model) == bf16_is_fast(torch.device("cpu"))
    fp32 = dataclasses.replace(conv, explorer_precision="fp32")
    assert not explorer_bf16(fp32, conv_model)
    assert explorer_bf16(dataclasses.replace(conv, explorer_precision="bf16"), conv_model)
    assert not explorer_bf16(mlp, build_model(mlp, probe_env(mlp.env)))
