"""Real extra "hosts" for multi-host tests: Linux network namespaces on a bridge.

Each host is a namespace with its own address on a veth pair; the bridge lives in a namespace of
its own, so nothing touches the machine's own network and nothing leaves the namespaces (they
have no route out). Everything made here is removed on exit, processes in the namespaces first.
Needs root and iproute2; `available()` says why not otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    had_run_netns = run_netns_mounted()
    try:
        probe = f"impala-probe-{os.getpid()}"
        _ip("netns", "add", probe)
        _ip("netns", "delete", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot make a network namespace here ({getattr(exc, 'stderr', exc)})"
    finally:
        _unmount_if_unused(had_run_netns)
    return None


class Hosts:
    """`count` hosts named by `names`, with addresses 10.77.0.1, .2, ... (a context manager)."""

    def __init__(self, count: int) -> None:
        tag = f"impala-{os.getpid()}-{time.monotonic_ns() % 100000}"
        self.bridge = f"{tag}-br"
        self.names = [f"{tag}-{chr(ord('a') + i)}" for i in range(count)]
        self.addresses = [f"10.77.0.{i + 1}" for i in range(count)]
        self._had_run_netns = run_netns_mounted()

    def __enter__(self) -> Hosts:
        try:
            _ip("netns", "add", self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
                peer = f"p{i}"
                _ip("netns", "add", name)
                _ip(
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "netns",
                    self.bridge,
                )
                _ip("-n", self.bridge, "link", "set", peer, "master", "br0")
                _ip("-n", self.bridge, "link", "set", peer, "up")
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def command(self, host: int, *argv: str) -> list[str]:
        """`argv` run on host `host` (inside its namespace)."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def __exit__(self, *exc: object) -> None:
        listed = _ip("netns", "list", check=False).stdout
        for name in [*self.names, self.bridge]:
            if name not in listed:
                continue
            for signum in ("-TERM", "-KILL"):
                pids = _ip("netns", "pids", name, check=False).stdout.split()
                if pids:
                    subprocess.run(["kill", signum, *pids], capture_output=True)
                    time.sleep(1.0 if signum == "-TERM" else 0.2)
            _ip("netns", "delete", name, check=False)
        _unmount_if_unused(self._had_run_netns)


def run_netns_mounted() -> bool:
    """Whether /run/netns is a mount point. (`os.path.ismount` misses it where /run is no file
    system of its own: `ip netns add` bind-mounts the folder onto itself, same device.)"""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == "/run/netns" for line in f)


def _unmount_if_unused(had_run_netns: bool) -> None:
    """`ip netns add` bind-mounts /run/netns onto itself; undo that if it was not there before
    and no namespace is left."""
    if had_run_netns or _ip("netns", "list", check=False).stdout.strip():
        return
    if run_netns_mounted():
        subprocess.run(["umount", "/run/netns"], capture_output=True)
        subprocess.run(["rmdir", "/run/netns"], capture_output=True)
