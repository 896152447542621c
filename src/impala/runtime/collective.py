"""Synchronous learners: gradient averaging and joint decisions over torch.distributed (gloo).

Every learner takes its own batch, the gradients are averaged with an all-reduce, and every
learner applies the same update, so all hold identical parameters (learner 0's initial ones are
broadcast first). Each turn of the learner loop the learners also agree, in one all-reduce, on
stopping (any learner's reason stops all), on updating (only when every one has a batch) and on
the step count of the whole job (the learning-rate schedule's progress).

When a learner fails it records the failure at hub 0 and leaves the group without entering
another collective; the others' collectives then break, and they stop naming that first failure
instead of hanging.

What must be trusted. The learners meet through hub 0 (a Ray actor: Ray's token authentication
guards it), then through torch.distributed's rendezvous store, which learner 0 serves on its own
address only (never on every interface), and exchange tensors over gloo's connections, which
listen on each learner's own interface (loopback for a job on loopback). Neither the store nor
gloo authenticates its peers or encrypts what it carries: whoever can reach those addresses (on
loopback, any local user) can disturb the rendezvous or feed the learners wrong numbers, so the
learners' network must be trusted with the training's integrity. Nothing received is run as
code: only tensors travel, and learner 0's optimizer state and counters go as a `torch.save`
archive that the others read with PyTorch's restricted unpickler (`weights_only=True`), which
refuses anything but tensors, numbers, strings and plain containers.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import socket
import time

import torch
from torch import nn

from impala.errors import RunFailed, one_line
from impala.loop import Decision
from impala.runtime import ray_support


class LearnerGroup:
    """This learner's membership of the group of `world_size` synchronous learners."""

    def __init__(self, rank: int, world_size: int, hub0, timeout: float) -> None:
        self.rank, self.world_size, self.hub0, self.timeout = rank, world_size, hub0, timeout
        self.joined = False
        self._store = None  # the rendezvous store (learner 0 serves it, the others connect)
        # A resumed job: learner 0 adds the steps the other learners' explorers made before the
        # checkpoint (its own tracker has only its own), so the schedule goes on where it was.
        self.steps_offset = 0
        self.last_steps = 0

    def join(self, head_host: str) -> None:
        """Rendezvous through hub 0: learner 0 serves torch.distributed's store on its own
        address (`head_host`) and publishes its port there; every learner waits at hub 0, in
        Python (a signal stops the wait), until all are present, and only then connects to the
        store and builds the gloo group, which then returns at once."""
        import ray
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout)
        if self.rank == 0:
            self._store, port = serve_store(head_host, self.world_size, timeout)
            ray.get(self.hub0.set_rendezvous.remote(f"{head_host}:{port}"))
        ray.get(self.hub0.arrive.remote(self.rank))
        deadline = time.monotonic() + self.timeout
        while True:
            address, present = ray.get(self.hub0.rendezvous.remote())
            if address is not None and len(present) == self.world_size:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(present))
                raise RunFailed(
                    f"learner {self.rank}: learner(s) {', '.join(map(str, missing))} did not "
                    f"join within {self.timeout:.0f} s (see --peer-timeout)"
                )
            time.sleep(0.2)

        def connect() -> None:
            if self._store is None:
                host, port = address.rsplit(":", 1)
                self._store = dist.TCPStore(
                    host, int(port), self.world_size, is_master=False, timeout=timeout
                )
            dist.init_process_group(
                "gloo",
                store=self._store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timeout,
            )

        self._collective("rendezvous", connect)
        self.joined = True

    def _collective(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as exc:  # gloo: a peer closed its connection or timed out
            raise RunFailed(self._broken(what, exc)) from None

    def _broken(self, what: str, exc: BaseException) -> str:
        """Names the first failure: the one a learner recorded at hub 0, else a learner whose
        hub is gone with it (a learner killed outright records nothing)."""
        import ray

        cause = None
        try:
            cause = ray.get(self.hub0.failure.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - hub 0 is gone: learner 0 is
            cause = "learner 0 is gone (its process ended)" if self.rank else None
        for rank in range(self.world_size):
            if cause is not None:
                break
            if rank != self.rank and not ray_support.actor_alive(f"hub-{rank}"):
                cause = f"learner {rank} is gone (its process ended)"
        cause = cause or f"another learner stopped answering ({one_line(exc)[:200]})"
        return f"learner {self.rank}: the learners' {what} broke: {cause}"

    def broadcast_parameters(self, model: nn.Module) -> None:
        import torch.distributed as dist

        for param in model.parameters():
            self._collective("start", lambda p=param: dist.broadcast(p.data, src=0))

    def average_gradients(self, model: nn.Module) -> None:
        """The learner's gradient hook: one all-reduce of all gradients as one flat tensor."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._collective("gradient averaging", lambda: dist.all_reduce(flat))
        flat /= self.world_size
        offset = 0
        for p, g in zip(model.parameters(), grads, strict=True):
            n = g.numel()
            average = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = average.clone()
            else:  # in place: the learner's gradients are views of one flat buffer
                p.grad.copy_(average)
            offset += n

    def decide(self, stop: bool, have_batch: bool, steps: int) -> Decision:
        import torch.distributed as dist

        control = torch.tensor(
            [float(stop), float(not have_batch), float(steps + self.steps_offset)],
            dtype=torch.float64,
        )
        self._collective("agreement", lambda: dist.all_reduce(control))
        stop_all = bool(control[0] > 0)
        self.last_steps = int(control[2])
        return Decision(
            stop=stop_all, update=not stop_all and control[1] == 0, steps=self.last_steps
        )

    def broadcast_learner_state(self, learner) -> None:
        """Learner 0's optimizer state, counters and APPO's target network to every learner (a
        resumed job: learner 0 loaded the checkpoint; the weights go with
        `broadcast_parameters`). Sent as bytes in a uint8 tensor, its length first; read back
        without unpickling (`decode_state`)."""
        import torch.distributed as dist

        length = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            payload = encode_state(
                {
                    "optimizer": learner.optimizer.state_dict(),
                    "updates": learner.updates,
                    "version": learner.store.version,
                    "target": None if learner.target is None else learner.target.state_dict(),
                }
            )
            length[0] = payload.numel()
        self._collective("start", lambda: dist.broadcast(length, src=0))
        if self.rank != 0:
            payload = torch.empty(int(length[0]), dtype=torch.uint8)
        self._collective("start", lambda: dist.broadcast(payload, src=0))
        if self.rank != 0:
            state = decode_state(payload, f"learner {self.rank}")
            learner.optimizer.load_state_dict(state["optimizer"])
            learner.updates = state["updates"]
            learner.store.assign(state["version"], learner.store.flat)
            if learner.target is not None:  # APPO's target network
                learner.target.load_state_dict(state["target"])

    def report_failure(self, line: str) -> None:
        """Records this learner's failure at hub 0 (first one wins) and leaves the group at once,
        so that the others' collectives break instead of waiting for the timeout."""
        import ray

        try:
            ray.get(self.hub0.report_failure.remote(self.rank, line), timeout=5)
        except Exception:  # noqa: BLE001 - best effort: the group breaks either way
            pass
        self.leave()

    def finish(self) -> None:
        """A clean end: wait for every learner (learner 0 keeps the Ray head up meanwhile)."""
        import torch.distributed as dist

        if self.joined:
            self._collective("end", dist.barrier)
        self.leave()

    def leave(self) -> None:
        import torch.distributed as dist

        if self.joined and dist.is_initialized():
            dist.destroy_process_group()
        self.joined = False
        self._store = None  # learner 0's: stops listening


def serve_store(host: str, world_size: int, timeout: datetime.timedelta):
    """Learner 0's rendezvous store (a `torch.distributed.TCPStore`) listening on `host` only,
    on a free port; returns it and the port.

    TCPStore would listen on every interface if it opened its socket itself, so it gets one
    already bound to `host` (`master_listen_fd`); it owns that descriptor from then on.
    """
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(world_size)
        port = sock.getsockname()[1]
        store = dist.TCPStore(
            host,
            port,
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,  # the learners wait at hub 0, where a signal can stop them
            master_listen_fd=sock.fileno(),
        )
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    sock.detach()
    return store, port


STATE_KEYS = frozenset({"optimizer", "updates", "version", "target"})


def encode_state(state: dict) -> torch.Tensor:
    """`state` (tensors, numbers, strings and containers of them) as a 1-D uint8 tensor: a
    `torch.save` archive, which `decode_state` reads back without running code."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)


def decode_state(payload: torch.Tensor, who: str) -> dict:
    """The learner state `encode_state` made (tensors on the CPU). Read with PyTorch's restricted
    unpickler (`weights_only=True`): anything but tensors, numbers, strings and containers is
    refused, so a crafted payload cannot run code here. RunFailed, one line, for a payload that
    is not such a state."""
    data = io.BytesIO(payload.numpy().tobytes())
    try:
        state = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused or malformed (UnpicklingError, ...)
        raise RunFailed(f"{who}: refused learner 0's state ({one_line(exc)[:200]})") from None
    if not isinstance(state, dict) or set(state) != STATE_KEYS:
        raise RunFailed(f"{who}: refused learner 0's state (not a learner state)")
    return state
