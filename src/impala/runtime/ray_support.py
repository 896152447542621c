"""Ray plumbing: the environment Ray needs here, starting and stopping a head, connecting.

Facts this relies on (see the project's machine notes): Ray binds the external interface unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; token authentication must be off on both ends of a cluster
started this way; usage stats are off. A head that a task starts is a `ray start --head --block`
child of that task: signalling it stops every Ray process it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from impala.errors import ConfigError, RunFailed

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
    # `ray start --block` drains for 30 s on SIGTERM by default; ours stop at once.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}


def set_ray_environment() -> dict[str, str | None]:
    """Sets what Ray reads at start (called by the runtime, never at import); returns the
    previous values, for `restore_environment`."""
    previous = {key: os.environ.get(key) for key in RAY_ENV}
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # Ray was imported before this call and read the variable then: without this it would
        # rewrite 127.0.0.1 in a cluster address to the machine's external address.
        constants.ENABLE_RAY_CLUSTER = False
    return previous


def restore_environment(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def check_port_free(host: str, port: int) -> None:
    """Raises ConfigError if `host:port` cannot be bound (taken, or not this machine's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: connections of an earlier run left in TIME_WAIT do not make a port taken;
        # a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((socket.gethostbyname(host), port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: port already taken ({exc.strerror})"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ray_executable() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.path.exists(candidate) else (shutil.which("ray") or "ray")


class RayNode:
    """A Ray node this process starts (`ray start --block`) and stops."""

    def __init__(self, args: list[str], temp_dir: str | None) -> None:
        set_ray_environment()
        self._temp_dir = temp_dir
        self.log = tempfile.TemporaryFile()
        # Through a guard that stops the node if this task dies without cleaning up.
        guard = [sys.executable, "-m", "impala.runtime.node_guard", str(os.getpid())]
        self.proc = subprocess.Popen(
            [*guard, _ray_executable(), "start", "--block", "--disable-usage-stats", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C reaches the task, which stops the node
        )

    @classmethod
    def head(cls, host: str, port: int) -> RayNode:
        ip = socket.gethostbyname(host)
        temp_dir = tempfile.mkdtemp(prefix="impala-ray-")
        return cls(
            [
                "--head",
                f"--port={port}",
                f"--node-ip-address={ip}",
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={free_port(ip)}",
                f"--temp-dir={temp_dir}",
            ],
            temp_dir,
        )

    @classmethod
    def worker(cls, head_address: str, host: str) -> RayNode:
        return cls(
            [f"--address={head_address}", f"--node-ip-address={socket.gethostbyname(host)}"], None
        )

    def failed(self) -> str | None:
        """The node's own words if it has exited, else None."""
        if self.proc.poll() is None:
            return None
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def _local_ip_towards(host: str, port: int) -> str | None:
    """This machine's address on the route to `host:port` if something listens there, else None."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.getsockname()[0]
    except OSError:
        return None


def connect(
    address: str,
    *,
    timeout: float,
    node_ip: str | None = None,
    waiting_message: str | None = None,
    out=None,
) -> None:
    """Connects this process to the Ray cluster at `address`, waiting up to `timeout` seconds.

    Until the head's port answers, only a TCP probe is made (ray.init itself would block for tens
    of seconds per try). This node's address is the one on the route to the head (on loopback,
    127.0.0.1), never a guess that could be an interface the head cannot reach.
    Raises TimeoutError naming the address when nothing answers in time.
    """
    set_ray_environment()  # before the first `import ray`: Ray reads some of it at import
    import ray

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    said = False
    while True:
        route_ip = _local_ip_towards(host, int(port))
        if route_ip is not None:
            try:
                ray.init(
                    address=address,
                    logging_level="ERROR",
                    log_to_driver=False,
                    namespace="impala",
                    configure_logging=False,
                    _node_ip_address=node_ip or route_ip,
                )
                return
            except (ConnectionError, RuntimeError, ValueError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered at {address} within {timeout:.0f} s")
        if waiting_message and not said:
            print(waiting_message, file=out or sys.stdout, flush=True)
            said = True
        time.sleep(0.5)


@contextlib.contextmanager
def local_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """A Ray session: a fresh local instance on loopback, or the existing cluster at `address`.
    The process's environment is restored afterwards."""
    previous = set_ray_environment()
    import ray

    try:
        if address:
            connect(address, timeout=60)
        else:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                namespace="impala",
                configure_logging=False,
                _node_ip_address="127.0.0.1",
            )
        yield
    finally:
        ray.shutdown()
        restore_environment(previous)


def wait_for_actor(name: str, timeout: float, what: str):
    """The named actor, once it exists; RunFailed naming `what` after `timeout` seconds."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() > deadline:
                raise RunFailed(f"{what} did not appear within {timeout:.0f} s") from None
            time.sleep(0.2)
