"""`impala train --runtime ray`: explorer actors that die are replaced within the restart budget,
a crash loop ends with the real error, signals stop everything, an existing cluster is used."""

import importlib.util
import signal
import threading
import time

import gymnasium as gym
import psutil
import pytest
from conftest import (
    SIGNALS,
    assert_gone,
    metrics,
    project_children,
    ray_processes,
    ray_temp_dirs,
    start_cli,
    stop_with,
    wait_for_learning,
    wait_until,
)

from impala import config
from impala.errors import RunFailed
from impala.shutdown import StopSignals
from impala.train import train

if importlib.util.find_spec("ray") is None:  # not imported: Ray reads its environment then
    pytest.skip("ray is not installed", allow_module_level=True)


def _cfg(run_dir, **kw):
    return config.resolve(
        {
            "run_dir": str(run_dir),
            "log_interval": 0.2,
            "env": "CartPole-v1",
            "runtime": "ray",
            "envs_per_explorer": 8,
            "batch_size": 16,
            "num_explorers": 2,
            **kw,
        }
    )


def _explorer_actors():
    return [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if "_ExplorerActor" in " ".join(proc.info["cmdline"] or [])
    ]


class _Lines:
    """A text stream for `train(out=...)` that keeps the lines, for another thread to read."""

    def __init__(self):
        self.lines: list[str] = []
        self._partial = ""

    def write(self, text):
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines.extend(done)

    def flush(self):
        pass


def test_a_killed_explorer_actor_is_replaced_and_training_goes_on(tmp_path):
    """The run has no step budget in reach: it ends by a stop request once the replacement was
    seen and training went on, so the test does not depend on when the kill lands."""
    signals = StopSignals()
    out = _Lines()
    steps_at_restart = []

    def kill_then_stop():
        wait_for_learning(tmp_path / "r")
        victim = wait_until(_explorer_actors, 30, "explorer actors")[0]
        victim.kill()
        wait_until(lambda: any("restarting it" in s for s in out.lines), 60, "the restart line")
        steps_at_restart.append(metrics(tmp_path / "r")[-1]["steps"])
        wait_until(
            lambda: metrics(tmp_path / "r")[-1]["steps"] > steps_at_restart[0] + 20_000,
            60,
            "training after the restart",
        )
        signals.request(signal.SIGTERM)

    thread = threading.Thread(target=kill_then_stop, daemon=True)
    thread.start()
    result = train(
        _cfg(tmp_path / "r", total_steps=10**9, max_seconds=150), out=out, signals=signals
    )
    thread.join(timeout=5)
    assert result.stop_reason == "SIGTERM", (result, out.lines[-5:])
    restarts = [s for s in out.lines if "restarting it" in s]
    assert len(restarts) == 1 and "explorer" in restarts[0], out.lines
    assert metrics(tmp_path / "r")[-1]["explorer_restarts"] == 1


def test_crash_loop_on_ray_ends_with_the_explorers_error(tmp_path):
    """An env registered only in the driver: no actor can build it."""
    env_id = "OnlyInTheRayDriver-v0"
    gym.register(env_id, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv")
    before = set(ray_processes())
    try:
        start = time.monotonic()
        with pytest.raises(RunFailed) as info:
            train(_cfg(tmp_path / "r", env=env_id, total_steps=50_000, max_restarts=3))
        seconds = time.monotonic() - start
    finally:
        del gym.registry[env_id]
    message = str(info.value)
    assert "\n" not in message and f"unknown environment id '{env_id}'" in message, message
    assert seconds < 30, seconds
    assert "Traceback" in (tmp_path / "r" / "explorer-errors.log").read_text()
    wait_until(lambda: set(ray_processes()) <= before, 20, "Ray to stop")


@pytest.mark.parametrize("signum, code", SIGNALS)
def test_signal_stops_a_ray_run(tmp_path, signum, code):
    before = set(ray_processes())
    run_dir = tmp_path / "r"
    proc = start_cli(
        "train",
        "--env",
        "CartPole-v1",
        "--runtime",
        "ray",
        "--run-dir",
        str(run_dir),
        "--log-interval",
        "0.3",
    )
    try:
        wait_for_learning(run_dir, timeout=120)
        children = project_children(psutil.Process(proc.pid))
    finally:
        seconds, out, err = stop_with(proc, signum)
    assert proc.returncode == code, err[-2000:]
    assert seconds < 5, seconds
    assert f"stopped ({signal.Signals(signum).name})" in out.strip().splitlines()[-1]
    assert "Traceback" not in err and "SIGTERM received" not in err + out, err[-2000:]
    assert (run_dir / "model.pt").exists()
    assert_gone(children, timeout=10)
    wait_until(lambda: set(ray_processes()) <= before, 20, "Ray to stop")


def test_ray_runtime_on_an_existing_cluster_with_token_auth(tmp_path, monkeypatch):
    """--ray-address: the roles run on a cluster started beforehand (as `ray start --head` with
    the user's token); the user's Ray settings are what the run uses."""
    from impala.runtime.ray_support import RayNode, environment, free_port, ray_environment

    token = tmp_path / "token"
    token.write_text("a-token-of-the-users-cluster\n")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    port = free_port()
    with environment(ray_environment(loopback=True, token_file=str(token))):
        head = RayNode.head("127.0.0.1", port)
    try:
        result = train(_cfg(tmp_path / "r", total_steps=30_000, ray_address=f"127.0.0.1:{port}"))
        assert result.steps >= 30_000 and result.updates > 0
        assert head.failed() is None  # the cluster outlives the job that used it
    finally:
        head.stop()


def test_a_sigkilled_ray_learner_leaves_no_ray_process(tmp_path):
    """The fresh local Ray is a guarded node: Ray's agents and workers go with the learner."""
    before, dirs_before = set(ray_processes()), ray_temp_dirs()
    run_dir = tmp_path / "r"
    proc = start_cli("train", "--env", "CartPole-v1", "--runtime", "ray", "--run-dir", str(run_dir))
    try:
        wait_for_learning(run_dir, timeout=120)
        assert len(set(ray_processes()) - before) >= 4  # gcs, raylet, agents, actors
    finally:
        proc.kill()
        proc.communicate()
    wait_until(lambda: set(ray_processes()) <= before, 30, "every Ray process to go")
    # and the node's temp dir (its sockets and logs), which the killed learner could not remove
    wait_until(lambda: ray_temp_dirs() <= dirs_before, 10, "the Ray node's temp dir to go")
