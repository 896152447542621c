"""A real single-node Slurm for tests: munged, slurmctld and slurmd from the distribution's
packages (`apt-get install -y --no-install-recommends slurm-wlm`), started here and stopped here.

Everything lives in a fresh folder (configuration, keys, state, spool, logs) and a network
namespace of its own, holding only loopback and an address on a veth pair whose both ends are in
the namespace, so there is no route out: Slurm's daemons and the jobs they run listen there and
nowhere else, and Slurm's fixed ports (6817, 6818) never meet another Slurm's on this machine.
(Slurm resolves names with AI_ADDRCONFIG, which finds nothing where loopback is the only
address: hence the veth pair.) Commands run in the namespace through `nsenter`, which unlike
`ip netns exec` leaves /sys as it is (slurmd needs its cgroup mount). Needs root, iproute2 and
nsenter; `available()` says why not otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import netns

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
INSTALL = "apt-get install -y --no-install-recommends slurm-wlm"
CPUS = 4  # slurmd is told its node has these (config_overrides), whatever the machine has


def available() -> str | None:
    """None if a Slurm can be started here, else the reason it cannot (with the fix)."""
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}): {INSTALL}"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return f"there is no 'munge' user (the munge package makes it): {INSTALL}"
    return netns.available()  # root, and namespaces can be made


class SingleNodeSlurm:
    """A context manager: on entry a Slurm with one idle node, `localhost`, with CPUS CPUs; on
    exit every job is cancelled, the daemons are stopped, and the folder and the namespace are
    removed. `left_behind` then names any process that was still in the namespace once the
    daemons had stopped (which were killed), for the test to assert on."""

    def __init__(self) -> None:
        self.name = f"impala-slurm-{os.getpid()}-{time.monotonic_ns() % 100000}"
        self.folder = Path(tempfile.mkdtemp(prefix="impala-slurm-"))
        # munged runs as the munge user: it must reach its socket and key through this folder.
        self.folder.chmod(0o755)
        self.conf = self.folder / "slurm.conf"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.left_behind: list[str] = []
        self._had_run_netns = netns.run_netns_mounted()

    # -- starting ---------------------------------------------------------------------------

    def __enter__(self) -> SingleNodeSlurm:
        try:
            self._make_namespace()
            self._start_munge()
            self._write_config()
            self._start("slurmctld", "slurmctld", "-D")
            self._start("slurmd", "slurmd", "-D", "-N", "localhost")
            self._wait_for_idle_node(timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make_namespace(self) -> None:
        ip = ["ip", "-n", self.name]
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        for argv in (
            [*ip, "link", "set", "lo", "up"],
            [*ip, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            [*ip, "addr", "add", "10.78.0.1/32", "dev", "v0"],
            [*ip, "link", "set", "v0", "up"],
            [*ip, "link", "set", "v1", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)

    def _start_munge(self) -> None:
        munge = self.folder / "munge"
        munge.mkdir(mode=0o755)  # munged wants its socket's folder open to all (execute)
        shutil.chown(munge, "munge", "munge")
        key = munge / "munge.key"
        subprocess.run(
            ["mungekey", "-c", "-k", str(key)], check=True, capture_output=True, user="munge"
        )
        self.socket = munge / "munge.socket"
        self.daemons["munged"] = subprocess.Popen(
            [
                "munged",
                "--foreground",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "munged.err", "w"),  # noqa: SIM115 - the daemon's
            user="munge",
            group="munge",
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.daemons["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._tail('munged.err')}")
            time.sleep(0.05)

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool"):
            (f / sub).mkdir()
        self.conf.write_text(
            f"""\
ClusterName=impalatest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={f / "slurmctld.log"}
SlurmdLogFile={f / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start(self, name: str, *argv: str) -> None:
        self.daemons[name] = subprocess.Popen(
            self.command(*argv),
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / f"{name}.err", "w"),  # noqa: SIM115 - the daemon's
            env=self.env(),
        )

    def _wait_for_idle_node(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self._tail(name + '.err')}")
            state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False)
            if state.stdout.strip() == "idle":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is not idle after {timeout:g} s: {state.stdout}")
            time.sleep(0.2)

    # -- using ------------------------------------------------------------------------------

    def command(self, *argv: str) -> list[str]:
        """`argv` run in the Slurm's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.name}", *argv]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment for Slurm's commands: this Slurm's configuration, and no
        SLURM_* of an allocation this process may run in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        return subprocess.run(
            self.command(*argv), capture_output=True, text=True, check=check, timeout=30, **kwargs
        )

    def submit(
        self,
        script: Path,
        *args: str,
        options: tuple[str, ...] = (),
        cwd: Path,
        env: dict[str, str],
    ) -> str:
        """`sbatch OPTIONS SCRIPT ARGS` from `cwd` with `env` added; the job's id."""
        argv = ["sbatch", "--parsable", *options, str(script), *args]
        done = self.run(*argv, cwd=cwd, env=self.env(env))
        return done.stdout.strip().split(";")[0]

    def wait(
        self, job_id: str, timeout: float, meanwhile: Callable[[], object] | None = None
    ) -> dict[str, str]:
        """Waits until the job has left the queue (polling squeue; `sbatch --wait` polls at 2, 8,
        32 s), calling `meanwhile()` at every poll; returns `scontrol show job`'s fields
        (JobState, ExitCode, ...). TimeoutError after `timeout` seconds (the job still runs;
        exiting the context cancels it)."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
            if meanwhile is not None:
                meanwhile()
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still queued or running after {timeout:g} s")
            time.sleep(0.2)
        shown = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(part.split("=", 1) for part in shown.split() if "=" in part)

    def strays(self) -> list[str]:
        """Processes in the namespace other than Slurm's daemons (slurmctld, its slurmscriptd,
        slurmd): a finished job's should be gone. As 'pid command line' strings."""
        daemons = {str(self.daemons[name].pid) for name in ("slurmctld", "slurmd")}
        found = [_describe(pid) for pid in self._pids() if pid not in daemons]
        return [line for line in found if not line.endswith(": slurmscriptd")]

    def log(self, name: str) -> str:
        """A daemon's log (slurmctld.log, slurmd.log), for failure messages."""
        return self._tail(name, 3000)

    def _tail(self, name: str, chars: int = 1000) -> str:
        path = self.folder / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- stopping ---------------------------------------------------------------------------

    def __exit__(self, *exc: object) -> None:
        slurm = [self.daemons.get("slurmctld"), self.daemons.get("slurmd")]
        if all(proc is not None and proc.poll() is None for proc in slurm):
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            self.run("scontrol", "shutdown", check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is None:
                continue
            if name == "munged" or proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._clear_namespace()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _clear_namespace(self) -> None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        if self.name not in listed.split():
            netns._unmount_if_unused(self._had_run_netns)
            return
        pids = self._pids()
        self.left_behind = [_describe(pid) for pid in pids]
        for signum in ("-TERM", "-KILL"):
            if pids:
                subprocess.run(["kill", signum, *pids], capture_output=True)
                time.sleep(1.0 if signum == "-TERM" else 0.2)
            pids = self._pids()
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
        netns._unmount_if_unused(self._had_run_netns)

    def _pids(self) -> list[str]:
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return done.stdout.split()


def _describe(pid: str) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid
    return f"{pid} {b' '.join(words).decode(errors='replace')[:100].strip()}"
