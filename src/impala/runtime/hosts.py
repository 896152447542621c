"""The seed's host lists: parsing `-l`/`-e`, this task's place in them, and what every task of a
job must agree on."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Any

from impala.config import Config
from impala.errors import ConfigError

# Settings a task may choose for itself; every other setting changes what is learned or how, so
# it must be the same on every task of a job (checked when a task joins).
TASK_LOCAL_FIELDS = frozenset(
    {
        "task_index",
        "run_dir",
        "log_interval",
        "print_steps",
        "max_seconds",
        "target_return",
        "runtime",
        "ray_address",
        "learner_threads",
        "explorer_nice",
        "max_restarts",
        "restart_window",
        "explorer_timeout",
    }
)

Address = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    learners: tuple[Address, ...]
    explorers: tuple[Address, ...]
    job: str
    task: int

    @property
    def head_host(self) -> str:
        return resolve(self.learners[0][0])

    @property
    def head_address(self) -> str:
        return f"{self.head_host}:{self.learners[0][1]}"

    @property
    def own(self) -> Address:
        return (self.learners if self.job == "learner" else self.explorers)[self.task]

    @property
    def name(self) -> str:
        return f"{self.job} {self.task}"

    @property
    def loopback_only(self) -> bool:
        """Every task on this machine's loopback: Ray can stay on 127.0.0.1."""
        return all(is_loopback(host) for host, _ in self.learners + self.explorers)

    def description(self, cfg: Config) -> dict[str, Any]:
        """The host lists and every setting that must be the same on every task."""
        shared = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TASK_LOCAL_FIELDS}
        return {
            "learner_hosts": ",".join(f"{h}:{p}" for h, p in self.learners),
            "explorer_hosts": ",".join(f"{h}:{p}" for h, p in self.explorers),
            **shared,
        }


def parse_hosts(text: str, flag: str) -> tuple[Address, ...]:
    """'h1:p1,h2:p2' -> ((h1, p1), (h2, p2)); ConfigError naming the bad entry otherwise."""
    hosts = []
    for entry in text.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{flag}: '{entry}' is not host:port (port 1-65535)")
        hosts.append((host, int(port)))
    return tuple(hosts)


def make_spec(learner_hosts: str, explorer_hosts: str, job: str, task: int) -> JobSpec:
    learners = parse_hosts(learner_hosts, "--learner-hosts")
    explorers = parse_hosts(explorer_hosts, "--explorer-hosts")
    resolved = [(resolve(h), p) for h, p in learners + explorers]
    if len(set(resolved)) != len(resolved):
        raise ConfigError("an address appears twice in --learner-hosts/--explorer-hosts")
    tasks = learners if job == "learner" else explorers
    if not 0 <= task < len(tasks):
        raise ConfigError(
            f"--task-index {task} is outside the {job} list "
            f"({len(tasks)} tasks: 0-{len(tasks) - 1})"
        )
    return JobSpec(learners, explorers, job, task)


def resolve(host: str) -> str:
    """The IPv4 address of `host`; ConfigError naming it if it has none."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise ConfigError(f"unknown host '{host}'") from None


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(resolve(host)).is_loopback


def is_this_machine(host: str) -> bool:
    """Whether `host` names an address of this machine (loopback, or one it can bind)."""
    ip = resolve(host)
    if ipaddress.ip_address(ip).is_loopback:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, 0))
        except OSError:
            return False
    return True


def reserve(host: str, port: int) -> socket.socket:
    """Listens on the task's own address for the task's lifetime (so two tasks cannot share it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((resolve(host), port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {_why(exc)}") from None
    return sock


def _why(exc: OSError) -> str:
    if exc.errno == 98:  # EADDRINUSE
        return f"port already taken ({exc.strerror})"
    if exc.errno == 99:  # EADDRNOTAVAIL
        return "not an address of this machine (start each task on the host its address names)"
    return exc.strerror or str(exc)
