"""Ray plumbing: the environment Ray reads, starting and stopping nodes, connecting.

Facts this relies on (measured on the project's machines, Ray 2.60): with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every service binds 127.0.0.1 (right on loopback; a worker
node on another host then refuses to join); token authentication needs RAY_AUTH_MODE=token and
the same token in every process of the cluster; `ray start --block` drains for 30 s on SIGTERM
unless RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0. A node a task starts is a `ray start --block`
child of that task (through `node_guard`): signalling it stops every Ray process it started.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from impala.errors import ConfigError, RunFailed

COMMON_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # `ray start --block` drains for 30 s on SIGTERM by default; ours stop at once.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
OBJECT_STORE_BYTES = 2 * 10**9  # per node we start: unrolls and weights need little
# For drivers connecting to a cluster: give up on an unanswering or refusing GCS after 5 s (our
# connect loop tries again until --peer-timeout, and tells a refused token apart at once) and
# keep Ray's C++ warnings off the task's stderr (the core announces this level on fd 2 when it
# starts: `connect` sends fd 2 to a scratch file meanwhile).
DRIVER_ENV = {"RAY_gcs_server_port_wait_time_s": "5", "RAY_BACKEND_LOG_LEVEL": "error"}


def ray_environment(*, loopback: bool, token_file: str | None) -> dict[str, str | None]:
    """What Ray must read, in every process of a cluster (None: unset).

    On loopback, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 pins every Ray service to 127.0.0.1 (else
    Ray rewrites 127.0.0.1 to the machine's external address). Across hosts it must be unset: a
    worker node refuses to join otherwise, and services listen on each node's own address, so
    Ray's token authentication is on (the token read from `token_file`).
    """
    env: dict[str, str | None] = dict(COMMON_ENV)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0" if loopback else None
    if token_file is not None:
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=os.path.abspath(token_file),
            RAY_AUTH_TOKEN=None,
        )
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


@contextlib.contextmanager
def environment(values: dict[str, str | None], *, keep_users: bool = False) -> Iterator[None]:
    """`values` in os.environ (None: unset) for a while, then as before. With `keep_users`, a
    variable the user set already is left as it is (their cluster's auth settings)."""
    previous = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if keep_users and key in os.environ:
            continue
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    constants = sys.modules.get("ray._private.ray_constants")
    patched = constants is not None and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    if patched:
        # Ray was imported before and read the variable then: without this it would rewrite
        # 127.0.0.1 in a cluster address to the machine's external address.
        before, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False
    _reload_auth_settings()
    try:
        yield
    finally:
        if patched:
            constants.ENABLE_RAY_CLUSTER = before
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_auth_settings()


def _reload_auth_settings() -> None:
    """Ray caches its auth mode and token per process when it first reads them; make it read
    them again (a process may use several clusters, each with its own token)."""
    raylet = sys.modules.get("ray._raylet")
    if raylet is None:
        return  # not loaded yet: it will read the environment as it is now
    with contextlib.suppress(Exception):  # these are Ray's internals: best effort
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ray_executable() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.path.exists(candidate) else (shutil.which("ray") or "ray")


class RayNode:
    """A Ray node this process starts (`ray start --block`, in a temp dir of its own) and stops.

    Several nodes may share one file system (several tasks on one host, or network-namespace
    "hosts" in tests): each gets its own temp dir, worker ports and agent ports.
    """

    def __init__(self, args: list[str]) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="impala-ray-")
        self.log = tempfile.TemporaryFile()
        # Through a guard that stops the node if this task dies without cleaning up.
        guard = [sys.executable, "-m", "impala.runtime.node_guard", str(os.getpid())]
        guard += ["--remove-dir", self.temp_dir]
        command = [_ray_executable(), "start", "--block", "--disable-usage-stats"]
        self.proc = subprocess.Popen(
            [
                *guard,
                *command,
                *args,
                f"--temp-dir={self.temp_dir}",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                "--dashboard-agent-listen-port=0",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C reaches the task, which stops the node
        )

    @classmethod
    def head(cls, host: str, port: int, num_cpus: int | None = None) -> RayNode:
        ip = socket.gethostbyname(host)
        cpus = [] if num_cpus is None else [f"--num-cpus={num_cpus}"]
        return cls(
            ["--head", f"--port={port}", f"--node-ip-address={ip}", "--include-dashboard=false"]
            + cpus
        )

    @classmethod
    def worker(cls, head_address: str, host: str) -> RayNode:
        return cls(
            [
                f"--address={head_address}",
                f"--node-ip-address={socket.gethostbyname(host)}",
                "--min-worker-port=0",  # nodes on one host must not share the default range
                "--max-worker-port=0",
            ]
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
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _local_ip_towards(host: str, port: int) -> str | None:
    """This machine's address on the route to `host:port` if something listens there, else None."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.getsockname()[0]
    except OSError:
        return None


def wait_for_port(
    address: str,
    *,
    timeout: float,
    waiting_message: str | None = None,
    out=None,
    failed=None,
) -> None:
    """Waits until something listens at `address` (printing `waiting_message` once if it must
    wait); TimeoutError after `timeout` s, or at once if `failed()` says the server died."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    said = False
    while _local_ip_towards(host, int(port)) is None:
        if failed is not None and failed():
            raise TimeoutError(failed())
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered at {address} within {timeout:.0f} s")
        if waiting_message and not said:
            print(waiting_message, file=out or sys.stdout, flush=True)
            said = True
        time.sleep(0.5)


def connect(
    address: str,
    *,
    timeout: float,
    node_ip: str | None = None,
    node: RayNode | None = None,
) -> None:
    """Connects this process to the Ray cluster at `address`, waiting up to `timeout` seconds.

    Until the head's port answers, only a TCP probe is made (ray.init itself would block for tens
    of seconds per try). The driver attaches to `node` (one this task started) if given, else to
    the node at `node_ip` (default: this machine's address on the route to the head).
    Raises TimeoutError naming the address when nothing answers in time, ConfigError when the
    cluster refuses this task's authentication token, RunFailed when `node` died.
    """
    import ray

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        if node is not None and node.failed():
            raise _node_error(node.failed())
        route_ip = _local_ip_towards(host, int(port))
        if route_ip is not None:
            try:
                with environment(DRIVER_ENV, keep_users=True), _stderr_discarded():
                    ray.init(
                        address=address,
                        logging_level="ERROR",
                        log_to_driver=False,
                        namespace="impala",
                        configure_logging=False,
                        _node_ip_address=node_ip or route_ip,
                        _temp_dir=node.temp_dir if node is not None else None,
                    )
                return
            except (ConnectionError, RuntimeError, ValueError) as exc:
                if _is_auth_error(exc):
                    raise _auth_error(address) from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered at {address} within {timeout:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _stderr_discarded() -> Iterator[None]:
    """Sends file descriptor 2 to a scratch file while Ray's core starts in this process: its C++
    logger writes there directly (a line announcing RAY_BACKEND_LOG_LEVEL, then warnings while a
    head refuses us), and what matters of that reaches the user as our own one-line error."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _is_auth_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{type(seen).__name__} {seen}"
        if "InvalidAuthToken" in text or "AuthenticationError" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _auth_error(address: str) -> ConfigError:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    mode = os.environ.get("RAY_AUTH_MODE")
    have = f"the token in {path}" if mode == "token" and path else "no token"
    return ConfigError(
        f"the Ray cluster at {address} refused {have}: give every task of the job the same "
        "--auth-token-file"
    )


def _node_error(line: str) -> Exception:
    if "InvalidAuthToken" in line or "AuthenticationError" in line:
        return ConfigError(
            f"this host's Ray node was refused by the head ({line.strip()[-160:]}): give every "
            "task of the job the same --auth-token-file"
        )
    return RunFailed(f"this host's Ray node failed to start: {line.strip()[-200:]}")


@contextlib.contextmanager
def local_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """A Ray session: a fresh local instance on loopback, or the existing cluster at `address`.

    A fresh instance is a guarded `ray start --head` (so even a SIGKILLed learner leaves no Ray
    process behind), listens on 127.0.0.1 only and requires a token made for this process (so
    other local users cannot run code in it either). For an existing cluster the user's own Ray
    settings (its auth mode and token) are kept. The process's environment is restored after.
    """
    if address is not None:
        address = cluster_address(address)
        loopback = _is_loopback_address(address.rsplit(":", 1)[0])
        env = ray_environment(loopback=loopback, token_file=None)
        env.pop("RAY_AUTH_MODE")  # whatever the user's cluster needs
    else:
        env = ray_environment(loopback=True, token_file=None)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_session_token())
        env["RAY_AUTH_TOKEN_PATH"] = None
    head = None
    with environment(env, keep_users=bool(address)):
        import ray

        try:
            if not address:
                port = free_port()
                head = RayNode.head("127.0.0.1", port, num_cpus=num_cpus)
                address = f"127.0.0.1:{port}"
                wait_for_port(address, timeout=120, failed=head.failed)
            connect(address, timeout=60, node_ip="127.0.0.1" if head else None)
            yield
        finally:
            ray.shutdown()
            if head is not None:
                head.stop()


def cluster_address(address: str) -> str:
    """The cluster address --ray-address names: HOST:PORT (the head's GCS port) as given, or for
    'auto' the one in RAY_ADDRESS, which Ray sets for the entrypoint of a Ray job (a KubeRay
    RayJob's included). ConfigError, one line, for anything else: an empty or malformed address
    must not fall back to a fresh local Ray, which would run every explorer on this machine."""
    text, source = address.strip(), ""
    if text == "auto":
        text, source = os.environ.get("RAY_ADDRESS", "").strip(), " (from RAY_ADDRESS)"
        if not text:
            raise ConfigError(
                "--ray-address auto reads RAY_ADDRESS, which is not set (Ray sets it for a Ray "
                "job's entrypoint); give the cluster's HOST:PORT"
            )
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--ray-address '{text}'{source} is not HOST:PORT, the address of a Ray cluster's "
            "head (say 10.0.0.5:6379), nor 'auto'"
        )
    return text


@functools.cache
def _session_token() -> str:
    """One random token per process for the fresh local instances it starts."""
    return secrets.token_hex(32)


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


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


def actor_alive(name: str, timeout: float = 3.0) -> bool:
    """Whether the named actor exists and answers (any method call; `status` on hubs)."""
    import ray

    try:
        ray.get(ray.get_actor(name).status.remote(), timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - gone, dead or unreachable: not alive for our purpose
        return False
