"""What an outsider on the machine can reach of a job-form job on loopback.

The learners' rendezvous store and gloo connections listen on loopback only, and learner 0's
state reaches the others without being unpickled (defect 9); the job's Ray cluster requires a
token even when no --auth-token-file is given, which the job's other tasks find in this user's
private token folder (defect 10). The jobs are real processes, as in test_distributed.py.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest
import torch
from conftest import PROGRAM, default_sigint, wait_until
from torch import nn

from impala.errors import ConfigError, RunFailed
from impala.runtime import cluster as cluster_mod
from impala.runtime.cluster import Cluster, interface_of, read_private, token_folder
from impala.runtime.collective import LearnerGroup, decode_state, encode_state
from impala.runtime.hosts import make_spec

pytest.importorskip("ray")

CARTPOLE = ("--env", "CartPole-v1", "--envs-per-explorer", "8", "--batch-size", "16")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _is_loopback(ip: str) -> bool:
    """127.0.0.1, also as IPv6 sees it (::ffff:127.0.0.1): where Ray's services listen."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address) == "127.0.0.1"


def _external_hostname(tmp_path: Path) -> list[str]:
    """A command prefix under which this machine's host name resolves to one of its external
    addresses (a private mount and host-name namespace with its own /etc/hosts), as on many
    machines; there gloo, left to itself, listens on that address. [] where this cannot be
    arranged (not root, no unshare, no external address): the store and Ray are checked still."""
    external = [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]
    if os.geteuid() != 0 or not shutil.which("unshare") or not external:
        return []
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{external[0]} impala-external-host\n" + Path("/etc/hosts").read_text())
    setup = f"mount --bind {hosts} /etc/hosts && hostname impala-external-host"
    probe = subprocess.run(
        ["unshare", "-m", "-u", "sh", "-c", f"{setup} && getent hosts $(hostname)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or external[0] not in probe.stdout:
        return []
    return ["unshare", "-m", "-u", "sh", "-c", f'{setup} && exec "$0" "$@"']


class Job:
    """A job's tasks as processes (`prefix` before each command); `close` ends them all."""

    def __init__(self, tmp_path: Path, learners: int, explorers: int, prefix=()) -> None:
        ports = _free_ports(learners + explorers)
        self.head_port = ports[0]
        self.l = ",".join(f"localhost:{p}" for p in ports[:learners])
        self.e = ",".join(f"localhost:{p}" for p in ports[learners:])
        self.tmp, self.prefix = tmp_path, list(prefix)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}  # every process of the job looked at
        self.temp_dirs: set[str] = set()  # its Ray nodes' temp dirs

    def start(self, job: str, task: int, *args: str) -> subprocess.Popen:
        name = f"{job}{task}"
        extra = ["--run-dir", str(self.run_dir(name))] if job == "learner" else []
        command = [*PROGRAM, "-l", self.l, "-e", self.e, "-j", job, "-t", str(task)]
        self.procs[name] = subprocess.Popen(
            [*self.prefix, *command, *extra, *args],
            stdout=open(self.tmp / f"{name}.out", "w"),
            stderr=open(self.tmp / f"{name}.err", "w"),
            preexec_fn=default_sigint,  # SIGINT stops a job (see its docstring)
        )
        return self.procs[name]

    def run_dir(self, name: str) -> Path:
        return self.tmp / f"run-{name}"

    def out(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text()

    def err(self, name: str) -> str:
        return (self.tmp / f"{name}.err").read_text()

    def processes(self) -> list[psutil.Process]:
        """Every task and everything it started (its Ray node's processes and workers); all of
        them, and their Ray nodes' temp dirs, must be gone once the job is stopped."""
        found = []
        for proc in self.procs.values():
            try:
                task = psutil.Process(proc.pid)
                found += [task, *task.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in found:
            self.seen.setdefault(proc.pid, proc)
            try:
                command = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--remove-dir" in command:  # the guard of a Ray node (`RayNode`)
                self.temp_dirs.add(command[command.index("--remove-dir") + 1])
        return found

    def stop(self, signum=signal.SIGINT, only: str | None = None) -> None:
        """Sends `signum` to every task still running (to task `only`, which then ends the
        job), and waits for all of them."""
        self.processes()
        for name, proc in self.procs.items():
            if proc.poll() is None and only in (None, name):
                proc.send_signal(signum)
        for proc in self.procs.values():
            try:
                # A hang guard, not a speed check: a task ends in seconds; under a heavy load
                # (a 64-game Pong run beside the suite) learner 0 once took over 60 s, its last
                # weight publication allowed up to 60 s (job_learner's forced publish).
                proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def jobs(tmp_path):
    """Makes jobs; afterwards every one is stopped, and none of their processes (tasks, Ray's)
    nor their Ray nodes' temp dirs is left (other jobs on this machine are not looked at)."""
    made: list[Job] = []

    def make(learners: int, explorers: int, prefix=()) -> Job:
        made.append(Job(tmp_path, learners, explorers, prefix))
        return made[-1]

    yield make
    for job in made:
        job.stop()
    processes = [proc for job in made for proc in job.seen.values()]
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"left running: {[proc.pid for proc in alive]}"
    temp_dirs = {path for job in made for path in job.temp_dirs}
    assert temp_dirs or not made, "no Ray node was seen"
    wait_until(
        lambda: not any(os.path.exists(path) for path in temp_dirs), 10, "the temp dirs to go"
    )


def _listening(processes: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the processes listen on."""
    found = []
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, proc.name()))
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_two_learner_job_on_loopback_listens_on_loopback_only(jobs, tmp_path):
    """Learners, explorer, Ray head, raylet, hubs and workers: while the two learners train
    together, every socket of the job listens on 127.0.0.1; the rendezvous store once listened
    on every interface, and gloo on the host name's address (external on many machines: here
    too where a namespace can arrange it)."""
    job = jobs(2, 1, prefix=_external_hostname(tmp_path))
    for name, task in (("learner", 0), ("learner", 1), ("explorer", 0)):
        job.start(name, task, *CARTPOLE, "-s", "5000000")

    def training_or_ended() -> bool:
        ended = any(proc.poll() is not None for proc in job.procs.values())
        return ended or "updates" in job.out("learner1")

    wait_until(training_or_ended, 180, "the learners to train together")
    assert all(p.poll() is None for p in job.procs.values()), job.err("learner1")[-2000:]
    listening = _listening(job.processes())
    outside = [entry for entry in listening if not _is_loopback(entry[0])]
    assert not outside, f"listening beyond loopback: {outside} (all: {listening})"
    # Learner 0 listens for its Ray driver, the rendezvous store and gloo: all were looked at.
    assert len(_listening([psutil.Process(job.procs["learner0"].pid)])) >= 3, listening
    job.stop(signal.SIGINT, only="learner0")  # one learner stopped stops the job
    assert job.procs["learner0"].returncode == 130, job.err("learner0")[-2000:]
    for name in ("learner1", "explorer0"):
        assert job.procs[name].returncode == 0, job.err(name)[-2000:]


# --- learner 0's state reaches the other learners without unpickling ---------------------------


class _RunsCode:
    """Unpickled by a full unpickler, this runs `exec(source)`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def test_a_crafted_learner_state_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    attack = _RunsCode(f"open({str(marker)!r}, 'w').close()")
    archive = encode_state({"optimizer": attack, "updates": 1, "version": 1, "target": None})
    raw = torch.frombuffer(bytearray(pickle.dumps(attack, protocol=2)), dtype=torch.uint8)
    for payload in (archive, raw):
        with pytest.raises(RunFailed) as refused:
            decode_state(payload, "learner 1")
        assert str(refused.value).startswith("learner 1: refused learner 0's state")
        assert "\n" not in str(refused.value)
        assert not marker.exists()
    garbage = torch.arange(200, dtype=torch.uint8)
    with pytest.raises(RunFailed, match="refused learner 0's state"):
        decode_state(garbage, "learner 1")
    # A well-formed archive of something else is no learner state either.
    with pytest.raises(RunFailed, match="not a learner state"):
        decode_state(encode_state({"weights": torch.ones(2)}), "learner 1")


class _FolderHub:
    """Hub 0 as `LearnerGroup.join` uses it (rendezvous address, arrivals), kept in a folder
    that both learner processes see; `ray.get` is the identity in these processes."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        remote = types.SimpleNamespace
        self.set_rendezvous = remote(remote=self._set_rendezvous)
        self.arrive = remote(remote=lambda rank: (self.folder / f"arrived-{rank}").touch())
        self.rendezvous = remote(remote=self._rendezvous)
        self.failure = remote(remote=lambda: None)
        self.report_failure = remote(remote=lambda rank, line: None)

    def _set_rendezvous(self, address: str) -> None:
        (self.folder / "address.tmp").write_text(address)
        os.replace(self.folder / "address.tmp", self.folder / "address")

    def _rendezvous(self):
        address = self.folder / "address"
        present = sorted(int(p.name.split("-")[1]) for p in self.folder.glob("arrived-*"))
        return (address.read_text() if address.exists() else None), present


class _Store:
    def __init__(self, version: int) -> None:
        self.version, self.flat = version, torch.zeros(3)

    def assign(self, version: int, flat: torch.Tensor) -> None:
        self.version = version


def _learner_process(rank: int, folder: str, results) -> None:
    """One of two learners: joins the group, takes learner 0's state, reports what it holds,
    the sockets it listened on, and the classes the receiving side unpickled (none)."""
    import ray

    ray.get = lambda value, timeout=None: value  # the hub's answers come back at once
    os.environ["GLOO_SOCKET_IFNAME"] = interface_of("127.0.0.1")  # as `Cluster` sets it
    torch.manual_seed(rank)
    model, target = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if rank == 0:  # a learner that trained: optimizer state, counters and a target to hand on
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
    learner = types.SimpleNamespace(
        optimizer=optimizer,
        updates=7 if rank == 0 else 0,
        store=_Store(9 if rank == 0 else 0),
        target=target,
    )
    group = LearnerGroup(rank, 2, _FolderHub(folder), timeout=60)
    group.join("127.0.0.1")
    listening = [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    unpickled: list = []

    def audit(event: str, args: tuple) -> None:
        if event == "pickle.find_class":  # a full unpickler looks up every class it builds
            unpickled.append(args)

    if rank == 1:
        sys.addaudithook(audit)
    group.broadcast_learner_state(learner)
    unpickled = list(unpickled)
    group.finish()
    held = {
        "optimizer": optimizer.state_dict(),
        "updates": learner.updates,
        "version": learner.store.version,
        "target": target.state_dict(),
    }
    results.put((rank, encode_state(held).numpy().tobytes(), listening, unpickled))


def test_learner_state_reaches_the_other_learner_as_tensors_only(tmp_path):
    """Two learner processes (no Ray): learner 1 ends with learner 0's optimizer state,
    counters and target network, unpickling nothing; both listen on loopback only."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [
        context.Process(target=_learner_process, args=(rank, str(tmp_path), results))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        got = dict((r[0], r[1:]) for r in (results.get(timeout=120) for _ in procs))
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0]
    (sent, listening0, _), (received, listening1, unpickled) = got[0], got[1]
    sent, received = (
        decode_state(torch.frombuffer(bytearray(b), dtype=torch.uint8), "test")
        for b in (sent, received)
    )
    assert unpickled == []
    assert received["updates"] == 7 and received["version"] == 9
    for name, tensor in sent["target"].items():
        assert torch.equal(received["target"][name], tensor)
    assert received["optimizer"]["param_groups"] == sent["optimizer"]["param_groups"]
    assert set(sent["optimizer"]["state"]) == {0, 1}
    for index, state in sent["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(received["optimizer"]["state"][index][key], value), (index, key)
    # Learner 0: the store and gloo's listener; learner 1: gloo's. None beyond loopback.
    assert len(listening0) >= 2 and listening1
    assert all(_is_loopback(ip) for ip, _ in listening0 + listening1), (listening0, listening1)


# --- the job's Ray cluster requires a token, also on loopback without --auth-token-file ---------

OUTSIDER = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], namespace="impala", logging_level="ERROR", log_to_driver=False)
    hub = ray.get(ray.get_actor("hub-0").status.remote(), timeout=30)
    print("ATTACHED: hub 0 answered", hub["joined"])
except Exception as exc:
    print("REFUSED:", type(exc).__name__, str(exc).splitlines()[:1])
"""


def _outsider(address: str, token: Path | str | None) -> subprocess.Popen:
    """A local process that is no part of the job tries to reach hub 0 through the job's Ray
    cluster: with no token (`None`), a wrong one (a string) or the job's (a file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Keep 127.0.0.1 as it is (Ray would turn it into the machine's external address) and give
    # up on a refusing cluster after a few seconds per try.
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="5")
    if token is None:
        env["RAY_AUTH_MODE"] = "disabled"
    elif isinstance(token, Path):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    else:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return subprocess.Popen(
        [sys.executable, "-c", OUTSIDER, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_loopback_job_without_a_token_file_refuses_outsiders(jobs):
    job = jobs(1, 1)
    job.start("learner", 0, "-s", "5000000")
    job.start("explorer", 0, "-s", "5000000")
    wait_until(
        lambda: "task 0 step" in job.out("learner0") or job.procs["learner0"].poll() is not None,
        120,
        "the job to learn",
    )
    assert job.procs["learner0"].poll() is None, job.err("learner0")[-2000:]
    token_file = job.run_dir("learner0") / "ray-auth-token"
    published = token_folder() / f"ray-token-127.0.0.1-{job.head_port}"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert published.stat().st_mode & 0o777 == 0o600
    assert token_folder().stat().st_mode & 0o777 == 0o700
    assert read_private(published) == token_file.read_text().strip()
    address = f"127.0.0.1:{job.head_port}"
    tries = {
        "no token": _outsider(address, None),
        "a wrong token": _outsider(address, "0" * 64),
        "the job's token": _outsider(address, token_file),  # the probe itself works
    }
    try:
        said = {what: proc.communicate(timeout=240) for what, proc in tries.items()}
    finally:
        for proc in tries.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert said["the job's token"][0].startswith("ATTACHED"), said["the job's token"]
    for what in ("no token", "a wrong token"):
        out, err = said[what]
        assert out.startswith("REFUSED"), (what, out, err[-2000:])
        assert "InvalidAuthToken" in err, (what, out, err[-2000:])  # refused for its token
    assert job.procs["learner0"].poll() is None, job.err("learner0")[-2000:]
    job.stop(signal.SIGTERM, only="learner0")
    assert job.procs["learner0"].returncode == 143, job.err("learner0")[-2000:]
    assert "learner 0 stopped (SIGTERM)" in job.out("learner0")
    assert job.procs["explorer0"].returncode == 0, job.err("explorer0")[-2000:]
    assert "the learners have finished" in job.out("explorer0")
    assert not published.exists()


def test_a_task_finds_no_published_token_and_says_what_to_do(tmp_path, monkeypatch):
    """An explorer of a job on loopback, no --auth-token-file: something answers at learner 0's
    address, but nothing published a token there. One line, naming the way out."""
    monkeypatch.setattr(cluster_mod, "TOKEN_WAIT", 0.5)
    monkeypatch.setattr(cluster_mod.tempfile, "gettempdir", lambda: str(tmp_path))
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen(1)
        port = head.getsockname()[1]
        (explorer_port,) = _free_ports(1)
        spec = make_spec(f"localhost:{port}", f"localhost:{explorer_port}", "explorer", 0)
        environ = dict(os.environ)
        with pytest.raises(ConfigError) as missing:
            with Cluster(spec, 30, sys.stdout):
                pass
    line = str(missing.value)
    assert "\n" not in line and "--auth-token-file" in line
    assert f"found no Ray token of learner 0 at 127.0.0.1:{port}" in line
    assert dict(os.environ) == environ
    with socket.socket() as again:  # the explorer's own address is free again
        again.bind(("127.0.0.1", explorer_port))


def test_the_token_folder_is_this_users_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_mod.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = token_folder()
    assert folder == tmp_path / f"impala-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700
    token = folder / "ray-token-127.0.0.1-5"
    cluster_mod._replace_private(token, "secret")
    assert token.stat().st_mode & 0o777 == 0o600 and read_private(token) == "secret"
    assert read_private(folder / "ray-token-127.0.0.1-6") is None  # none published
    cluster_mod._unpublish(token, "another job's token")  # a successor's file stays
    assert token.exists()
    cluster_mod._unpublish(token, "secret")
    assert not token.exists()

    planted = folder / "planted"
    planted.write_text("a token someone else could read\n")
    planted.chmod(0o644)
    with pytest.raises(ConfigError, match="not this user's file alone"):
        read_private(planted)
    link = folder / "link"
    link.symlink_to(planted)
    with pytest.raises(ConfigError, match="cannot read the job token"):
        read_private(link)

    folder.chmod(0o755)  # others may look in
    with pytest.raises(ConfigError, match="refusing the job token folder"):
        token_folder()
    shutil.rmtree(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)  # a link, maybe to another user's folder
    with pytest.raises(ConfigError, match="refusing the job token folder"):
        token_folder()
    if os.geteuid() == 0:  # made by another user
        folder.unlink()
        folder.mkdir(mode=0o700)
        os.chown(folder, 12345, 12345)
        with pytest.raises(ConfigError, match="refusing the job token folder"):
            token_folder()
