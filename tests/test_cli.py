"""The command line: bad input ends with one line and exit code 2, never a traceback."""

import subprocess
import sys

import pytest

from impala import config
from impala.cli import main
from impala.errors import ConfigError


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "impala.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "NoSuchEnv-v9"], "unknown environment id 'NoSuchEnv-v9'"),
        (["--env", "Pendulum-v1"], "Box action space"),
        (["--num-explorers", "0"], "--num-explorers must be a positive integer"),
        (["--unroll-length", "0"], "--unroll-length must be a positive integer"),
        (["-s", "-5"], "--steps-per-explorer must be a positive integer"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--num-explorers", "two"], "invalid int value: 'two'"),
        (["--algo", "ppo"], "invalid choice: 'ppo'"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, tmp_path):
    proc = run_cli("train", "--run-dir", str(tmp_path / "r"), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_seed_flags_map_to_config(monkeypatch):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg

    monkeypatch.setattr("impala.train.train", fake_train)
    code = main(
        [
            "train",
            "-s",
            "500",
            "-m",
            "50",
            "-b",
            "200",
            "--learn-batch-size",
            "16",
            "-f",
            "2",
            "--num-hidden",
            "7",
            "-g",
            "0.9",
            "-a",
            "0.01",
            "-t",
            "3",
            "--clip-rho-threshold",
            "none",
        ]
    )
    assert code == 0
    cfg = seen["cfg"]
    assert (cfg.steps_per_explorer, cfg.max_steps_per_episode, cfg.buffer_size) == (500, 50, 200)
    assert (cfg.learn_batch_size, cfg.upload_frequency, cfg.num_hidden) == (16, 2, 7)
    assert (cfg.gamma, cfg.learning_rate, cfg.task_index) == (0.9, 0.01, 3)
    assert cfg.clip_rho_threshold is None


def test_presets_then_explicit_values():
    cfg = config.resolve({"env": "CartPole-v1", "learning_rate": 0.5})
    assert cfg.net == "mlp" and cfg.learning_rate == 0.5
    seed = config.resolve({})
    assert (seed.env, seed.net, seed.num_hidden, seed.gamma, seed.optimizer) == (
        "ShortCorridor-v0",
        "seed",
        10,
        0.97,
        "rmsprop",
    )
    with pytest.raises(ConfigError, match="unknown config field"):
        config.resolve({"nope": 1})
