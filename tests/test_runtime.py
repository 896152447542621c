"""Whole runs of the serial and local runtimes: determinism, processes, shared memory, signals,
explorers killed at any moment, crash loops."""

import json
import multiprocessing
import os
import signal
import threading
import time
from types import SimpleNamespace

import gymnasium as gym
import psutil
import pytest
import torch
from conftest import (
    SIGNALS,
    assert_gone,
    env_with_tests_on_path,
    explorer_processes,
    hang_guard,
    metrics,
    project_children,
    shm_entries,
    start_cli,
    stop_with,
    wait_for_learning,
    wait_until,
)

from impala import config
from impala.agent import UnrollInfo
from impala.errors import RunFailed
from impala.runtime.local import LocalSource
from impala.runtime.slots import SlotBoard
from impala.shutdown import StopSignals
from impala.training import train


def _cfg(run_dir, **kw):
    return config.resolve({"run_dir": str(run_dir), "log_interval": 0.2, **kw})


# A learner-bound setting: a big network learns slower than two explorers act, so explorers
# spend most of their time waiting for a free slot (the state item 1 of the hardening issue
# was about).
LEARNER_BOUND = dict(
    env="CartPole-v1",
    num_hidden=512,
    num_layers=3,
    envs_per_explorer=4,
    batch_size=8,
    num_explorers=2,
)


def test_serial_runtime_is_deterministic(tmp_path, capsys):
    results = []
    for k in range(2):
        cfg = _cfg(
            tmp_path / f"r{k}",
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
    cfg = _cfg(tmp_path / "r", runtime="serial", steps_per_explorer=3_000)
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
    records = metrics(tmp_path / "r")
    assert records and {"steps", "updates", "loss", "policy_lag", "return_mean"} <= set(records[-1])


@pytest.mark.parametrize("buffer", ["fifo", "replay"])
def test_local_runtime_runs_and_cleans_up(tmp_path, buffer):
    before = shm_entries()
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cfg = _cfg(
        tmp_path / "r",
        env="CartPole-v1",
        total_steps=20_000,
        buffer=buffer,
        envs_per_explorer=4,
        batch_size=8,
        num_explorers=2,
        learner_threads=2,
    )
    result = train(cfg)
    assert result.steps >= 20_000 and result.updates > 0 and result.stop_reason == "step budget"
    assert project_children() == []
    assert shm_entries() == before
    records = metrics(tmp_path / "r")
    assert all(r.get("policy_lag") is None or r["policy_lag"] >= 0 for r in records)
    if buffer == "fifo":
        assert records[-1]["torn_unrolls"] == 0
    # train() leaves the caller's process as it found it
    assert torch.get_num_threads() == threads
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_run_dir_that_holds_a_run_is_refused(tmp_path):
    cfg = _cfg(tmp_path / "r", runtime="serial", env="CartPole-v1", total_steps=1_000)
    train(cfg)
    model = (tmp_path / "r" / "model.pt").read_bytes()
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg)
    assert (tmp_path / "r" / "model.pt").read_bytes() == model  # nothing already written is lost


class _Killer(threading.Thread):
    """SIGKILLs an explorer process each time the run's env steps pass one of `at_steps`, each
    kill after the previous victim's replacement has started. Kills tied to steps, not to the
    clock: on a fast machine a clock-timed kill can land while the run is already shutting down,
    where no restart is due. A wait that times out asks the run to stop (`signals`), so that a
    frozen run ends with the wait's own message rather than at the run's time limit."""

    def __init__(self, run_dir, find, at_steps, signals: StopSignals | None = None):
        super().__init__(daemon=True)
        self.run_dir, self.find, self.at_steps = run_dir, find, at_steps
        self.signals = signals
        self.killed: list[int] = []
        self.error: BaseException | None = None

    def _steps(self) -> int:
        return max((r["steps"] for r in metrics(self.run_dir)), default=0)

    def run(self):
        try:
            for k, threshold in enumerate(self.at_steps):
                wait_until(lambda n=threshold: self._steps() >= n, 90, f"{threshold:,} steps")
                victims = wait_until(self.find, 30, "explorer processes")
                before = {p.pid for p in victims}
                victim = victims[k % len(victims)]
                victim.kill()
                self.killed.append(victim.pid)
                wait_until(lambda old=before: {p.pid for p in self.find()} - old, 30, "a restart")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            if self.signals is not None:
                self.signals.request()


def test_explorers_killed_while_waiting_for_a_slot_do_not_freeze_the_run(
    tmp_path, capsys, record_property
):
    """Explorers SIGKILLed while they wait for a free slot (learner-bound): with a shared
    multiprocessing queue the dead one kept its reader lock and every explorer froze for good.
    A freeze shows as the killer's wait timing out (it then stops the run); --max-seconds is
    only a backstop, under pytest's limit."""
    cfg = _cfg(tmp_path / "r", total_steps=60_000, max_seconds=240, **LEARNER_BOUND)
    signals = StopSignals()
    killer = _Killer(
        tmp_path / "r", explorer_processes, (4_000, 8_000, 12_000, 16_000), signals=signals
    )
    killer.start()
    result = train(cfg, signals=signals)
    killer.join()
    assert killer.error is None and len(killer.killed) == 4, killer.error
    assert result.stop_reason == "step budget", result  # not a stop request, nor the time limit
    assert result.steps >= 60_000
    out = capsys.readouterr().out
    hang_guard(result.seconds, 240, "run seconds", record_property)
    assert out.count("restarting it") == 4
    assert "killed by SIGKILL" in out
    assert metrics(tmp_path / "r")[-1]["torn_unrolls"] == 0


def test_steps_committed_but_never_reported_are_counted(tmp_path):
    """An explorer killed after committing an unroll (it is learned from, and its replacement goes
    on from the board's count) but before reporting it: the run still counts those steps. CI saw
    a run stop on its step budget 80 steps (one unroll) short of it."""
    cfg = _cfg(tmp_path / "r", env="CartPole-v1", num_explorers=1)
    source = LocalSource(cfg, None, None, SimpleNamespace(out=None, run_dir=None))
    source.board = SlotBoard(num_explorers=1, slots_per_explorer=2)
    reader, writer = multiprocessing.Pipe(duplex=False)
    source.conns[0] = reader
    source.board.commit(0, slot=0, serial=1, steps=80)
    writer.send(UnrollInfo(0, 80, [12.0], [12], policy_version=3))
    source.board.commit(0, slot=1, serial=2, steps=80)  # then SIGKILLed before its report
    writer.close()
    infos = source.poll()
    assert sum(i.steps for i in infos) == 160
    assert [r for i in infos for r in i.episode_returns] == [12.0]
    assert source.conns[0] is None
    source.board.commit(0, slot=0, serial=3, steps=80)  # the replacement reports its unrolls
    reader, writer = multiprocessing.Pipe(duplex=False)
    source.conns[0] = reader
    writer.send(UnrollInfo(0, 80, [], [], policy_version=4))
    writer.close()
    assert sum(i.steps for i in source.poll()) == 80  # nothing counted twice


@pytest.mark.parametrize("signum, code", SIGNALS)
def test_signal_stops_train_saves_and_leaves_nothing(tmp_path, signum, code, record_property):
    before = shm_entries()
    run_dir = tmp_path / "r"
    proc = start_cli(
        "train", "--env", "CartPole-v1", "--run-dir", str(run_dir), "--log-interval", "0.3"
    )
    try:
        wait_for_learning(run_dir)
        children = project_children(psutil.Process(proc.pid))
        explorers = explorer_processes(psutil.Process(proc.pid))
        assert len(explorers) == 2
        # The learner first: explorers run at 5 more niceness (--explorer-nice's default).
        want = min(19, psutil.Process(proc.pid).nice() + 5)
        # An explorer still importing has not reniced yet.
        wait_until(lambda: [p.nice() for p in explorers] == [want, want], 60, "explorers reniced")
    finally:
        seconds, out, err = stop_with(proc, signum, timeout=90)
    assert proc.returncode == code, err
    # A clean stop (explorers joined, checkpoint, model.pt, TensorBoard closed) takes about 1 s
    # on an idle 2-core machine and 5-6 s under a load of 8: a hang guard, not a speed test.
    hang_guard(seconds, 60, "stop seconds", record_property)
    name = signal.Signals(signum).name
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"stopped ({name})") and str(run_dir) in last, out
    assert "Traceback" not in err and err.strip() == "", err
    assert (run_dir / "model.pt").exists()
    torch.load(run_dir / "model.pt")
    assert_gone(children, timeout=60)  # returns as soon as they are gone
    assert shm_entries() == before


def test_sigterm_to_impala_as_pid_1(tmp_path, record_property):
    """In a container `impala` may be PID 1, where a signal with no handler is dropped."""
    if not os.path.exists("/usr/bin/unshare") or os.geteuid() != 0:
        pytest.skip("needs root and unshare to make a PID namespace")
    run_dir = tmp_path / "r"
    proc = start_cli(
        "train",
        "--env",
        "CartPole-v1",
        "--run-dir",
        str(run_dir),
        "--log-interval",
        "0.3",
        prefix=("unshare", "--pid", "--fork", "--mount-proc"),
    )
    try:
        wait_for_learning(run_dir)
        [inner] = psutil.Process(proc.pid).children()  # `impala`, PID 1 in its namespace
        start = time.monotonic()
        inner.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    hang_guard(time.monotonic() - start, 60, "stop seconds", record_property)  # see above
    assert "stopped (SIGTERM)" in out and (run_dir / "model.pt").exists()


def test_crash_loop_ends_with_the_explorers_error(tmp_path, capsys, record_property):
    """An env registered only in this process: spawned explorers cannot build it. The restart
    window is an hour, so that however slow the machine, the 4 failures fall within it."""
    env_id = "OnlyInTheDriver-v0"
    gym.register(env_id, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv")
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
    assert "\n" not in message
    assert f"unknown environment id '{env_id}'" in message
    assert "3 restarts within 3600 s" in message, message
    capsys.readouterr()  # the run's lines: the figure below is to be shown
    hang_guard(seconds, 120, "crash loop seconds", record_property)
    assert (tmp_path / "r" / "model.pt").exists()
    assert "Traceback" in (tmp_path / "r" / "explorer-errors.log").read_text()
    assert project_children() == []


def test_crash_loop_from_the_command_line(tmp_path, record_property):
    start = time.monotonic()
    proc = start_cli(
        "train",
        "--env",
        "envs_for_tests:FailsInExplorers-v0",
        "--max-restarts",
        "2",
        "--restart-window",
        "3600",  # the 3 failures within it however slow the machine
        "--run-dir",
        str(tmp_path / "r"),
        env=env_with_tests_on_path(),
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    hang_guard(time.monotonic() - start, 120, "crash loop seconds", record_property)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "explorer" in lines[0] and "a_package_missing_on_this_node" in lines[0]
    assert "Traceback" not in out + err


def test_restart_budget_is_a_sliding_window():
    from impala.runtime.restarts import RestartBudget

    now = [0.0]
    budget = RestartBudget(2, window=10.0, clock=lambda: now[0])
    budget.take("explorer 0", "x")
    now[0] = 5.0
    budget.take("explorer 1", "x")
    with pytest.raises(RunFailed, match="explorer 0 failed: boom"):
        budget.take("explorer 0", "boom")
    now[0] = 10.5  # the first restart left the window
    assert "restart 3" in budget.take("explorer 0", "x")


def test_stop_request_from_another_thread_ends_the_run(tmp_path):
    """The request comes once the run is learning (not a request honoured before the loop)."""
    signals = StopSignals()
    cfg = _cfg(tmp_path / "r", env="CartPole-v1", total_steps=10**9, envs_per_explorer=4)
    errors: list[BaseException] = []

    def stop_once_learning():
        try:
            wait_for_learning(tmp_path / "r")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            signals.request()  # also when the wait failed: the run must end either way

    requester = threading.Thread(target=stop_once_learning, daemon=True)
    requester.start()
    result = train(cfg, signals=signals)
    requester.join(timeout=60)
    assert not errors, errors
    assert result.signal == signal.SIGTERM and result.stop_reason == "SIGTERM"
    assert result.updates > 0
    assert (tmp_path / "r" / "model.pt").exists()
    assert project_children() == []


# --- edges found by the expert review: stalls, hangs, the machine ---------------------------


def test_a_kill_in_the_middle_of_a_replay_upload_does_not_stall_the_run(
    tmp_path, capsys, monkeypatch
):
    """The one explorer SIGKILLed inside its 5th upload's copy (an injected fault): its slice was
    left marked as being written, the learner could sample nothing, and the replacement waited
    for it at the rate limit until --max-seconds. The replacement claims its slice at start, and
    the run makes all its steps and updates."""
    monkeypatch.setenv("IMPALA_FAULTS", "replay-upload@5")
    monkeypatch.setenv("IMPALA_FAULTS_ONCE", str(tmp_path / "fired"))
    cfg = _cfg(
        tmp_path / "r",
        env="CartPole-v1",
        num_explorers=1,
        envs_per_explorer=8,
        buffer="replay",
        replay_ratio=16.0,
        buffer_size=1600,
        learn_batch_size=160,
        upload_frequency=1,
        total_steps=8000,
        max_seconds=300,  # a hang guard: the run takes seconds
    )
    result = train(cfg)
    assert (tmp_path / "fired").exists()
    out = capsys.readouterr().out
    assert "explorer 0 failed: killed by SIGKILL; restarting it" in out
    assert result.stop_reason == "step budget", result  # not the time limit: no stall
    assert result.steps == 8000 and result.updates == 16 * 8000 // 160


def test_a_hung_explorer_is_killed_and_restarted(tmp_path, capsys, monkeypatch):
    """An environment that deadlocks in step() keeps its explorer process alive: only the dead
    were restarted, and the run waited for ever. With no sign of progress for
    --explorer-timeout seconds the explorer is killed and restarted, with a line naming it."""
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
        max_seconds=300,  # a hang guard
    )
    result = train(cfg)
    assert (tmp_path / "hung").exists()
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "hung" in line)
    assert line.startswith("explorer 0 failed: no sign of progress for ")
    assert "see --explorer-timeout" in line and line.endswith("restarting it (restart 1)")
    assert result.stop_reason == "step budget", result
    assert result.steps >= 4000
    assert project_children() == []


def test_the_torn_unroll_check_drops_what_a_broken_writer_published():
    """The slots' seqlock check fires when it must: a slot published without its end serial (a
    broken writer, or stores reordered by a weaker memory order) is counted as torn and its unroll
    is not learned from, while whole ones in the same take are; a write that begins before the
    copy ends is torn too."""
    from impala.agent.buffer import allocate, rollout_spec
    from impala.envs import probe_env
    from impala.runtime.slots import SlotQueue

    spec = rollout_spec(probe_env("CartPole-v1"), 5, 2)
    storage = allocate(spec, 3)
    board = SlotBoard(num_explorers=1, slots_per_explorer=3)
    queue = SlotQueue(board, storage, "vtrace")
    for slot, serial in ((0, 11), (1, 12)):
        board.begin(slot, serial)
        storage["reward"][slot] = serial
        board.commit(0, slot, serial, steps=10)
    board.begin(2, 13)
    storage["reward"][2] = 13
    board.publish_torn(2)  # handed on without its end serial
    batch = queue.take(3)
    assert queue.torn == 1 and board.full() == []
    assert set(batch["reward"].flatten().tolist()) == {11.0, 12.0}
    # a writer that (wrongly) begins a new unroll in a full slot while the learner copies it
    board.begin(0, 21)
    board.commit(0, 0, 21, steps=10)
    real = board.whole
    board.whole = lambda slots, ends: (board.begin(0, 22), real(slots, ends))[1]
    assert queue.take(1) is None and queue.torn == 2


def test_the_local_runtime_refuses_cpus_without_x86_memory_order(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    cfg = _cfg(tmp_path / "r", env="CartPole-v1", total_steps=1000)
    with pytest.raises(config.ConfigError, match="--runtime ray .* or --runtime serial"):
        train(cfg)
    assert not (tmp_path / "r").exists()  # refused before anything was written
    serial = _cfg(tmp_path / "s", env="CartPole-v1", total_steps=1000, runtime="serial")
    assert train(serial).steps >= 1000


def _small_shm(*command):
    """`command` in a mount namespace of its own whose /dev/shm is a 64 MB tmpfs (a container's
    default), or None where this machine cannot make one (not root, no unshare)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    script = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        timeout=180,
        env=env_with_tests_on_path(),
    )


def test_a_run_whose_shared_memory_does_not_fit_ends_at_start_with_one_line(tmp_path):
    """Docker's default /dev/shm is 64 MB; the local runtime's slots for Pong need more. It used
    to end in a traceback from torch's allocation (or a bus error where a tmpfs fills up
    mid-run); now one line at start says how much it needs and how to give it."""
    from conftest import PROGRAM

    run_dir = tmp_path / "pong"
    pong = ["train", "--env", "PongNoFrameskip-v4", "--run-dir", str(run_dir)]
    proc = _small_shm(*PROGRAM, *pong, "--total-steps", "1000")
    if proc is None:
        pytest.skip("needs root and unshare for a small /dev/shm")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MiB of shared memory" in lines[0], proc.stderr[-2000:]
    assert "--shm-size" in lines[0] and "emptyDir" in lines[0]
    assert not run_dir.exists()
    fits = ["train", "--env", "CartPole-v1", "--total-steps", "3000", "--run-dir"]
    proc = _small_shm(*PROGRAM, *fits, str(tmp_path / "cartpole"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_replacements_and_resumed_runs_start_explorers_with_seeds_of_their_own(monkeypatch):
    """Each start of an explorer process says which start it is (the run's steps before a
    resume, the times that explorer was started again), from which its seeds are made
    (`explorer_seed`): a run preempted every 10 minutes replayed the same episodes each time."""
    cfg = _cfg("unused", env="CartPole-v1", num_explorers=2)
    learner = SimpleNamespace(store=SimpleNamespace(tensors=None))
    source = LocalSource(cfg, None, learner, SimpleNamespace(out=None, run_dir=None), 5000)
    source.board = SlotBoard(num_explorers=2, slots_per_explorer=2)
    starts = []

    class NotStarted:
        def __init__(self, target, args, name, daemon):
            starts.append((args[2], args[4]))  # explorer index, which start

        def start(self):
            pass

    monkeypatch.setattr(source._ctx, "Process", NotStarted)
    source._start(0)
    source._start(1)
    source._starts[1] += 1  # as check() does before a restart
    source._start(1)
    assert starts == [(0, (5000, 0)), (1, (5000, 0)), (1, (5000, 1))]
    for conn in source.conns:
        conn.close()
