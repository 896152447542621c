"""The seed prototype's job command lines, on Ray:

    impala -l HOST:PORT[,...] -e HOST:PORT[,...] -j learner|explorer -t INDEX [train options]

One process per task, started by hand in any order, on any hosts. Learner task 0 starts a Ray
head at its own address; every other task joins that cluster (on another host it first starts a
Ray node there), checks that it was started with the same host lists and settings, and waits,
saying so, up to --peer-timeout for peers that are not up yet. Each learner task owns a hub (its
inbox and weights board, a Ray actor); explorers spread their unrolls over the hubs round robin.
Several learners train synchronously: gradients are averaged with torch.distributed (gloo on
CPU) before every step, so all learners hold the same parameters.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
from typing import IO, Any

import torch
from torch import nn

from impala.agent import Learner, ParameterStore, ReplayBuffer, rollout_spec
from impala.agent.buffer import allocate, unrolls_to_batch
from impala.agent.worker import ExplorerWorker
from impala.config import Config
from impala.envs import EnvInfo
from impala.errors import ConfigError
from impala.metrics import Tracker
from impala.runtime import common, ray_support
from impala.runtime.hub import Hub

# Settings that every task of one job must share (besides the host lists).
SHARED_FIELDS = (
    "env",
    "algo",
    "net",
    "num_hidden",
    "num_layers",
    "unroll_length",
    "envs_per_explorer",
    "buffer",
    "gamma",
    "max_steps_per_episode",
    "sync",
)
PUBLISH_INTERVAL = 0.01  # seconds between weight publications to the hub
REPLAY_BURST = 0.02  # seconds a single learner samples the replay buffer between hub visits


class JobFailed(RuntimeError):
    """A task cannot go on (a peer never came, or went away); the message is one line."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    learners: tuple[tuple[str, int], ...]
    explorers: tuple[tuple[str, int], ...]
    job: str
    task: int

    @property
    def head_address(self) -> str:
        host, port = self.learners[0]
        return f"{socket.gethostbyname(host)}:{port}"

    @property
    def own(self) -> tuple[str, int]:
        return (self.learners if self.job == "learner" else self.explorers)[self.task]

    def description(self, cfg: Config) -> dict[str, Any]:
        return {
            "learner_hosts": ",".join(f"{h}:{p}" for h, p in self.learners),
            "explorer_hosts": ",".join(f"{h}:{p}" for h, p in self.explorers),
            **{k: getattr(cfg, k) for k in SHARED_FIELDS},
        }


def parse_hosts(text: str, flag: str) -> tuple[tuple[str, int], ...]:
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
    everything = learners + explorers
    if len(set(everything)) != len(everything):
        raise ConfigError("an address appears twice in --learner-hosts/--explorer-hosts")
    tasks = learners if job == "learner" else explorers
    if not 0 <= task < len(tasks):
        raise ConfigError(
            f"--task-index {task} is outside the {job} list "
            f"({len(tasks)} tasks: 0-{len(tasks) - 1})"
        )
    for host, _ in everything:
        try:
            socket.gethostbyname(host)
        except OSError:
            raise ConfigError(f"unknown host '{host}'") from None
    return JobSpec(learners, explorers, job, task)


def _reserve(host: str, port: int) -> socket.socket:
    """Listens on the task's own address for the task's lifetime (so two tasks cannot share it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((socket.gethostbyname(host), port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: port already taken ({exc.strerror})"
        ) from None
    return sock


def _is_local(host: str) -> bool:
    ip = socket.gethostbyname(host)
    return ip.startswith("127.") or ip in socket.gethostbyname_ex(socket.gethostname())[2]


class _Cluster:
    """This task's membership of the job's Ray cluster: started here, joined, or both."""

    def __init__(self, spec: JobSpec, cfg_timeout: float, out: IO[str]) -> None:
        self.spec, self.timeout, self.out = spec, cfg_timeout, out
        self.head: ray_support.RayNode | None = None
        self.node: ray_support.RayNode | None = None
        self.reservation: socket.socket | None = None

    def __enter__(self) -> _Cluster:
        spec = self.spec
        host, port = spec.own
        try:
            if spec.job == "learner" and spec.task == 0:
                ray_support.check_port_free(host, port)
                self.head = ray_support.RayNode.head(host, port)
            else:
                self.reservation = _reserve(host, port)
                head_host = spec.learners[0][0]
                if not (_is_local(host) and _is_local(head_host)):
                    self.node = ray_support.RayNode.worker(spec.head_address, host)
            wait = (
                f"{spec.job} {spec.task}: waiting for learner 0 at {spec.head_address} "
                f"(up to {self.timeout:.0f} s)"
            )
            try:
                ray_support.connect(
                    spec.head_address,
                    timeout=self.timeout,
                    waiting_message=None if self.head else wait,
                    out=self.out,
                )
            except TimeoutError as exc:
                failed = self.head.failed() if self.head else None
                raise JobFailed(f"{spec.job} {spec.task}: {failed or exc}") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for node in (self.node, self.head):
            if node is not None:
                node.stop()
        if self.reservation is not None:
            self.reservation.close()


def _get_actor(name: str, timeout: float, what: str):
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() > deadline:
                raise JobFailed(f"{what} did not appear within {timeout:.0f} s") from None
            time.sleep(0.2)


def run_task(
    cfg: Config,
    spec: JobSpec,
    env: EnvInfo,
    *,
    peer_timeout: float,
    out: IO[str] | None = None,
    run_dir=None,
) -> int:
    """Runs one task of the job to its end; returns the process exit code."""
    out = out if out is not None else sys.stdout
    with _Cluster(spec, peer_timeout, out):
        if spec.job == "learner":
            tracker = Tracker(cfg, run_dir, out)
            try:
                model = _learner(cfg, spec, env, tracker, peer_timeout)
                tracker.maybe_log(force=True)
            finally:
                tracker.close()
            if run_dir is not None:
                torch.save(model.state_dict(), run_dir / "model.pt")
            result = tracker.result()
            print(
                f"learner {spec.task} done: {result.steps:,} steps, {result.updates:,} updates in "
                f"{result.seconds:.1f} s",
                file=out,
                flush=True,
            )
        else:
            _explorer(cfg, spec, env, peer_timeout, out)
    return 0


# --- learners ----------------------------------------------------------------------------------
class _GradientAverager:
    """Averages gradients over all learners (torch.distributed all-reduce, one flat tensor)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def __call__(self, model: nn.Module) -> None:
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(model.parameters(), grads, strict=False):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def _init_learner_group(spec: JobSpec, hub0, timeout: float) -> None:
    import datetime

    import ray
    import torch.distributed as dist

    if spec.task == 0:
        host = spec.head_address.rsplit(":", 1)[0]
        address = f"tcp://{host}:{ray_support.free_port(host)}"
        ray.get(hub0.set_rendezvous.remote(address))
    else:
        deadline = time.monotonic() + timeout
        while (address := ray.get(hub0.rendezvous.remote())) is None:
            if time.monotonic() > deadline:
                raise JobFailed(f"learner {spec.task}: learner 0 never opened the learners' group")
            time.sleep(0.2)
    dist.init_process_group(
        "gloo",
        init_method=address,
        rank=spec.task,
        world_size=len(spec.learners),
        timeout=datetime.timedelta(seconds=timeout),
    )


def _learner(
    cfg: Config, spec: JobSpec, env: EnvInfo, tracker: Tracker, timeout: float
) -> nn.Module:
    import ray
    import torch.distributed as dist

    torch.set_num_threads(1)
    common.seed_everything(cfg.seed)
    job = spec.description(cfg)
    hub_cls = ray.remote(num_cpus=0, max_concurrency=16)(Hub)
    hub = hub_cls.options(name=f"hub-{spec.task}").remote(
        spec.task, job, 4 * cfg.slots_per_batch + 8
    )
    if spec.task > 0:
        hub0 = _get_actor("hub-0", timeout, f"learner {spec.task}: learner 0's hub")
        mismatch = ray.get(hub0.check.remote(job))
        if mismatch:
            raise ConfigError(f"this task's settings differ from learner 0's: {mismatch}")
    else:
        hub0 = hub
    multi = len(spec.learners) > 1
    model = common.build_model(cfg, env)
    if multi:
        _init_learner_group(spec, hub0, timeout)
        for p in model.parameters():  # every learner starts from learner 0's parameters
            dist.broadcast(p.data, src=0)
    store = ParameterStore(*ParameterStore.allocate(model))
    learner = Learner(
        cfg, model, store, grad_sync=_GradientAverager(len(spec.learners)) if multi else None
    )
    generator = torch.Generator().manual_seed(cfg.seed + spec.task)
    replay = None
    if cfg.buffer == "replay":
        slots = cfg.replay_slots_per_explorer
        replay = ReplayBuffer(
            allocate(
                rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer),
                slots * len(spec.explorers),
            ),
            torch.zeros(len(spec.explorers), dtype=torch.int64),
            slots,
        )
    ray.get(hub.publish.remote(*_weights(store)))
    total = (
        cfg.steps_per_explorer * len(spec.explorers) if cfg.total_steps is None else cfg.total_steps
    )
    print(
        f"learner {spec.task}: up; waiting for explorers at {job['explorer_hosts']}",
        file=tracker.out,
        flush=True,
    )
    pending: list[dict] = []
    global_steps = 0
    last_publish = 0.0
    first_data_deadline = time.monotonic() + timeout
    seen_data = False
    try:
        while True:
            items, events, finished = ray.get(hub.drain.remote(64, 0.05))
            for event in events:
                print(f"learner {spec.task}: {event}", file=tracker.out, flush=True)
            for payload, info in items:
                seen_data = True
                tracker.on_unroll(info)
                if payload is None:
                    continue
                if replay is not None:
                    replay.upload(info.explorer, payload["local"], payload["count"])
                else:
                    pending.append(payload["unroll"])
            if not seen_data and time.monotonic() > first_data_deadline:
                raise JobFailed(
                    f"learner {spec.task}: no explorer sent anything within {timeout:.0f} s"
                )
            if replay is not None:
                ready = replay.num_slots_filled > 0
            else:
                ready = len(pending) >= cfg.slots_per_batch
            # The job ends when the step budget is spent or every explorer has made its -s steps
            # (and what they sent has been learned from).
            all_done = (
                finished >= len(spec.explorers) and not items and (replay is not None or not ready)
            )
            stop = tracker.should_stop() or global_steps >= total or all_done
            if multi:
                # All learners agree on stopping and on the step count before each joint update.
                control = torch.tensor([float(stop), float(tracker.steps), float(not ready)])
                dist.all_reduce(control)
                stop, global_steps = bool(control[0] > 0), int(control[1])
                ready = bool(control[2] == 0)  # every learner has a batch
            else:
                global_steps = tracker.steps
            if stop:
                break
            if not ready:
                continue
            # With the replay buffer a single learner keeps sampling for a short while between
            # two visits to its hub; synchronous learners make one joint update per round.
            burst_end = time.monotonic() + (
                REPLAY_BURST if replay is not None and not multi else 0.0
            )
            while True:
                if replay is not None:
                    batch = replay.sample(cfg.learn_batch_size, cfg.algo, generator)
                else:
                    batch = unrolls_to_batch(pending[: cfg.slots_per_batch], cfg.algo)
                    del pending[: cfg.slots_per_batch]
                tracker.on_update(learner.update(batch, min(1.0, global_steps / total)))
                if time.monotonic() >= burst_end:
                    break
            if time.monotonic() - last_publish > PUBLISH_INTERVAL:
                hub.publish.remote(*_weights(store))
                last_publish = time.monotonic()
            tracker.maybe_log()
    finally:
        try:
            ray.get(hub.finish.remote(), timeout=10)
            _wait_for_explorers(hub, spec, timeout=10)
        except Exception:  # noqa: BLE001 - shutting down; the cluster may already be gone
            pass
        if multi and dist.is_initialized():
            try:
                dist.barrier()  # learner 0 keeps the Ray head up until every learner is done
            finally:
                dist.destroy_process_group()
    return model


def _wait_for_explorers(hub, spec: JobSpec, timeout: float) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ray.get(hub.status.remote())
        if set(status["joined"]) <= set(status["finished"]):
            return
        time.sleep(0.1)


def _weights(store: ParameterStore) -> tuple[int, Any]:
    version, flat = store.snapshot()
    return version, flat.numpy()


# --- explorers ---------------------------------------------------------------------------------
def _explorer(cfg: Config, spec: JobSpec, env: EnvInfo, timeout: float, out: IO[str]) -> None:
    import ray
    from ray.exceptions import RayActorError

    torch.set_num_threads(1)
    me = f"explorer {spec.task}"
    hub0 = _get_actor("hub-0", timeout, f"{me}: learner 0's hub")
    mismatch = ray.get(hub0.check.remote(spec.description(cfg)))
    if mismatch:
        raise ConfigError(f"this task's settings differ from learner 0's: {mismatch}")
    hubs = [hub0] + [
        _get_actor(f"hub-{t}", timeout, f"{me}: learner {t}'s hub")
        for t in range(1, len(spec.learners))
    ]
    for hub in hubs:
        ray.get(hub.join.remote(spec.task))
    worker = ExplorerWorker(cfg, env, spec.task)
    deadline = time.monotonic() + timeout
    while (weights := ray.get(hub0.weights.remote(-1))) is None:
        if time.monotonic() > deadline:
            raise JobFailed(f"{me}: learner 0 published no weights within {timeout:.0f} s")
        time.sleep(0.1)
    worker.set_weights(*weights)
    print(
        f"{me}: joined {len(hubs)} learner(s); acting in {cfg.envs_per_explorer} x {cfg.env}",
        file=out,
        flush=True,
    )
    steps, episodes, returns = 0, 0, []
    last_print = time.monotonic()
    k = 0
    try:
        while steps < cfg.steps_per_explorer:
            hub = hubs[k % len(hubs)]
            k += 1
            weights = ray.get(hub.weights.remote(worker.version))
            if weights is not None:
                worker.set_weights(*weights)
            payload, info = worker.unroll()
            while True:
                status, _ = ray.get(hub.put.remote(payload, info))
                if status != "full":
                    break
                time.sleep(0.005)
            if status == "done":
                print(f"{me}: the learners have finished", file=out, flush=True)
                break
            steps += info.steps
            episodes += len(info.episode_returns)
            returns = (returns + info.episode_returns)[-100:]
            if time.monotonic() - last_print > 5.0:
                mean = f"{sum(returns) / len(returns):.2f}" if returns else "-"
                print(
                    f"{me}: steps {steps:,} episodes {episodes:,} mean return {mean} "
                    f"policy version {worker.version}",
                    file=out,
                    flush=True,
                )
                last_print = time.monotonic()
        for hub in hubs:
            hub.explorer_finished.remote(spec.task)
        print(f"{me} done: {steps:,} steps, {episodes:,} episodes", file=out, flush=True)
    except (RayActorError, ConnectionError) as exc:
        raise JobFailed(f"{me}: lost the learner ({type(exc).__name__})") from None
    finally:
        worker.close()
