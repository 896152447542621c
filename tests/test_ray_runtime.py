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
    hang_guard,
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
from impala.training import train

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


@pytest.mark.timeout(600)  # above the backstop below, and Ray's start and stop
def test_a_killed_explorer_actor_is_replaced_and_training_goes_on(tmp_path):
    """The run has no step budget in reach: it ends by a stop request once the replacement was
    seen and training went on, so the test does not depend on when the kill lands. A wait that
    times out stops the run too, and its message is the failure; --max-seconds is a backstop
    above the waits' guards (120 + 30 + 120 + 120 s)."""
    signals = StopSignals()
    out = _Lines()
    steps_at_restart = []
    errors: list[BaseException] = []

    def own_explorer_actors():
        """This run's explorer actors: its fresh Ray node's workers descend from this process
        (another run's on the same machine do not, and killing one starts no restart here)."""
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        return [p for p in _explorer_actors() if p.pid in ours]

    def kill_then_stop():
        try:
            wait_for_learning(tmp_path / "r", timeout=120)
            victim = wait_until(own_explorer_actors, 30, "explorer actors")[0]
            victim.kill()
            wait_until(
                lambda: any("restarting it" in s for s in out.lines), 120, "the restart line"
            )
            steps_at_restart.append(metrics(tmp_path / "r")[-1]["steps"])
            wait_until(
                lambda: metrics(tmp_path / "r")[-1]["steps"] > steps_at_restart[0] + 20_000,
                120,
                "training after the restart",
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            signals.request(signal.SIGTERM)

    thread = threading.Thread(target=kill_then_stop, daemon=True)
    thread.start()
    result = train(
        _cfg(tmp_path / "r", total_steps=10**9, max_seconds=420), out=out, signals=signals
    )
    thread.join(timeout=60)
    assert not errors, (errors, out.lines[-5:])
    assert result.stop_reason == "SIGTERM", (result, out.lines[-5:])
    restarts = [s for s in out.lines if "restarting it" in s]
    assert len(restarts) == 1 and "explorer" in restarts[0], out.lines
    assert metrics(tmp_path / "r")[-1]["explorer_restarts"] == 1


def test_crash_loop_on_ray_ends_with_the_explorers_error(tmp_path, record_property):
    """An env registered only in the driver: no actor can build it. The restart window is an
    hour, so that however slow the machine, the 4 failures fall within it."""
    env_id = "OnlyInTheRayDriver-v0"
    gym.register(env_id, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv")
    before = set(ray_processes())
    try:
        cfg = _cfg(
            tmp_path / "r", env=env_id, total_steps=50_000, max_restarts=3, restart_window=3600
        )
        start = time.monotonic()
        with pytest.raises(RunFailed) as info:
            train(cfg)
        seconds = time.monotonic() - start
    finally:
        del gym.registry[env_id]
    message = str(info.value)
    assert "\n" not in message and f"unknown environment id '{env_id}'" in message, message
    assert "3 restarts within 3600 s" in message, message
    # A fresh local Ray and four actor starts (each a worker importing torch): 13.5 s at a load
    # of 2. A hang guard, not a speed test.
    hang_guard(seconds, 120, "crash loop seconds", record_property)
    assert "Traceback" in (tmp_path / "r" / "explorer-errors.log").read_text()
    wait_until(lambda: set(ray_processes()) <= before, 60, "Ray to stop")


@pytest.mark.parametrize("signum, code", SIGNALS)
def test_signal_stops_a_ray_run(tmp_path, signum, code, record_property):
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
        seconds, out, err = stop_with(proc, signum, timeout=90)
    assert proc.returncode == code, err[-2000:]
    # 2.3 s at a load of 4.7, about 5 times more at a load of 8: a hang guard.
    hang_guard(seconds, 60, "stop seconds", record_property)
    assert f"stopped ({signal.Signals(signum).name})" in out.strip().splitlines()[-1]
    assert "Traceback" not in err and "SIGTERM received" not in err + out, err[-2000:]
    assert (run_dir / "model.pt").exists()
    assert_gone(children, timeout=60)  # these return as soon as the processes are gone
    wait_until(lambda: set(ray_processes()) <= before, 60, "Ray to stop")


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
    wait_until(lambda: ray_temp_dirs() <= dirs_before, 60, "the Ray node's temp dir to go")


# --- edges found by the expert review ------------------------------------------------------------
def test_a_hung_explorer_actor_is_replaced(tmp_path, capsys, monkeypatch):
    """An actor whose environment deadlocks in step() never answers its request: only actors
    that died were replaced, and the run waited for ever. An actor that answers nothing for
    --explorer-timeout seconds is taken as hung and replaced, with a line naming it."""
    from conftest import TESTS

    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # Ray's workers import envs_for_tests
    monkeypatch.setenv("IMPALA_TEST_HANG_AFTER", "100")
    monkeypatch.setenv("IMPALA_TEST_HANG_MARKER", str(tmp_path / "hung"))
    cfg = _cfg(
        tmp_path / "r",
        env="envs_for_tests:HangsOnce-v0",
        num_explorers=1,
        envs_per_explorer=4,
        batch_size=4,
        total_steps=4000,
        explorer_timeout=5.0,
        max_seconds=240,  # a hang guard
    )
    result = train(cfg)
    assert (tmp_path / "hung").exists()
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "hung" in line)
    assert line.startswith("explorer 0 failed: no answer for ")
    assert line.endswith("hung (see --explorer-timeout); restarting it (restart 1)")
    assert result.stop_reason == "step budget", result
    assert result.steps >= 4000


def test_dict_observations_travel_through_ray_actors(tmp_path, monkeypatch):
    """A Dict observation (a uint8 picture, a vector, a Discrete mode): the actors' replay
    uploads are messages of one array per part (the DictCues preset: the replay buffer)."""
    from conftest import env_with_tests_on_path

    # Ray's workers import envs_for_tests (and this impala)
    monkeypatch.setenv("PYTHONPATH", env_with_tests_on_path()["PYTHONPATH"])
    cfg = _cfg(
        tmp_path / "r",
        env="envs_for_tests:DictCues-v0",
        num_explorers=1,
        envs_per_explorer=4,
        total_steps=2000,
        max_seconds=240,  # a hang guard
    )
    assert cfg.buffer == "replay"
    result = train(cfg)
    assert result.stop_reason == "step budget", result
    assert result.steps >= 2000 and result.updates > 0 and result.return_mean is not None
