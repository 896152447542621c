"""A job task's membership of the job's Ray cluster: the head (learner 0), a node of its own on a
host other than the head's, the driver's connection, and token authentication.

Everything on loopback: Ray is pinned to 127.0.0.1. Across hosts: Ray's services listen on each
task's own address, so the cluster runs with Ray's token authentication (`RAY_AUTH_MODE=token`)
and nothing reachable from the network runs code without the job's token.
"""

from __future__ import annotations

import socket
from typing import IO

from impala.errors import RunFailed
from impala.runtime import ray_support
from impala.runtime.hosts import JobSpec, is_this_machine, reserve, resolve


class Cluster:
    """Context manager: on entry this task is connected to the job's cluster (having started the
    head or a node as needed); on exit everything it started is stopped."""

    def __init__(
        self, spec: JobSpec, timeout: float, out: IO[str], *, token_file: str | None = None
    ) -> None:
        self.spec, self.timeout, self.out = spec, timeout, out
        self.token_file = token_file
        self.head: ray_support.RayNode | None = None
        self.node: ray_support.RayNode | None = None
        self.reservation: socket.socket | None = None
        self._previous_env: dict[str, str | None] | None = None

    def __enter__(self) -> Cluster:
        spec = self.spec
        host, port = spec.own
        try:
            self._previous_env = ray_support.set_ray_environment()
            if spec.job == "learner" and spec.task == 0:
                reserve(host, port).close()  # taken, or not this machine's: one line, exit 2
                self.head = ray_support.RayNode.head(host, port)
            else:
                self.reservation = reserve(host, port)
                if not is_this_machine(spec.head_host):
                    self.node = ray_support.RayNode.worker(spec.head_address, host)
            wait = (
                f"{spec.name}: waiting for learner 0 at {spec.head_address} "
                f"(up to {self.timeout:.0f} s)"
            )
            try:
                ray_support.connect(
                    spec.head_address,
                    timeout=self.timeout,
                    node_ip=resolve(host),
                    waiting_message=None if self.head else wait,
                    out=self.out,
                )
            except TimeoutError as exc:
                failed = self.head.failed() if self.head else None
                raise RunFailed(f"{spec.name}: {failed or exc}") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import sys

        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        for node in (self.node, self.head):
            if node is not None:
                node.stop()
        if self.reservation is not None:
            self.reservation.close()
        if self._previous_env is not None:
            ray_support.restore_environment(self._previous_env)
            self._previous_env = None
