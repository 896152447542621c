"""Dynamic batching (`--inference server`): one process runs the policy for all explorers.

The local runtime's explorers normally run mu themselves, each a batch of its own environments
per step. With an inference server they send their observations to one process that holds the
network on the learner's device (the GPU where there is one), and that process answers all the
explorers waiting at that moment with ONE forward pass over their observations concatenated
(the paper's dynamic batching).

Transport, for each explorer `i`, allocated up front by the runtime:

- shared buffers (torch shared memory, passed as file descriptors: no named segment): the
  request (the observation parts as stored in unrolls, frames-last; for an LSTM also the last
  action and reward, `first` and the state `(h, c)`) and the answer (policy parameters, values,
  the next state), `--envs-per-explorer` rows each;
- a connection to the server's listener, a Unix socket in a private (0700) temporary folder,
  authenticated with a random key, that carries only fixed-size struct-packed messages
  (`send_bytes`/`recv_bytes`; nothing is unpickled): HELLO (explorer index) once per
  connection, REQUEST (kind, rows, serial) after the explorer wrote its request, ANSWER (serial,
  weights version, rows) after the server wrote the answer.

Ownership of a buffer passes with the messages (the explorer writes its request only while no
request is outstanding, the server writes the answer only between a request and its answer):
no lock is shared, so a process killed at any instant holds nothing another waits for.

The server is stateless (the recurrent state travels with each request and stays with the
explorer), so each side survives the other's death:

- an explorer killed at any instant: the server drops its connection (end of file); the
  runtime starts a replacement as for any explorer, which connects again (a new connection for
  an index replaces the old one) and is served over the same buffers;
- the server killed at any instant: explorers waiting on it reconnect (beating their
  heartbeat meanwhile) and send their outstanding request again; the runtime starts a new
  server within the run's restart budget (`RestartBudget`), with a line naming it. A server
  that shows no progress for --explorer-timeout seconds is killed and restarted the same way.

The server refreshes its weights from the parameter store whenever the learner published a
newer version, before a batch; every answer carries the version it was computed with, which the
explorer records per step as `policy_version`, with the behaviour policy it was given: V-trace
corrects for exactly the policy that acted.

Fault points (`impala.faults`): `inference` (the server, a batch's requests read and not yet
answered) and `inference-wait` (an explorer, its request sent and not yet answered).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing.connection
import os
import queue
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from impala import distributions, faults
from impala.agent.buffer import frames_first
from impala.agent.params import ParameterStore
from impala.config import Config
from impala.envs import EnvInfo, spaces
from impala.errors import RunFailed
from impala.runtime import common
from impala.runtime.restarts import RestartBudget

HELLO = struct.Struct("<i")  # explorer index
REQUEST = struct.Struct("<iii")  # kind, rows, serial
ANSWER = struct.Struct("<iqi")  # serial, version of the weights, rows
LOGITS, FORWARD, CORE = 1, 2, 3  # request kinds: policy only, policy and values, an LSTM step
KINDS = (LOGITS, FORWARD, CORE)
MAX_MESSAGE = 64  # bytes: anything longer is not ours
BEAT, BATCHES, ROWS = 0, 1, 2  # the server's shared words (InferenceServer.stats)

POLL = 0.05  # seconds between an explorer's looks at its stop word while it waits
SERVER_POLL = 0.1  # seconds the server waits for requests before it beats again
HELLO_TIMEOUT = 5.0  # seconds a new connection has to say which explorer it is
DIAL_STEP = 0.5  # seconds an explorer's connect or handshake step may block before it beats
START_GRACE = 120.0  # seconds the server's start-up may take at least (see --explorer-timeout)
STOP_GRACE = 2.0  # seconds the server gets to exit on SIGTERM before SIGKILL


class StopExploring(Exception):
    """Raised in an explorer waiting for the server when the run stops (not a failure)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the per-explorer buffers hold: field -> (shape of one row, dtype), for `rows` rows
    (the explorer's environments). `request` fields: the observation parts by storage key
    (images frames-last) and, for an LSTM, `prev_action`, `prev_reward`, `first`, `h`, `c`;
    `answer` fields: `logits` `[P]`, `values` `[]` (or `[K]` with K tasks) and, for an LSTM,
    `next_h`, `next_c`. `initial_state`: an LSTM's start state of one row (h, c)."""

    rows: int
    request: dict[str, tuple[tuple[int, ...], torch.dtype]]
    answer: dict[str, tuple[tuple[int, ...], torch.dtype]]
    image_keys: tuple[str, ...]
    recurrent: bool
    initial_state: tuple[np.ndarray, np.ndarray] | None

    def allocate(self) -> dict[str, torch.Tensor]:
        """One explorer's request and answer buffers, in shared memory."""
        fields = self.request | self.answer
        return {
            key: torch.zeros((self.rows, *shape), dtype=dtype).share_memory_()
            for key, (shape, dtype) in fields.items()
        }

    def nbytes(self) -> int:
        """Bytes of one explorer's buffers."""
        fields = self.request | self.answer
        return sum(
            self.rows * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            for shape, dtype in fields.values()
        )


def make_layout(cfg: Config, env: EnvInfo) -> Layout:
    """The buffers' layout for `cfg`'s network on `env`: the value's shape and an LSTM's start
    state are read from one forward pass of the network on a sample observation (your own
    network's too)."""
    rows = cfg.envs_per_explorer
    request: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        part.key: (part.stored_shape, torch.from_numpy(np.zeros(0, part.dtype)).dtype)
        for part in env.obs.parts
    }
    image_keys = tuple(p.key for p in env.obs.parts if len(p.shape) == 3)
    model = common.build_model(cfg, env)
    recurrent = bool(getattr(model, "is_recurrent", False))
    action = env.action
    if recurrent:
        core = cfg.recurrent_state_size
        request |= {
            "prev_action": (tuple(action.action_shape), action.action_dtype),
            "prev_reward": ((), torch.float32),
            "first": ((), torch.bool),
            "h": ((core,), torch.float32),
            "c": ((core,), torch.float32),
        }
    probe = {k: torch.zeros((1, *shape), dtype=dtype) for k, (shape, dtype) in request.items()}
    sample = env.obs.to_network(env.obs.batch_of([env.obs.space.sample()]))  # values it takes
    for key, value in env.obs.stored(sample).items():
        probe[key] = torch.from_numpy(np.ascontiguousarray(value))
    obs = _network_obs(probe, image_keys)
    with torch.inference_mode():
        if recurrent:
            h0, c0 = model.initial_state(1)
            _, values, _ = model.unroll(
                spaces.map_obs(lambda part: part[None], obs),
                probe["prev_action"][None],
                probe["prev_reward"][None],
                torch.ones(1, 1, dtype=torch.bool),
                (h0, c0),
            )
            value_shape = tuple(values.shape[2:])
            start = (h0[0].float().numpy().copy(), c0[0].float().numpy().copy())
        else:
            value_shape = tuple(model(obs)[1].shape[1:])
            start = None
    answer: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "logits": ((action.params_size,), torch.float32),
        "values": (value_shape, torch.float32),
    }
    if recurrent:
        answer |= {"next_h": request["h"], "next_c": request["c"]}
    return Layout(rows, request, answer, image_keys, recurrent, start)


def _network_obs(fields: dict[str, torch.Tensor], image_keys: tuple[str, ...]) -> Any:
    """Request rows (storage fields, images frames-last) as the network takes them."""
    obs = {key: fields[key] for key in spaces.obs_keys(fields)}
    return spaces.from_batch({k: frames_first(v) if k in image_keys else v for k, v in obs.items()})


# --- the explorer's side -------------------------------------------------------------------------
class ServerPolicy:
    """An explorer's `ActingPolicy` (see `impala.agent.explorer`) answered by the inference
    server: it writes its request into its buffers, sends REQUEST and waits for ANSWER (beating
    `beat` meanwhile; `go_on()` false: StopExploring). A lost server (end of file) is waited for
    and the request sent again to its successor."""

    def __init__(
        self,
        index: int,
        env: EnvInfo,
        layout: Layout,
        buffers: dict[str, torch.Tensor],
        address: str,
        authkey: bytes,
        go_on: Callable[[], bool],
        beat: Callable[[], None],
    ) -> None:
        self.index, self.layout, self.address, self.authkey = index, layout, address, authkey
        self.obs_spec = env.obs
        self.action_spec: distributions.ActionSpec = env.action
        self.recurrent = layout.recurrent
        self.version = -1
        self.go_on, self.beat = go_on, beat
        self.views = {key: value.numpy() for key, value in buffers.items()}
        self.serial = 0
        self.conn: multiprocessing.connection.Connection | None = None

    def refresh(self) -> None:
        """Nothing to do: the server takes the newest weights before every batch."""

    def initial_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h0, c0 = self.layout.initial_state
        return torch.from_numpy(np.tile(h0, (n, 1))), torch.from_numpy(np.tile(c0, (n, 1)))

    def logits(self, obs: spaces.NetObs) -> np.ndarray:
        n = self._write_obs(obs)
        self._ask(LOGITS, n)
        return self.views["logits"][:n].copy()

    def values(self, obs: spaces.NetObs) -> np.ndarray:
        n = self._write_obs(obs)
        self._ask(FORWARD, n)
        return self.views["values"][:n].copy()

    def core_step(self, obs, prev_action, prev_reward, first, state):
        n = self._write_obs(obs)
        views = self.views
        views["prev_action"][:n] = prev_action
        views["prev_reward"][:n] = prev_reward
        views["first"][:n] = first
        views["h"][:n] = state[0].numpy()
        views["c"][:n] = state[1].numpy()
        self._ask(CORE, n)
        next_state = (
            torch.from_numpy(views["next_h"][:n].copy()),
            torch.from_numpy(views["next_c"][:n].copy()),
        )
        return views["logits"][:n].copy(), views["values"][:n].copy(), next_state

    def _write_obs(self, obs: spaces.NetObs) -> int:
        n = 0
        for key, value in self.obs_spec.stored(obs).items():
            n = len(value)
            self.views[key][:n] = value
        return n

    def _ask(self, kind: int, rows: int) -> None:
        """Sends the request in the buffers and waits for its answer, across server restarts."""
        self.serial = (self.serial + 1) % 2**31
        message = REQUEST.pack(kind, rows, self.serial)
        while True:
            conn = self._connection()
            try:
                conn.send_bytes(message)
                faults.point("inference-wait")  # tests: killed with a request outstanding
                while not conn.poll(POLL):
                    self.beat()  # waiting for the server is progress too
                    if not self.go_on():
                        raise StopExploring
                answer = conn.recv_bytes(MAX_MESSAGE)
            except (EOFError, OSError):  # the server is gone: ask its successor
                self._drop()
                continue
            if len(answer) != ANSWER.size:
                raise RuntimeError(f"the inference server sent {len(answer)} bytes, not an answer")
            serial, version, answered = ANSWER.unpack(answer)
            if serial != self.serial or answered != rows:
                raise RuntimeError(
                    f"the inference server answered request {serial} ({answered} rows) where "
                    f"request {self.serial} ({rows} rows) was outstanding"
                )
            self.version = version
            return

    def _connection(self) -> multiprocessing.connection.Connection:
        """The connection to the server, made (again) once it listens. Each try blocks for
        DIAL_STEP seconds at most, with a beat before it: a server that took the connection
        into its listener's backlog and then stopped (SIGSTOP, a wedged driver call) before it
        answered the handshake is the server's hang, which its own watchdog ends, not this
        explorer's."""
        while self.conn is None:
            self.beat()
            if not self.go_on():
                raise StopExploring
            try:
                self.conn = _dial(self.address, self.authkey, HELLO.pack(self.index), DIAL_STEP)
            except (OSError, EOFError, multiprocessing.AuthenticationError):
                time.sleep(POLL)  # not listening (yet), or slow: a server being (re)started
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self._drop()


def _dial(
    address: str, authkey: bytes, hello: bytes, step: float
) -> multiprocessing.connection.Connection:
    """`multiprocessing.connection.Client(address, "AF_UNIX", authkey)` and the HELLO sent,
    where the connect and each read of the handshake block for `step` seconds at most (the
    kernel's SO_SNDTIMEO / SO_RCVTIMEO: they end in BlockingIOError, an OSError), lifted once
    connected. `Client` itself has no limit: a listener that queued the connection and never
    answered would hold the caller for good. The handshake is the standard library's own
    (`answer_challenge`, `deliver_challenge`), as `Client` runs it."""
    seconds = max(int(step), 0)
    limit = struct.pack("ll", seconds, int((step - seconds) * 1e6))
    unlimited = struct.pack("ll", 0, 0)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
            sock.setsockopt(socket.SOL_SOCKET, option, limit)
        sock.connect(address)
        conn = multiprocessing.connection.Connection(sock.detach())
    finally:
        sock.close()  # detached: closes nothing once the connection owns the descriptor
    try:
        multiprocessing.connection.answer_challenge(conn, authkey)
        multiprocessing.connection.deliver_challenge(conn, authkey)
        conn.send_bytes(hello)
        with socket.socket(fileno=conn.fileno()) as view:  # the same socket, to lift the limits
            for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
                view.setsockopt(socket.SOL_SOCKET, option, unlimited)
            view.detach()
    except BaseException:
        conn.close()
        raise
    return conn


# --- the server ----------------------------------------------------------------------------------
def _accept(
    listener: multiprocessing.connection.Listener,
    arrivals: queue.SimpleQueue,
    num: int,
    closing: threading.Event,
) -> None:
    """The server's accepting thread: authenticated connections that say which explorer they
    are (HELLO) are handed to the serving loop; anything else is closed."""
    while not closing.is_set():
        try:
            conn = listener.accept()
        except (OSError, EOFError, multiprocessing.AuthenticationError):
            continue  # a client that died in the handshake, or the listener closed
        try:
            hello = conn.recv_bytes(MAX_MESSAGE) if conn.poll(HELLO_TIMEOUT) else b""
        except (EOFError, OSError):
            hello = b""
        if len(hello) != HELLO.size or not 0 <= HELLO.unpack(hello)[0] < num:
            conn.close()
            continue
        arrivals.put((HELLO.unpack(hello)[0], conn))


class Server:
    """The serving loop's state: the network on `device`, the explorers' buffers and their
    current connections (at most one per explorer index)."""

    def __init__(
        self,
        cfg: Config,
        env: EnvInfo,
        layout: Layout,
        buffers: list[dict[str, torch.Tensor]],
        store: ParameterStore,
        device: torch.device,
    ) -> None:
        from impala.agent.learner import uses_bf16

        self.layout, self.buffers, self.store, self.device = layout, buffers, store, device
        self.model = common.build_model(cfg, env).to(device)
        self.model.requires_grad_(False)
        store.check(self.model)
        precision = cfg.explorer_precision
        self.bf16 = (
            uses_bf16("auto", self.model, device) if precision == "auto" else (precision == "bf16")
        )
        self.version = -1
        self.conns: dict[int, multiprocessing.connection.Connection] = {}

    def refresh(self) -> None:
        """Takes the store's weights if the learner published newer ones (one copy to the
        device of a consistent snapshot)."""
        if self.store.version == self.version:
            return
        version, flat = self.store.snapshot()
        flat = flat.to(self.device)
        offset = 0
        with torch.no_grad():  # in place: the parameters keep their storage (cuDNN's LSTM too)
            for param in self.model.parameters():
                param.copy_(flat[offset : offset + param.numel()].view_as(param))
                offset += param.numel()
        self.version = version

    def connect(self, index: int, conn: multiprocessing.connection.Connection) -> None:
        old = self.conns.pop(index, None)
        if old is not None:  # a replacement explorer: its predecessor's connection is stale
            old.close()
        self.conns[index] = conn

    def drop(self, index: int) -> None:
        conn = self.conns.pop(index, None)
        if conn is not None:
            conn.close()

    def requests(self, timeout: float) -> list[tuple[int, int, int, int]]:
        """The requests of every explorer waiting now, `(index, kind, rows, serial)`, after at
        most `timeout` seconds; a connection that ended or sent what is not a request is
        dropped."""
        owners = {id(conn): index for index, conn in self.conns.items()}
        ready = multiprocessing.connection.wait(list(self.conns.values()), timeout=timeout)
        requests = []
        for conn in ready:
            index = owners[id(conn)]
            try:
                message = conn.recv_bytes(MAX_MESSAGE)
            except (EOFError, OSError):
                self.drop(index)  # the explorer is gone
                continue
            if len(message) != REQUEST.size:
                self.drop(index)
                continue
            kind, rows, serial = REQUEST.unpack(message)
            if kind not in KINDS or not 0 < rows <= self.layout.rows:
                self.drop(index)
                continue
            if (kind == CORE) != self.layout.recurrent:
                self.drop(index)
                continue
            requests.append((index, kind, rows, serial))
        return requests

    @torch.inference_mode()
    def serve(self, requests: list[tuple[int, int, int, int]]) -> None:
        """One forward pass over all `requests`' rows, the answers written and sent."""
        self.refresh()
        device = self.device

        def gathered(key: str) -> torch.Tensor:
            parts = [self.buffers[index][key][:rows] for index, _, rows, _ in requests]
            return torch.cat(parts).to(device, non_blocking=True)

        keys = self.layout.request
        obs = _network_obs({k: gathered(k) for k in spaces.obs_keys(keys)}, self.layout.image_keys)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
        values = state = None
        with autocast:
            if self.layout.recurrent:
                logits, values, state = self.model.unroll(
                    spaces.map_obs(lambda part: part[None], obs),
                    gathered("prev_action")[None],
                    gathered("prev_reward")[None],
                    gathered("first")[None],
                    (gathered("h"), gathered("c")),
                )
                logits, values = logits[0], values[0]
            elif any(kind == FORWARD for _, kind, _, _ in requests):
                logits, values = self.model(obs)
            else:
                logits = self.model.policy_logits(obs)
        outputs = {"logits": logits, "values": values}
        if state is not None:
            outputs |= {"next_h": state[0], "next_c": state[1]}
        outputs = {k: v.float().cpu() for k, v in outputs.items() if v is not None}
        offset = 0
        for index, _, rows, serial in requests:
            buffers = self.buffers[index]
            for key, value in outputs.items():
                buffers[key][:rows] = value[offset : offset + rows]
            offset += rows
            conn = self.conns.get(index)
            if conn is None:
                continue
            try:
                conn.send_bytes(ANSWER.pack(serial, self.version, rows))
            except OSError:
                self.drop(index)


def _terminated(folder: str, signum: int, _frame: object) -> None:
    """The server's SIGTERM: its listening folder removed, then the default end. Whoever sent
    it: the runtime's close() (which removes the folder as well), Linux at the learner's death
    (which no getppid() test can tell apart reliably: a SIGKILLed multi-threaded learner's
    children are first handed to one of its other, dying threads, so the signal can arrive
    while getppid() still names the learner), or a user (the runtime then starts the server
    again, and `InferenceServer.start` makes the folder anew)."""
    shutil.rmtree(folder, ignore_errors=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _server_main(
    cfg: Config,
    env: EnvInfo,
    layout: Layout,
    buffers: list[dict[str, torch.Tensor]],
    address: str,
    authkey: bytes,
    params: tuple,
    stats: torch.Tensor,
    report: multiprocessing.connection.Connection,
    parent: int,
) -> None:
    from impala.devices import resolve_device
    from impala.runtime.local import _die_with_parent

    # SIGTERM, not SIGKILL as for explorers, when the learner dies (SIGKILLed): the server then
    # removes its listening folder, which the dead learner cannot.
    _die_with_parent(parent, signal.SIGTERM)
    folder = os.path.dirname(address)
    signal.signal(signal.SIGTERM, functools.partial(_terminated, folder))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner decides when the server stops

    words = stats.numpy()  # written by this process only (see InferenceServer.stats)
    listener = None
    closing = threading.Event()
    try:
        device = resolve_device(cfg.device)
        if device.type == "cpu":
            torch.set_num_threads(cfg.learner_threads)
        server = Server(cfg, env, layout, buffers, ParameterStore(*params), device)
        try:
            os.unlink(address)  # a predecessor's, killed before it could remove it
        except FileNotFoundError:
            pass
        listener = multiprocessing.connection.Listener(address, "AF_UNIX", authkey=authkey)
        arrivals: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(
            target=_accept, args=(listener, arrivals, len(buffers), closing), daemon=True
        ).start()
        while os.getppid() == parent:
            words[BEAT] = time.monotonic_ns()
            while not arrivals.empty():
                server.connect(*arrivals.get())
            if not server.conns:
                time.sleep(POLL)
                continue
            requests = server.requests(SERVER_POLL)
            if requests:
                faults.point("inference")  # tests: killed with requests read, not answered
                server.serve(requests)
                words[BATCHES] += 1
                words[ROWS] += sum(rows for _, _, rows, _ in requests)
    except BaseException as exc:  # noqa: BLE001 - reported to the learner, which decides
        common.report_and_exit(report, exc)
    finally:
        closing.set()
        if listener is not None:
            listener.close()
        if os.getppid() != parent:  # the learner died: nobody else removes the folder
            shutil.rmtree(folder, ignore_errors=True)
        report.close()


# --- the runtime's side --------------------------------------------------------------------------
class InferenceServer:
    """The local runtime's inference server process: started, watched (dead or hung: started
    again within `restarts`, with a line on `out`) and stopped by the runtime; its buffers and
    listening folder live as long as this object."""

    def __init__(
        self,
        cfg: Config,
        env: EnvInfo,
        params: tuple,
        out: Any,
        restarts: RestartBudget,
        ctx: Any,
        write_trace: Callable[[str, common.ExplorerFailure], None],
    ) -> None:
        self.cfg, self.env, self.params, self.out = cfg, env, params, out
        self.restarts, self.ctx, self.write_trace = restarts, ctx, write_trace
        self.layout = make_layout(cfg, env)
        self.buffers = [self.layout.allocate() for _ in range(cfg.num_explorers)]
        # The server's words: its last beat (CLOCK_MONOTONIC ns, 0 before it started), forward
        # passes made and rows answered by all servers of the run.
        self.stats = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.authkey = os.urandom(32)
        self.folder = tempfile.mkdtemp(prefix="impala-inference-")  # mode 0700: ours only
        self.address = os.path.join(self.folder, "server.sock")
        if len(self.address) > 100:  # a Unix socket's path has ~107 bytes at most
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = tempfile.mkdtemp(prefix="impala-inference-", dir="/tmp")
            self.address = os.path.join(self.folder, "server.sock")
        self.proc: Any = None
        self.conn: Any = None
        self.failure: common.ExplorerFailure | None = None
        self.restarted = 0
        self._started_at = 0

    def client(self, index: int) -> tuple:
        """What explorer `index` needs to build its `ServerPolicy` (picklable for spawn)."""
        return self.layout, self.buffers[index], self.address, self.authkey

    def _make_folder(self) -> None:
        """The listening folder made again where a SIGTERMed server removed it; RunFailed if
        something else took its name meanwhile (it must be this user's, and private)."""
        try:
            os.mkdir(self.folder, 0o700)
        except FileExistsError:
            st = os.lstat(self.folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise RunFailed(
                    f"inference server: {self.folder} is not a private folder of this user"
                ) from None

    def start(self) -> None:
        self._make_folder()
        reader, writer = self.ctx.Pipe(duplex=False)
        self.stats[BEAT] = 0
        self._started_at = time.monotonic_ns()
        self.failure = None
        proc = self.ctx.Process(
            target=_server_main,
            args=(
                self.cfg,
                self.env,
                self.layout,
                self.buffers,
                self.address,
                self.authkey,
                self.params,
                self.stats,
                writer,
                os.getpid(),
            ),
            name="impala-inference",
            daemon=True,
        )
        self.proc, self.conn = proc, reader
        try:
            proc.start()
        finally:
            writer.close()

    def counters(self) -> dict[str, int]:
        """What the run's metrics report of the server: its restarts, the forward passes it
        made and the rows it answered (rows / batches: the batch dynamic batching reached)."""
        return {
            "inference_restarts": self.restarted,
            "inference_batches": int(self.stats[BATCHES]),
            "inference_rows": int(self.stats[ROWS]),
        }

    def _read_failure(self) -> None:
        try:
            while self.conn is not None and self.conn.poll():
                message = self.conn.recv()
                if isinstance(message, common.ExplorerFailure):
                    self.failure = message
        except (EOFError, OSError):
            pass

    def check(self) -> None:
        """Starts the server again if it died, or kills and starts it again if it showed no
        progress for --explorer-timeout seconds; RunFailed once the restart budget is spent."""
        proc = self.proc
        if proc is None:
            return
        if proc.exitcode is None:
            timeout = self.cfg.explorer_timeout
            beat = int(self.stats[BEAT])
            allowed = timeout if beat else max(timeout or 0.0, START_GRACE)
            silent = (time.monotonic_ns() - (beat or self._started_at)) / 1e9
            if timeout is None or silent <= allowed:
                return
            what = "no sign of progress" if beat else "not started"
            self.failure = common.ExplorerFailure(
                f"{what} for {silent:.0f} s: hung (see --explorer-timeout)", ""
            )
            proc.kill()
            proc.join()
        proc.join()
        self._read_failure()
        failure = self.failure
        why = failure.line if failure else common.describe_exit(proc.exitcode)
        if failure is not None and failure.trace:
            self.write_trace("inference server", failure)
        self._close_conn()
        self.proc = None
        line = self.restarts.take("inference server", why)
        self.restarted += 1
        print(line, file=self.out, flush=True)
        self.start()

    def _close_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        """Stops the server (SIGTERM, SIGKILL after a grace) and removes its folder."""
        proc = self.proc
        if proc is not None and proc.pid is not None:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=STOP_GRACE)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.proc = None
        self._close_conn()
        shutil.rmtree(self.folder, ignore_errors=True)
