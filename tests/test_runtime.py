"""Whole runs: the serial runtime's determinism and the local runtime's processes and memory."""

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from conftest import project_children, shm_entries

from impala import config
from impala.train import train


def _cfg(run_dir, **kw):
    return config.resolve({"run_dir": run_dir, "log_interval": 0.2, **kw})


def test_serial_runtime_is_deterministic(tmp_path, capsys):
    results = []
    for k in range(2):
        cfg = _cfg(
            str(tmp_path / f"r{k}"),
            runtime="serial",
            env="CartPole-v1",
            total_steps=6_000,
            envs_per_explorer=4,
            batch_size=8,
        )
        train(cfg)
        results.append(torch.load(tmp_path / f"r{k}" / "model.pt"))
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name


def test_serial_corridor_line_and_run_folder(tmp_path, capsys):
    cfg = _cfg(str(tmp_path / "r"), runtime="serial", steps_per_explorer=3_000)
    result = train(cfg)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("task 0 step"))
    parts = line.split()
    assert parts[:3] == ["task", "0", "step"] and parts[4] == "loss"
    assert parts[6].startswith("avg-right-prob=")
    float(parts[5]), float(parts[6].split("=")[1])
    assert result.steps >= 3_000
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["env"] == "ShortCorridor-v0"
    text = (tmp_path / "r" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records and {"steps", "updates", "loss", "policy_lag", "return_mean"} <= set(records[-1])


@pytest.mark.parametrize("buffer", ["fifo", "replay"])
def test_local_runtime_runs_and_cleans_up(tmp_path, buffer):
    before = shm_entries()
    cfg = _cfg(
        str(tmp_path / "r"),
        env="CartPole-v1",
        total_steps=20_000,
        buffer=buffer,
        envs_per_explorer=4,
        batch_size=8,
        num_explorers=2,
    )
    result = train(cfg)
    assert result.steps >= 20_000 and result.updates > 0
    assert project_children() == []
    assert shm_entries() == before
    lag = [
        json.loads(line)["policy_lag"]
        for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(x is None or x >= 0 for x in lag)


def test_ctrl_c_stops_everything(tmp_path):
    before = shm_entries()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "impala.cli",
            "train",
            "--env",
            "CartPole-v1",
            "--run-dir",
            str(tmp_path / "r"),
            "--log-interval",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until learning has started
            if (tmp_path / "r" / "metrics.jsonl").exists() and (
                tmp_path / "r" / "metrics.jsonl"
            ).read_text():
                break
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert shm_entries() == before


class _KillOneExplorer:
    """Kills one explorer process with SIGKILL once training has logged, from a thread."""

    def __init__(self, run_dir, find_explorers, timeout=90.0):
        self.run_dir, self.find_explorers, self.timeout = run_dir, find_explorers, timeout
        self.killed: list[int] = []
        self._thread = threading.Thread(target=self._run)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._thread.join()

    def _run(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            explorers = self.find_explorers()
            if explorers and (self.run_dir / "metrics.jsonl").exists():
                time.sleep(1.0)
                explorers[0].kill()
                self.killed.append(explorers[0].pid)
                return
            time.sleep(0.2)


def test_dead_explorer_is_restarted(tmp_path, capsys):
    cfg = _cfg(
        str(tmp_path / "r"),
        env="CartPole-v1",
        total_steps=150_000,
        envs_per_explorer=4,
        batch_size=8,
        num_explorers=2,
    )
    with _KillOneExplorer(tmp_path / "r", project_children) as killer:
        result = train(cfg)
    assert killer.killed
    assert "restarting it" in capsys.readouterr().out
    assert result.steps >= 150_000


def _ray_explorer_actors():
    return [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if "_ExplorerActor" in " ".join(proc.info["cmdline"] or [])
    ]


def test_ray_runtime_survives_a_dead_explorer(tmp_path, capsys):
    if importlib.util.find_spec("ray") is None:  # not imported: Ray reads its environment then
        pytest.skip("ray is not installed")
    cfg = _cfg(
        str(tmp_path / "r"),
        env="CartPole-v1",
        runtime="ray",
        total_steps=200_000,
        envs_per_explorer=8,
        batch_size=16,
        num_explorers=2,
    )
    with _KillOneExplorer(tmp_path / "r", _ray_explorer_actors) as killer:
        result = train(cfg)
    assert killer.killed
    assert "died; Ray restarts it" in capsys.readouterr().out
    assert result.steps >= 200_000


def test_ray_runtime_on_an_existing_cluster(tmp_path):
    """--ray-address: the roles run on a cluster started beforehand (as `ray start --head`)."""
    if importlib.util.find_spec("ray") is None:  # not imported: Ray reads its environment then
        pytest.skip("ray is not installed")
    from impala.runtime.ray_support import RayNode, free_port

    port = free_port()
    head = RayNode.head("127.0.0.1", port)
    try:
        cfg = _cfg(
            str(tmp_path / "r"),
            env="CartPole-v1",
            runtime="ray",
            total_steps=30_000,
            envs_per_explorer=8,
            batch_size=16,
            ray_address=f"127.0.0.1:{port}",
        )
        result = train(cfg)
        assert result.steps >= 30_000 and result.updates > 0
        assert head.failed() is None  # the cluster outlives the job that used it
    finally:
        head.stop()
