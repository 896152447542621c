"""A job task's membership of the job's Ray cluster: the head (learner 0), a node of its own on a
host other than the head's, the driver's connection, and token authentication.

Ray's token authentication is always on: whoever attaches to a job's cluster can run code as the
job's user, and reach the learners' hubs. Every task reads the job's token from
--auth-token-file if given; learner 0 makes that file if it does not exist yet and says so.

All tasks on loopback: Ray is pinned to 127.0.0.1, and the other tasks find learner 0's token by
themselves. Without --auth-token-file, learner 0 writes a fresh token into its run folder. Either
way, before its head starts it publishes a copy in this user's private token folder
(`token_folder`, mode 0700, refused if anyone else could use it), named after the head's address,
and removes it when it ends; a task started without --auth-token-file reads it there once the
head answers. Across hosts Ray's services listen on each task's own address, and every task but
learner 0 needs --auth-token-file (learner 0 writes the file into its run folder when no path is
given).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import IO

import psutil

from impala.errors import ConfigError, RunFailed
from impala.runtime import ray_support
from impala.runtime.hosts import JobSpec, is_this_machine, reserve, resolve

TOKEN_FILE_NAME = "ray-auth-token"  # in learner 0's run folder
# Seconds a task waits for learner 0's published token once the head's port answers: learner 0
# publishes it before its head starts, so this only covers the moment learner 0 checks its port.
TOKEN_WAIT = 10.0


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
        first = spec.job == "learner" and spec.task == 0
        try:
            if first:
                reserve(host, port).close()  # taken, or not this machine's: one line, exit 2
            else:
                self.reservation = reserve(host, port)
            deadline = time.monotonic() + self.timeout
            token_file, token = self._token_file(), None
            if token_file is None:  # a job on loopback: learner 0's published copy
                self._wait_for_head()
                token_file, token = self._published_token()
            elif first and spec.loopback_only:
                self._publish(Path(token_file).read_text().strip())
            env = ray_support.ray_environment(loopback=spec.loopback_only, token_file=token_file)
            if token is not None:  # as read now: learner 0 removes its copy when it ends
                env["RAY_AUTH_TOKEN"] = token
            if spec.job == "learner" and len(spec.learners) > 1:
                # gloo listens on, and advertises, the address the host name resolves to (maybe
                # another interface's): make it use the interface of this task's own address
                # (the loopback interface for a job on loopback).
                own_ip = "127.0.0.1" if spec.loopback_only else resolve(host)
                env["GLOO_SOCKET_IFNAME"] = interface_of(own_ip)
            self._stack.enter_context(ray_support.environment(env))
            if first:
                self.head = ray_support.RayNode.head(host, port)
            self._connect(host, deadline)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _token_file(self) -> str | None:
        """The job's token file (made by learner 0 if missing), or None for a task other than
        learner 0 of a job on loopback started without one (it reads learner 0's published
        copy)."""
        spec, path = self.spec, self.token_file
        first = spec.job == "learner" and spec.task == 0
        if path is None and not first:
            if spec.loopback_only:
                return None
            raise ConfigError(
                "this job spans hosts, so its Ray cluster requires token authentication: start "
                "this task with --auth-token-file FILE, a copy of the token learner 0 uses"
            )
        if path is None:
            path = str(self.run_dir / TOKEN_FILE_NAME)
            if spec.loopback_only:  # a fresh one for this run: the other tasks find its copy
                _replace_private(Path(path), secrets.token_hex(32))
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

    def _publish(self, token: str) -> None:
        """Learner 0 of a job on loopback: a copy of its token for the job's other tasks, in this
        user's token folder, removed when this task ends."""
        path = published_token_path(self.spec.head_address)
        _replace_private(path, token)
        self._stack.callback(_unpublish, path, token)

    def _published_token(self) -> tuple[str, str]:
        """(path, token) of learner 0's published token, once the head answers; ConfigError, one
        line saying what to do, if there is none."""
        spec = self.spec
        path = published_token_path(spec.head_address)
        deadline = time.monotonic() + TOKEN_WAIT
        while (token := read_private(path)) is None:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"found no Ray token of learner 0 at {spec.head_address} in {path}: learner "
                    "0 puts it there for tasks of its user on its machine; start this task as "
                    f"that user, or with --auth-token-file RUN_DIR/{TOKEN_FILE_NAME} (learner "
                    "0's run folder)"
                )
            time.sleep(0.2)
        return str(path), token

    def _wait_for_head(self) -> None:
        """Waits until the head's port answers (saying so once if it must wait); RunFailed after
        --peer-timeout or when this task's own head died."""
        spec = self.spec
        wait = (
            f"{spec.name}: waiting for learner 0 at {spec.head_address} "
            f"(up to {self.timeout:.0f} s)"
        )
        try:
            ray_support.wait_for_port(
                spec.head_address,
                timeout=self.timeout,
                waiting_message=None if self.head else wait,
                out=self.out,
                failed=self.head.failed if self.head else None,
            )
        except TimeoutError as exc:
            failed = self.head.failed() if self.head else None
            raise RunFailed(f"{spec.name}: {failed or exc}") from None

    def _connect(self, host: str, deadline: float) -> None:
        """Waits for the head (at once if it answered already), starts this host's own node if
        the head is on another host (only then: a node that cannot reach its head gives up), and
        connects by `deadline`."""
        spec = self.spec
        self._wait_for_head()
        try:
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


def token_folder() -> Path:
    """This user's folder for the tokens learner 0 tasks on loopback publish: TMPDIR/impala-UID,
    made with mode 0700 if missing. ConfigError, one line, if it is anything but a folder of
    this user's that nobody else may use (another user could then read or plant tokens)."""
    folder = Path(tempfile.gettempdir()) / f"impala-{os.getuid()}"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot make the job token folder {folder}: {exc.strerror}") from None
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"refusing the job token folder {folder}: it must be a folder (not a link) of this "
            "user's that nobody else may read or write (mode 0700); remove it, or give every "
            "task --auth-token-file"
        )
    return folder


def published_token_path(head_address: str) -> Path:
    """Where learner 0 of the job whose head is at `head_address` publishes its token."""
    return token_folder() / f"ray-token-{head_address.replace(':', '-')}"


def read_private(path: Path) -> str | None:
    """The token in `path`, or None if there is none; ConfigError, one line, if the file is a
    link, or not this user's alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the job token {path}: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(f"refusing the job token {path}: not this user's file alone")
        return f.read().strip() or None


def _replace_private(path: Path, token: str) -> None:
    """Writes `token` to `path` atomically (a reader sees the old file or the whole new one),
    readable by its owner only."""
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    except OSError as exc:
        raise ConfigError(f"cannot write a token into {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _unpublish(path: Path, token: str) -> None:
    """Removes learner 0's published token, unless another job's learner 0 has replaced it."""
    with contextlib.suppress(OSError, ConfigError):
        if read_private(path) == token:
            path.unlink()


def interface_of(ip: str) -> str:
    """The name of this machine's network interface that holds `ip`."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addresses):
            return name
    raise ConfigError(f"no network interface of this machine holds {ip}")
