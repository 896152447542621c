"""The paper's workloads run the way users run them: Pong on the single-machine runtime (explorer
processes, shared-memory slots), the LSTM core on every runtime's path, the learner on a GPU."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from conftest import hang_guard, train_cli

from impala.agent import Learner, ParameterStore
from impala.agent.factory import build_model
from impala.config import resolve
from impala.envs import probe_env


def _train(tmp_path, *args):
    _, err, run_dir, records = train_cli(tmp_path, *args)
    assert err == "", err  # no warnings, no emulator banner
    return run_dir, records


def test_a_few_hundred_updates_on_pong_with_finite_losses(tmp_path, record_property):
    """Small batches (4 sequences of 5 steps) so that 300 updates take seconds on 2 cores."""
    start = time.monotonic()
    run_dir, records = _train(
        tmp_path,
        "--env", "PongNoFrameskip-v4",
        "--num-explorers", "1",
        "--envs-per-explorer", "4",
        "--batch-size", "4",
        "--unroll-length", "5",
        "--total-steps", "6000",
        "--log-interval", "1",
    )  # fmt: skip
    # A step budget: only train_cli's subprocess timeout (240 s) is a time limit.
    hang_guard(time.monotonic() - start, 240, "training seconds", record_property)
    last = records[-1]
    assert last["updates"] >= 290, last
    for record in records:
        for key in ("loss", "policy_loss", "baseline_loss", "entropy_loss", "grad_norm"):
            if key in record:
                assert math.isfinite(record[key]), (key, record)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["net"] == "shallow" and config["optimizer"] == "rmsprop-tf"
    assert config["atari_protocol"]["frame_skip"] == 4
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("runtime", ["local"])
def test_lstm_agent_trains_on_the_memory_task_and_evaluates(tmp_path, runtime, record_property):
    start = time.monotonic()
    run_dir, records = _train(
        tmp_path,
        "--env", "CartPoleNoVelocity-v1",
        "--core", "lstm",
        "--runtime", runtime,
        "--total-steps", "20000",
        "--log-interval", "1",
    )  # fmt: skip
    # Step and episode budgets: only the subprocess timeouts (240 s, 120 s) are time limits.
    hang_guard(time.monotonic() - start, 240, "training seconds", record_property)
    # The last record may fall in an interval without an update (a busy machine): it has no loss.
    learned = [record for record in records if "loss" in record]
    assert records[-1]["updates"] >= 20 and learned, records[-3:]
    assert all(math.isfinite(record["loss"]) for record in learned)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "impala.cli", "eval", str(run_dir), "--episodes", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    hang_guard(time.monotonic() - start, 120, "eval seconds", record_property)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("5 episodes of CartPoleNoVelocity-v1 (actions sampled from pi)"), line
    mean = float(line.split("return mean ")[1].split()[0])
    assert 8 <= mean <= 500, line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("core", ["ff", "lstm"])
def test_learner_on_cuda_matches_the_cpu_update(core):
    """The same batch and weights: one update on the GPU and one on the CPU agree."""
    cfg = resolve(dict(env="MinAtar/Breakout-v1", core=core, precision="fp32", batch_size=32))
    env = probe_env(cfg.env)
    torch.manual_seed(0)
    cpu_model = build_model(cfg, env)
    gpu_model = build_model(cfg, env)
    gpu_model.load_state_dict(cpu_model.state_dict())
    T, B = cfg.unroll_length, 4
    g = torch.Generator().manual_seed(0)
    batch = {
        "obs": torch.randint(0, 2, (T + 1, B, *env.obs_shape), generator=g, dtype=torch.uint8),
        "action": torch.randint(env.num_actions, (T, B), generator=g),
        "behaviour_logits": torch.randn(T, B, env.num_actions, generator=g),
        "reward": torch.randn(T, B, generator=g),
        "discount": torch.full((T, B), 0.99),
        "truncation_value": torch.zeros(T, B),
        "policy_version": torch.zeros(T, B, dtype=torch.int64),
        "prev_action": torch.randint(env.num_actions, (T + 1, B), generator=g),
        "prev_reward": torch.randn(T + 1, B, generator=g),
        "first": torch.zeros(T + 1, B, dtype=torch.bool),
        "core_h": torch.zeros(B, cfg.core_size),
        "core_c": torch.zeros(B, cfg.core_size),
    }
    results = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        c = resolve(dict(env="MinAtar/Breakout-v1", core=core, precision="fp32", device=device))
        learner = Learner(c, model, ParameterStore(*ParameterStore.allocate(model)))
        metrics = learner.update(dict(batch))
        assert next(learner.model.parameters()).device.type == device
        results.append((metrics["loss"], learner.store.flat.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
