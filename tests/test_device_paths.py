"""Every path that moves tensors to the learner's device, run against a stand-in GPU on this
CPU machine (`device_standin.StandInCuda`): the learner believes it has CUDA, its tensors stay in
host memory, and what CUDA refuses fails here: `.pin_memory()` of a tensor already on the device
(the crash of `--loss appo --appo-passes 4`, every continuous-action env's preset, at its first
update), an operation on device and host tensors together (a missing `.to()`), `.numpy()` of a
device tensor, and, stricter than CUDA, a non-blocking copy back into pageable memory and a
`torch.save` of device tensors (a file that loads only where CUDA is).

Why a stand-in and not PyTorch's `meta` device: meta tensors have no values, and an update reads
values (the loss's finiteness check, the metrics, PopArt's and obs-norm's statistics), so the
learner could not run to the end of one; the stand-in runs the same arithmetic on the CPU, so a
learner "on the GPU" must also agree with one on the CPU. Why not a flag in the code: the code
under test is the code users run, with its `device.type == "cuda"` branches taken. The module
docstring of `device_standin` says how it works and what it leaves out (asynchrony, autocast).

The paths: the update; APPO's passes and their buffer of device batches; the minibatch split and
replay mixing (host-side stages before the move); PopArt and obs-norm statistics (Pendulum's
preset has both); an LSTM core's states; the learner's checkpoint state and its restore across
devices; `impala train --device cuda`, its checkpoints and model.pt read back on the CPU by
`impala eval` and by a resume with `--device cpu`, and a CPU run resumed on the GPU;
`impala.load_policy(..., device="cuda")` acting as on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import metrics, run_main
from device_standin import StandInCuda

import impala
from impala import bench as bench_mod
from impala import checkpoint
from impala.agent.buffer import allocate, rollout_spec, stacked_to_batch
from impala.agent.factory import build_explorer, build_model, settle
from impala.agent.learner import Learner
from impala.agent.params import ParameterStore
from impala.config import resolve
from impala.devices import gpu_utilization
from impala.envs import probe_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class RealCuda:
    """The machine's own GPU (the `cuda`-marked variants, `make device-check`): nothing counted."""

    copies = pinned_copies = pins = None

    def __enter__(self) -> RealCuda:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


KINDS = [
    "stand-in",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def gpu_context(kind: str) -> StandInCuda | RealCuda:
    return StandInCuda() if kind == "stand-in" else RealCuda()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def gpu(kind):
    """The GPU the test runs on: the stand-in, and where there is one the real one."""
    with gpu_context(kind) as device:
        yield device


@pytest.fixture
def standin():
    """The stand-in GPU alone (what only it can show: its refusals, NVML's reading stood in)."""
    with StandInCuda() as device:
        yield device


def on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda"


def make_learner(env_id: str, **settings) -> tuple[Learner, object]:
    """A learner for `env_id`'s preset with `settings`, seeded; and the env's description."""
    cfg = resolve({"env": env_id, **settings})
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env)
    torch.manual_seed(0)
    model = build_model(cfg, env)
    return Learner(cfg, model, ParameterStore(*ParameterStore.allocate(model))), env


def unroll_batch(learner: Learner, env, seed: int = 0) -> dict[str, torch.Tensor]:
    """One explorer unroll of the learner's config, acted by its current weights, as the batch
    the runtimes hand the learner (host tensors)."""
    cfg = learner.cfg
    explorer = build_explorer(cfg, env, seed, learner.store)
    try:
        spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer, cfg.recurrent_state_size)
        scratch = {k: v[0].numpy() for k, v in allocate(spec, 1).items()}
        explorer.fill(scratch)
    finally:
        explorer.vec_env.close()
    stacked = {k: torch.from_numpy(v[None].copy()) for k, v in scratch.items()}
    return stacked_to_batch(stacked, cfg.algo)


def device_tensors(module: torch.nn.Module) -> bool:
    return all(on_gpu(t) for t in [*module.parameters(), *module.buffers()])


def test_appo_passes_move_each_batch_to_the_device_once(gpu):
    """Pendulum's preset (APPO, 4 passes, PopArt, obs-norm): the first batch makes its four
    updates on the device, crossing from pinned host memory once; the passes' buffer holds it
    on the device; the statistics move and stay there. The review's crash: the passes moved the
    batch, then each update pinned it again."""
    learner, env = make_learner("Pendulum-v1", device="cuda")
    assert learner.cfg.appo_passes == 4 and learner.popart is not None and learner.obs_norm
    batch = unroll_batch(learner, env)
    copies, pinned = gpu.copies, gpu.pinned_copies
    results = learner.learn(batch)
    assert len(results) == 4 and all(math.isfinite(m["loss"]) for m in results)
    if gpu.copies is not None:  # every field once, from pinned memory
        assert gpu.copies - copies == gpu.pinned_copies - pinned == len(batch)
    assert all(on_gpu(v) for b in learner.passes.recent for v in b.values())
    assert device_tensors(learner.model) and device_tensors(learner.target)
    T1, B = batch["obs"].shape[:2]
    assert float(learner.obs_norm.count) == 4 * T1 * B  # each pass's observations counted
    assert results[-1]["popart_sigma"] != 1.0  # PopArt's statistics moved, on the device


def test_the_device_update_is_the_cpu_update(gpu):
    """The same batch and weights: an update on the (stand-in) GPU and one on the CPU agree, and
    the weights the learner publishes to the explorers (host memory) are the device's."""
    results = []
    for device in ("cuda", "cpu"):
        learner, env = make_learner("Pendulum-v1", device=device)
        batch = unroll_batch(learner, env)
        out = learner.learn(batch)
        results.append(([m["loss"] for m in out], learner.store.flat.clone()))
        assert not on_gpu(learner.store.flat)
    (gpu_losses, gpu_flat), (cpu_losses, cpu_flat) = results
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    torch.testing.assert_close(gpu_flat, cpu_flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        dict(loss="impala", envs_per_explorer=16, batch_size=4),  # minibatch split
        dict(loss="impala", replay_fraction=0.5, replay_size=64),  # replay mixing
        dict(loss="appo", appo_passes=3, replay_fraction=0.5, max_policy_lag=5),  # all stages
    ],
    ids=["split", "replay", "appo-replay-lag"],
)
def test_host_stages_then_one_move(gpu, settings):
    """The batch pipeline's host-side stages (lag filter, minibatch split, replay mixing) run
    before the move: each update's batch crosses once (a replayed sequence too: the replay is
    kept in host memory), and an APPO pass over a kept batch crosses no more."""
    learner, env = make_learner("CartPole-v1", device="cuda", **settings)
    for seed in range(2):  # the second batch finds the replay filled
        batch = unroll_batch(learner, env, seed)
        copies = gpu.copies
        results = learner.learn(batch)
        assert results and all(math.isfinite(m["loss"]) for m in results)
        passes = learner.cfg.appo_passes if learner.cfg.loss == "appo" else 1
        if gpu.copies is not None:
            assert gpu.copies - copies == len(results) // passes * len(batch)
    if learner.replay is not None:
        assert not any(on_gpu(v) for v in learner.replay.storage.values())


def test_an_lstm_learner_takes_its_states_on_the_device(gpu):
    """An LSTM core's unroll states (`core_h`, `core_c`) and inputs cross with the batch; the
    update runs on the device."""
    learner, env = make_learner("CartPole-v1", device="cuda", core="lstm", loss="appo")
    batch = unroll_batch(learner, env)
    assert {"core_h", "core_c", "prev_action", "first"} <= set(batch)
    results = learner.learn(batch)
    assert results and all(math.isfinite(m["loss"]) for m in results)
    assert device_tensors(learner.model)


def test_learner_state_crosses_devices_both_ways(gpu):
    """What a checkpoint keeps of a device learner is in host memory (it saves and loads on a
    machine without a GPU); a device learner restores a CPU learner's state (APPO's kept batches
    go back to the device) and the other way round, and both learn on."""
    gpu_learner, env = make_learner("Pendulum-v1", device="cuda")
    gpu_learner.learn(unroll_batch(gpu_learner, env))
    state = gpu_learner.state()
    flat = [v for v in _tensors(state)]
    assert flat and not any(on_gpu(v) for v in flat)
    cpu_learner, _ = make_learner("Pendulum-v1", device="cpu")
    cpu_learner.restore(state)
    torch.testing.assert_close(cpu_learner.store.flat, gpu_learner.store.flat)
    assert cpu_learner.learn(unroll_batch(cpu_learner, env, 1))
    back, _ = make_learner("Pendulum-v1", device="cuda")
    back.restore(cpu_learner.state())
    assert all(on_gpu(v) for b in back.passes.recent for v in b.values())
    assert device_tensors(back.model) and back.learn(unroll_batch(back, env, 2))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_train_eval_and_resume_across_devices(kind, capsys, tmp_path):
    """`impala train --env Pendulum-v1 --device cuda` (the review's command, on the serial
    runtime here) learns, writes checkpoints and model.pt that load without a GPU; `impala eval`
    plays them on the CPU; the run resumes on the CPU (`--device cpu`) and a CPU run resumes on
    the GPU."""
    gpu_run, cpu_run = tmp_path / "gpu", tmp_path / "cpu"
    common = ["--env", "Pendulum-v1", "--runtime", "serial", "--checkpoint-interval", "1"]
    with gpu_context(kind) as gpu:
        code, _, err = run_main(
            capsys, "train", *common, "--device", "cuda", "--total-steps", "480", "--run-dir",
            str(gpu_run),
        )  # fmt: skip
    assert code == 0, err[-2000:]
    assert gpu.pinned_copies is None or gpu.pinned_copies > 0  # the learner was on the device
    records = [r for r in metrics(gpu_run) if "loss" in r]
    assert records and records[-1]["updates"] >= 8 and math.isfinite(records[-1]["loss"])
    # Outside the stand-in, a machine without a GPU: even a plain torch.load reads the files.
    assert torch.load(gpu_run / "model.pt", weights_only=True)
    assert torch.load(checkpoint.listed(gpu_run)[-1], weights_only=True)["model"]
    code, out, err = run_main(capsys, "eval", str(gpu_run), "--episodes", "1")
    assert code == 0 and "1 episodes of Pendulum-v1" in out, err
    code, _, err = run_main(
        capsys, "train", "--resume", str(gpu_run), "--device", "cpu", "--total-steps", "640"
    )
    assert code == 0, err[-2000:]
    assert metrics(gpu_run)[-1]["steps"] >= 640
    code, _, err = run_main(
        capsys, "train", *common, "--total-steps", "320", "--run-dir", str(cpu_run)
    )
    assert code == 0, err[-2000:]
    with gpu_context(kind) as gpu:
        code, _, err = run_main(
            capsys, "train", "--resume", str(cpu_run), "--device", "cuda", "--total-steps", "480"
        )
    assert code == 0, err[-2000:]
    assert gpu.pinned_copies is None or gpu.pinned_copies > 0
    assert metrics(cpu_run)[-1]["steps"] >= 480


@pytest.mark.parametrize("core", ["ff", "lstm"])
def test_a_policy_on_the_device_acts_as_on_the_cpu(gpu, tmp_path, core):
    """`impala.load_policy(RUN, device="cuda")`: observations go to the device, actions come
    back as arrays equal to the CPU policy's; an LSTM's state stays on the device."""
    learner, _ = make_learner("CartPole-v1", device="cpu", core=core)
    state = {
        "config": dataclasses.asdict(learner.cfg),
        "record": {},
        "model": learner.model.state_dict(),
        "counters": {"steps": 100, "updates": 0},
    }
    path = checkpoint.save(state, tmp_path / "run", keep=1)
    cpu, dev = impala.load_policy(path), impala.load_policy(path, device="cuda")
    assert dev.device.type == "cuda" and device_tensors(dev.model)
    observations = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    cpu_state = dev_state = None
    for _ in range(3):
        a, cpu_state = cpu.act(observations, cpu_state, greedy=True, reward=1.0)
        b, dev_state = dev.act(observations, dev_state, greedy=True, reward=1.0)
        assert isinstance(b, np.ndarray) and np.array_equal(a, b)
    if core == "lstm":
        assert on_gpu(dev_state.h) and on_gpu(dev_state.c)


# --- the stand-in itself: what it refuses ------------------------------------------------------


def test_the_stand_in_refuses_what_cuda_refuses(standin, tmp_path):
    """Each refusal the tests above rely on, so that a stand-in that stopped refusing is seen."""
    host = torch.ones(3)
    device = host.to("cuda")
    assert on_gpu(device) and device.device == torch.device("cuda", 0) and device.is_cuda
    assert host.pin_memory().is_pinned() and not host.is_pinned()
    with pytest.raises(RuntimeError, match="only dense CPU tensors can be pinned"):
        device.pin_memory()
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        device + host
    assert float((device + torch.tensor(2.0)).sum()) == 9.0  # host scalars are taken
    with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
        device.numpy()
    with pytest.raises(RuntimeError, match="non-blocking copy from the device"):
        device.to("cpu", non_blocking=True)
    with pytest.raises(RuntimeError, match="torch.save of a device tensor"):
        torch.save({"w": device}, tmp_path / "w.pt")
    assert not on_gpu(device.cpu()) and device.cpu().tolist() == [1.0, 1.0, 1.0]
    layer = torch.nn.Linear(3, 2).to("cuda")
    layer(device).sum().backward()
    assert on_gpu(layer.weight.grad)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        layer(host)


# --- impala bench: the learner's updates and its GPU -------------------------------------------


def test_bench_reports_the_learners_updates_and_gpu_utilisation(
    standin, monkeypatch, capsys, tmp_path
):
    """`impala bench --device cuda` prints and records the learner's updates per second beside
    the ratio, and the GPU's utilisation (here NVML's reading stood in by a constant)."""
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 40.0)
    monkeypatch.setattr(bench_mod, "MEMORY_SAMPLE_SECONDS", 0.25)
    code, out, err = run_main(
        capsys, "bench", "--env", "CartPole-v1", "--device", "cuda", "--runtime", "serial",
        "--num-explorers", "1", "--seconds", "2", "--warmup", "1", "--ceiling-seconds", "1",
        "--run-dir", str(tmp_path / "bench"),
    )  # fmt: skip
    assert code == 0, err[-2000:]
    figures = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert figures["learner_device"] == "cuda" and figures["learner_updates_per_s"] > 0
    assert figures["gpu_utilization_percent"] == 40.0
    assert "learner updates" in out and "/s on cuda" in out and "40% (mean of" in out
    assert standin.pinned_copies > 0


def test_gpu_utilisation_is_not_applicable_without_a_gpu(monkeypatch):
    """On the CPU, or where NVML cannot be read, no figure and no error: the line says why."""
    assert gpu_utilization(torch.device("cpu")) is None
    assert "n/a (the learner is on the CPU)" in bench_mod._gpu_line(torch.device("cpu"), [])
    with StandInCuda():

        def no_nvml(device=None):
            raise ModuleNotFoundError("No module named 'pynvml'")

        monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
        assert gpu_utilization(torch.device("cuda")) is None
    assert "nvidia-ml-py" in bench_mod._gpu_line(torch.device("cuda"), [])


def test_window_rates_are_steps_and_updates_per_second_after_the_warmup():
    records = [
        {"time": 0.5, "steps": 100, "updates": 1},
        {"time": 1.0, "steps": 400, "updates": 4},
        {"time": 3.0, "steps": 1400, "updates": 14},
    ]
    assert bench_mod.window_rates(records, warmup=1.0) == (500.0, 5.0)
    assert bench_mod.window_rates(records, warmup=2.0) is None
