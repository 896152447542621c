"""The seed's job command lines as real OS processes on loopback, started the way a user would.

Learner task 0 hosts a Ray head at its address; every other task joins it. Each test checks that
no Ray or impala process is left behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import default_sigint, hang_guard, metrics, ray_temp_dirs, wait_until

from impala import checkpoint

pytest.importorskip("ray")

PROGRAM = [sys.executable, "-m", "impala.cli"]


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def hosts(ports):
    return ",".join(f"localhost:{p}" for p in ports)


class Job:
    """Starts tasks as separate processes and makes sure every one of them is gone at the end."""

    def __init__(self, tmp_path, n_learners, n_explorers):
        ports = free_ports(n_learners + n_explorers)
        self.l, self.e = hosts(ports[:n_learners]), hosts(ports[n_learners:])
        self.tmp = tmp_path
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, job, task, *args, name=None):
        name = name or f"{job}{task}"
        out = open(self.tmp / f"{name}.out", "w")
        err = open(self.tmp / f"{name}.err", "w")
        extra = ["--run-dir", str(self.tmp / f"run-{name}")] if job == "learner" else []
        self.procs[name] = subprocess.Popen(
            [*PROGRAM, "-l", self.l, "-e", self.e, "-j", job, "-t", str(task), *extra, *args],
            stdout=out,
            stderr=err,
            text=True,
            preexec_fn=default_sigint,  # the signal tests send SIGINT
        )
        return self.procs[name]

    def wait(self, name, timeout):
        return self.procs[name].wait(timeout=timeout)

    def out(self, name):
        return (self.tmp / f"{name}.out").read_text()

    def err(self, name):
        return (self.tmp / f"{name}.err").read_text()

    def seed_lines(self, name):
        return [line for line in self.out(name).splitlines() if line.startswith("task ")]

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def job_factory(tmp_path):
    jobs = []
    dirs_before = ray_temp_dirs()

    def make(n_learners=1, n_explorers=1):
        jobs.append(Job(tmp_path, n_learners, n_explorers))
        return jobs[-1]

    yield make
    for job in jobs:
        job.close()
    _assert_no_ray_processes()
    # nor a Ray node's temp dir, even of a task killed with SIGKILL
    wait_until(lambda: ray_temp_dirs() <= dirs_before, 60, "the Ray nodes' temp dirs to go")


def _assert_no_ray_processes(timeout=60):
    """No task and no Ray process of a job's (their command lines name the job's temp dirs)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "impala-ray-" in cmd or "impala.cli -l" in cmd:
                left.append(f"{proc.pid} {cmd[:80]}")
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes left running: {left}")
        time.sleep(0.5)


def _prob(line):
    return float(line.split("avg-right-prob=")[1])


@pytest.mark.timeout(400)  # the waits' guards (60 + 5 + 180 + 60 s) and the teardown's (90 s)
def test_seed_command_lines_run_the_corridor(job_factory):
    """The seed's two command lines, the explorer started first and the learner 5 seconds after
    it said it waits (a shorter run; learning to 0.59 across hosts is checked in
    test_multihost.py, on one machine in test_learning.py), with a learner line per update
    (--log-interval, the learner's own), so that the lines are counted by updates, not seconds."""
    job = job_factory()
    explorer = job.start("explorer", 0, "-s", "200000")
    # The explorer's start-up (torch, Ray) takes seconds, many more under load: wait for its
    # line rather than for a fixed time, then start the learner 5 seconds later.
    wait_until(
        lambda: "waiting for learner 0" in job.out("explorer0") or explorer.poll() is not None,
        60,
        "the explorer's 'waiting for learner 0'",
    )
    time.sleep(5)
    assert explorer.poll() is None, job.err("explorer0")  # still waiting
    job.start("learner", 0, "-s", "200000", "--log-interval", "0")
    assert job.wait("explorer0", 180) == 0, job.err("explorer0")
    assert job.wait("learner0", 60) == 0, job.err("learner0")
    lines = job.seed_lines("learner0")
    assert len(lines) > 5
    assert re.fullmatch(r"task 0 step \d+ loss \S+ avg-right-prob=0\.\d+", lines[-1]), lines[-1]
    assert abs(_prob(lines[-1]) - 0.59) <= 0.06, lines[-3:]
    assert "explorer 0 done: 200,000 steps" in job.out("explorer0")
    assert "learner 0 done (step budget): 200,000 steps" in job.out("learner0")
    assert job.err("learner0").strip() == "" and job.err("explorer0").strip() == ""


def test_one_learner_three_explorers(job_factory):
    job = job_factory(1, 3)
    job.start("learner", 0, "-s", "30000")
    for t in range(3):
        job.start("explorer", t, "-s", "30000")
    for t in range(3):
        assert job.wait(f"explorer{t}", 150) == 0, job.err(f"explorer{t}")
    assert job.wait("learner0", 60) == 0, job.err("learner0")
    done = re.search(r"learner 0 done \(step budget\): ([\d,]+) steps", job.out("learner0"))
    assert done and int(done.group(1).replace(",", "")) >= 3 * 30000, job.out("learner0")


def test_killed_explorer_rejoins_and_learning_goes_on(job_factory):
    """An explorer SIGKILLed and started again with the same command: the learner waits for it
    (the replay rate limit keeps it from overfitting its buffer meanwhile), reports the rejoin
    and finishes the job. The explorer started again makes only what is left of its share (it
    used to redo all of it, so the job overshot its budget and learned the excess at a learning
    rate of about 0)."""
    job = job_factory()
    # A budget the explorer cannot finish before the kill: 60,000 steps once took 3 s in all,
    # over before the learner's third line (lines come by time, not by steps).
    learner = job.start("learner", 0, "-s", "400000")
    first = job.start("explorer", 0, "-s", "400000")
    wait_until(lambda: job.seed_lines("learner0"), 90, "the learner's first line")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert "explorer 0 done" not in job.out("explorer0")  # killed in the middle of its budget
    updates_at_kill = int(job.seed_lines("learner0")[-1].split()[3])
    assert learner.poll() is None  # still up, waiting for its explorer
    job.start("explorer", 0, "-s", "400000", name="explorer0-again")
    assert job.wait("explorer0-again", 150) == 0, job.err("explorer0-again")
    assert job.wait("learner0", 60) == 0, job.err("learner0")
    assert "explorer 0 rejoined (rejoins so far: 1)" in job.out("learner0")
    assert int(job.seed_lines("learner0")[-1].split()[3]) > updates_at_kill
    again = job.out("explorer0-again")
    made_before = int(re.search(r"; ([\d,]+) of its 400,000 steps", again)[1].replace(",", ""))
    assert 0 < made_before < 400_000, again
    made_again = int(again.split("explorer 0 done: ")[1].split(" steps")[0].replace(",", ""))
    unroll = 4 * 40  # the corridor's 4 environments x 40 steps
    assert 400_000 - made_before <= made_again < 400_000 - made_before + unroll
    done = job.out("learner0").split("learner 0 done (step budget): ")[1]
    assert 400_000 <= int(done.split(" steps")[0].replace(",", "")) < 400_000 + unroll


def test_explorer_without_learner_gives_up_after_timeout(job_factory):
    job = job_factory()
    proc = job.start("explorer", 0, "--peer-timeout", "4")
    assert proc.wait(timeout=60) == 1
    err = [line for line in job.err("explorer0").splitlines() if line.strip()]
    assert len(err) == 1 and "within 4 s" in err[0], err


def test_port_already_taken(job_factory):
    job = job_factory()
    _host, port = job.l.split(":")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(port)))
        taken.listen(1)
        proc = job.start("learner", 0)
        assert proc.wait(timeout=60) == 2
    lines = job.err("learner0").strip().splitlines()
    assert len(lines) == 1 and "port already taken" in lines[0], lines


def test_tasks_with_different_host_lists_are_refused(job_factory):
    job = job_factory()
    job.start("learner", 0)
    other_e = hosts(free_ports(2))
    proc = subprocess.run(
        [*PROGRAM, "-l", job.l, "-e", other_e, "-j", "explorer", "-t", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("impala")]
    assert len(lines) == 1 and "explorer_hosts" in lines[0], proc.stderr


def test_learner_killed_with_sigkill_leaves_no_ray_node(job_factory):
    job = job_factory()
    proc = job.start("learner", 0)
    deadline = time.monotonic() + 60
    while "learner 0: up" not in job.out("learner0") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "learner 0: up" in job.out("learner0")
    proc.kill()
    proc.wait()
    _assert_no_ray_processes(timeout=30)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.timeout(400)  # the waits' guards (90 + 90 + 60 s) and the teardown's (90 s)
def test_signal_stops_job_tasks_within_seconds(
    job_factory, tmp_path, signum, code, record_property
):
    job = job_factory()
    learner = job.start("learner", 0, "-s", "5000000")
    explorer = job.start("explorer", 0, "-s", "5000000")
    wait_until(lambda: len(job.seed_lines("learner0")) >= 3, 90, "3 learner lines")
    start = time.monotonic()
    learner.send_signal(signum)
    assert learner.wait(timeout=90) == code, job.err("learner0")
    # The learner leaves Ray and saves: 2.3 s at a load of 6. A hang guard, not a speed test.
    hang_guard(time.monotonic() - start, 60, "stop seconds", record_property)
    name = signal.Signals(signum).name
    assert f"learner 0 stopped ({name})" in job.out("learner0")
    assert "Traceback" not in job.err("learner0") and "SIGTERM received" not in job.err("learner0")
    assert (tmp_path / "run-learner0" / "model.pt").exists()
    # the explorer hears that the job is over and ends by itself
    assert explorer.wait(timeout=60) == 0, job.err("explorer0")
    assert "the learners have finished" in job.out("explorer0")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.timeout(400)  # the waits' guards (90 + 90 + 60 s) and the teardown's (90 s)
def test_signal_stops_an_explorer_task_within_seconds(job_factory, signum, code, record_property):
    job = job_factory()
    job.start("learner", 0, "-s", "5000000")
    explorer = job.start("explorer", 0, "-s", "5000000")
    wait_until(lambda: len(job.seed_lines("learner0")) >= 3, 90, "3 learner lines")
    start = time.monotonic()
    explorer.send_signal(signum)
    assert explorer.wait(timeout=90) == code, job.err("explorer0")
    hang_guard(time.monotonic() - start, 60, "stop seconds", record_property)  # as above
    assert f"explorer 0 stopped by {signal.Signals(signum).name}" in job.out("explorer0")
    assert job.err("explorer0").strip() == ""
    # The learner sees it through the hub status it polls.
    wait_until(lambda: "explorer 0 left" in job.out("learner0"), 60, "'explorer 0 left'")
    assert "explorer 0 left: stopped by" in job.out("learner0")


def test_learners_with_different_learning_rates_are_refused(job_factory):
    job = job_factory(2, 1)
    job.start("learner", 0, "-a", "0.001")
    second = job.start("learner", 1, "-a", "0.01")
    assert second.wait(timeout=120) == 2, job.err("learner1")
    lines = [line for line in job.err("learner1").splitlines() if line.strip()]
    assert len(lines) == 1 and "learning_rate: 0.01 here, 0.001 at learner 0" in lines[0], lines


@pytest.mark.timeout(400)  # the waits' guards (90 + 120 + 30 s) and the teardown's (120 s)
def test_job_ends_when_an_explorer_is_gone_for_good(job_factory, record_property):
    """--peer-timeout also bounds each task's start-up (finding learner 0, joining) and the
    silence of a live explorer starved of the CPU: long enough for a loaded machine."""
    peer_timeout = 30
    peer = ("-s", "5000000", "--peer-timeout", str(peer_timeout))
    job = job_factory(1, 2)
    job.start("learner", 0, *peer)
    job.start("explorer", 0, *peer)
    gone = job.start("explorer", 1, *peer)
    wait_until(lambda: len(job.seed_lines("learner0")) >= 3, 90, "3 learner lines")
    gone.kill()
    start = time.monotonic()
    assert job.wait("learner0", peer_timeout + 90) == 1, job.err("learner0")
    # The silence (peer_timeout), then the job's end: a hang guard above that.
    hang_guard(time.monotonic() - start, peer_timeout + 60, "detection seconds", record_property)
    lines = [line for line in job.err("learner0").splitlines() if line.strip()]
    assert len(lines) == 1 and "explorer 1 has sent nothing for" in lines[0], lines
    assert job.wait("explorer0", 30) == 0, job.err("explorer0")  # told the job is over


@pytest.mark.timeout(400)  # the waits' guards (120 + 2 + 120 s) and the teardown's (150 s)
def test_a_learner_killed_mid_training_ends_the_other_with_its_name(
    job_factory, tmp_path, record_property
):
    job = job_factory(2, 2)
    args = (
        "--env",
        "CartPole-v1",
        "-s",
        "5000000",
        "--envs-per-explorer",
        "8",
        "--batch-size",
        "16",
    )
    for t in range(2):
        job.start("learner", t, *args)
    for t in range(2):
        job.start("explorer", t, *args)
    wait_until(lambda: "updates" in job.out("learner0"), 120, "learner 0's first line")
    time.sleep(2)
    job.procs["learner1"].kill()
    start = time.monotonic()
    assert job.wait("learner0", 120) == 1, job.err("learner0")
    # Found through Ray and the learners' collective step, 4 tasks on 2 cores: a hang guard.
    hang_guard(time.monotonic() - start, 90, "detection seconds", record_property)
    lines = [line for line in job.err("learner0").splitlines() if line.strip()]
    assert len(lines) == 1 and "learner 1 is gone" in lines[0], lines
    assert (tmp_path / "run-learner0" / "model.pt").exists()


# The waits' guards: 120 + 4 x 60 + 4 x 120 s, and the teardown's (150 s).
@pytest.mark.timeout(1000)
def test_a_stopped_job_resumes_from_learner_0s_checkpoint(job_factory, tmp_path):
    """The seed's job form, two synchronous learners: SIGTERM to one stops the job (both learners
    identical), then the same command lines again with --resume auto. Learner 0 loads its
    checkpoint and hands it to learner 1, explorers make what is left of the budget, and the
    learners stay identical."""
    job = job_factory(2, 2)
    args = ("--env", "CartPole-v1", "-s", "60000", "--envs-per-explorer", "8", "--batch-size", "16")
    args = (*args, "--checkpoint-interval", "0.002", "--log-interval", "0.2", "--resume", "auto")

    def start_all():
        for t in range(2):
            job.start("learner", t, *args)
        for t in range(2):
            job.start("explorer", t, *args)

    start_all()
    run0 = tmp_path / "run-learner0"
    wait_until(lambda: len(checkpoint.listed(run0)) >= 2, 120, "learner 0's checkpoints")
    assert not checkpoint.listed(tmp_path / "run-learner1")  # learner 0 writes them
    # SIGTERM to one synchronous learner stops both cleanly, with identical parameters (the
    # budget's end is in test_multihost.py).
    # (Hang guards: these return as soon as the tasks end, seconds on a loaded 2-core machine.)
    job.procs["learner1"].send_signal(signal.SIGTERM)
    assert job.wait("learner1", 60) == 143, job.err("learner1")
    assert job.wait("learner0", 60) == 0, job.err("learner0")
    assert "learner 0 done (another learner stopped)" in job.out("learner0")
    for t in range(2):
        assert job.wait(f"explorer{t}", 60) == 0, job.err(f"explorer{t}")
    a = torch.load(run0 / "model.pt")
    b = torch.load(tmp_path / "run-learner1" / "model.pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    _, saved = checkpoint.latest(run0)
    before = saved["counters"]["job_steps"]
    assert 0 < before < 120_000
    start_all()
    for name in ("learner0", "learner1", "explorer0", "explorer1"):
        assert job.wait(name, 120) == 0, job.err(name)
    assert f"{before:,} steps" in job.out("learner0").splitlines()[0]  # "resuming ... from"
    _, final = checkpoint.latest(run0)
    # The whole job made its budget once: what was left after the checkpoint, not all again.
    assert 120_000 <= final["counters"]["job_steps"] < 120_000 + 4 * 160
    assert final["counters"]["learner_updates"] > saved["counters"]["learner_updates"]
    a = torch.load(run0 / "model.pt")
    b = torch.load(tmp_path / "run-learner1" / "model.pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    marks = [(r["steps"], r["updates"]) for r in metrics(run0)]
    assert marks == sorted(set(marks))


def test_a_job_runs_a_dict_observation_task(job_factory, monkeypatch):
    """The job form with a Dict observation (a uint8 picture, a vector, a Discrete mode):
    unrolls of one array per part, through the hub."""
    from conftest import env_with_tests_on_path

    # the tasks (and Ray's workers) import envs_for_tests
    monkeypatch.setenv("PYTHONPATH", env_with_tests_on_path()["PYTHONPATH"])
    job = job_factory()
    args = ["--env", "envs_for_tests:DictCues-v0", "-s", "3000", "--buffer", "fifo"]
    args += ["--envs-per-explorer", "4", "--batch-size", "4"]
    job.start("learner", 0, *args)
    job.start("explorer", 0, *args)
    assert job.wait("explorer0", 150) == 0, job.err("explorer0")
    assert job.wait("learner0", 60) == 0, job.err("learner0")
    done = re.search(r"learner 0 done \(step budget\): ([\d,]+) steps", job.out("learner0"))
    assert done and int(done.group(1).replace(",", "")) >= 3000, job.out("learner0")
