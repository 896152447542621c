"""A job task's membership of the job's Ray cluster: the head (learner 0), a node of its own on a
host other than the head's, the driver's connection, and token authentication.

All tasks on loopback: Ray is pinned to 127.0.0.1 (token authentication if --auth-token-file is
given). Across hosts Ray's services listen on each task's own address, so token authentication
is always on: every task reads the job's token from --auth-token-file, and learner 0 makes that
file if it does not exist yet (in its run folder when no path is given) and says so.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import IO

import psutil

from impala.errors import ConfigError, RunFailed
from impala.runtime import ray_support
from impala.runtime.hosts import JobSpec, is_this_machine, reserve, resolve


class Cluster:
    """Context manager: on entry this task is connected to the job's cluster (having started the
    head or a node as needed); on exit everything it started is stopped and the process's
    environment is as before."""

    def __init__(
        self,
        spec: JobSpec,
        timeout: float,
        out: IO[str],
        *,
        token_file: str | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.spec, self.timeout, self.out = spec, timeout, out
        self.token_file = token_file
        self.run_dir = run_dir
        self.head: ray_support.RayNode | None = None
        self.node: ray_support.RayNode | None = None
        self.reservation: socket.socket | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Cluster:
        spec = self.spec
        host, port = spec.own
        try:
            env = ray_support.ray_environment(
                loopback=spec.loopback_only, token_file=self._token_file()
            )
            if not spec.loopback_only and spec.job == "learner" and len(spec.learners) > 1:
                # gloo advertises the address the host name resolves to (often 127.0.x.1): make
                # it use the interface of this task's own address.
                env["GLOO_SOCKET_IFNAME"] = interface_of(resolve(host))
            self._stack.enter_context(ray_support.environment(env))
            if spec.job == "learner" and spec.task == 0:
                reserve(host, port).close()  # taken, or not this machine's: one line, exit 2
                self.head = ray_support.RayNode.head(host, port)
            else:
                self.reservation = reserve(host, port)
            self._connect(host)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _token_file(self) -> str | None:
        """The job's token file (made by learner 0 if missing), or None on loopback without one."""
        spec, path = self.spec, self.token_file
        if path is None and spec.loopback_only:
            return None
        first = spec.job == "learner" and spec.task == 0
        if path is None and not first:
            raise ConfigError(
                "this job spans hosts, so its Ray cluster requires token authentication: start "
                "this task with --auth-token-file FILE, a copy of the token learner 0 uses"
            )
        if path is None:
            path = str(self.run_dir / "ray-auth-token")
        if first and not os.path.exists(path):
            _write_token(path)
            print(
                f"{spec.name}: Ray token authentication is on; start every other task with "
                f"--auth-token-file {os.path.abspath(path)} (a copy of this file on its host)",
                file=self.out,
                flush=True,
            )
        try:
            with open(path) as f:
                if not f.read().strip():
                    raise ConfigError(f"--auth-token-file '{path}' is empty")
        except OSError as exc:
            raise ConfigError(f"cannot read --auth-token-file '{path}': {exc.strerror}") from None
        return path

    def _connect(self, host: str) -> None:
        """Waits for the head (saying so), starts this host's own node if the head is on another
        host (only then: a node that cannot reach its head gives up), and connects."""
        spec = self.spec
        wait = (
            f"{spec.name}: waiting for learner 0 at {spec.head_address} "
            f"(up to {self.timeout:.0f} s)"
        )
        deadline = time.monotonic() + self.timeout
        try:
            ray_support.wait_for_port(
                spec.head_address,
                timeout=self.timeout,
                waiting_message=None if self.head else wait,
                out=self.out,
                failed=self.head.failed if self.head else None,
            )
            if self.head is None and not is_this_machine(spec.head_host):
                self.node = ray_support.RayNode.worker(spec.head_address, host)
            ray_support.connect(
                spec.head_address,
                timeout=max(1.0, deadline - time.monotonic()),
                node_ip=resolve(host),
                node=self.node,
            )
        except TimeoutError as exc:
            failed = self.head.failed() if self.head else None
            raise RunFailed(f"{spec.name}: {failed or exc}") from None

    def __exit__(self, *exc: object) -> None:
        import sys

        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        for node in (self.node, self.head):
            if node is not None:
                node.stop()
        self.node = self.head = None
        if self.reservation is not None:
            self.reservation.close()
            self.reservation = None
        self._stack.close()


def _write_token(path: str) -> None:
    """A new random token, readable by its owner only."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write --auth-token-file '{path}': {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def interface_of(ip: str) -> str:
    """The name of this machine's network interface that holds `ip`."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addresses):
            return name
    raise ConfigError(f"no network interface of this machine holds {ip}")
