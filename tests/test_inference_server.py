"""`--inference server` (dynamic batching, `impala.runtime.inference`): the server's batched
answers are the explorer's own network's, a run with it learns, survives an explorer and the
server SIGKILLed mid-run and stops cleanly, and what it cannot do is refused in one line."""

import contextlib
import copy
import functools
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import envs_for_tests  # noqa: F401  (registers DictCues-v0)
import numpy as np
import psutil
import pytest
import torch
from conftest import (
    assert_gone,
    metrics,
    project_children,
    run_cli,
    shm_entries,
    start_cli,
    stop_with,
    train_cli,
    wait_for_learning,
    wait_until,
)
from device_standin import StandInCuda

from impala import config
from impala.agent.explorer import ModelPolicy
from impala.agent.factory import build_model
from impala.agent.params import ParameterStore
from impala.envs import make_vector_env, probe_env
from impala.runtime.inference import (
    CORE,
    DIAL_STEP,
    FORWARD,
    HELLO,
    LOGITS,
    Server,
    ServerPolicy,
    StopExploring,
    _dial,
    make_layout,
)


def _observations(env_id: str, n: int, seed: int):
    """`n` observations of `env_id` as an explorer keeps them, a few steps into its games."""
    vec = make_vector_env(env_id, n)
    obs, _ = vec.reset(seed=seed)
    for _ in range(3):
        obs, *_ = vec.step(vec.action_space.sample())
    spec = probe_env(env_id).obs
    vec.close()
    return spec.to_network(obs)


REAL_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    "env_id, core, device",
    [
        ("MinAtar/Breakout-v1", "ff", "cpu"),
        ("CartPole-v1", "ff", "cpu"),
        ("CartPole-v1", "lstm", "cpu"),
        ("envs_for_tests:DictCues-v0", "lstm", "cpu"),
        ("MinAtar/Breakout-v1", "lstm", "stand-in"),
        pytest.param("MinAtar/Breakout-v1", "lstm", "cuda", marks=REAL_CUDA),
    ],
)
def test_one_batched_pass_answers_each_explorer_as_its_own_network_would(env_id, core, device):
    """Two explorers' requests (4 and 3 rows) served by one forward pass: each gets the policy
    parameters (and values, and the next LSTM state) its own copy of the network computes for
    its rows, and the version of the weights used. MinAtar's frames are images (stored
    frames-last, the server turns them back); CartPole's MLP acts in numpy in an explorer;
    DictCues' observations are a picture, a vector and a Discrete part. On a GPU (the stand-in
    of `tests/device_standin.py`, which refuses what CUDA refuses, and a real one where there
    is one) the server's inputs move to the device and its answers back to the host buffers."""
    if device == "cpu":
        context, where = contextlib.nullcontext(), torch.device("cpu")
    else:
        context = StandInCuda() if device == "stand-in" else contextlib.nullcontext()
        where = torch.device("cuda")
    # fp32: the answers are compared with the float32 network's (the default `auto` takes bf16
    # for a conv net on a CPU with native bf16)
    settings = {"env": env_id, "core": core, "envs_per_explorer": 4, "explorer_precision": "fp32"}
    cfg = config.resolve(settings)
    env = probe_env(env_id)
    torch.manual_seed(0)
    model = build_model(cfg, env)
    store = ParameterStore(*ParameterStore.allocate(model))
    store.publish(model)  # version 1
    layout = make_layout(cfg, env)
    buffers = [layout.allocate() for _ in range(2)]
    with context:
        server = Server(cfg, env, layout, buffers, store, where)
        assert all(p.device.type == where.type for p in server.model.parameters())
    rows = (4, 3)
    obs = [_observations(env_id, n, seed) for n, seed in zip(rows, (1, 2), strict=True)]
    kinds = (CORE, CORE) if core == "lstm" else (LOGITS, FORWARD)
    for buffer, o in zip(buffers, obs, strict=True):
        for key, value in env.obs.stored(o).items():
            buffer[key][: len(value)] = torch.from_numpy(np.ascontiguousarray(value))
    inputs = []
    if core == "lstm":
        for i, (buffer, n) in enumerate(zip(buffers, rows, strict=True)):
            g = torch.Generator().manual_seed(i)
            state = (torch.randn(n, cfg.core_size, generator=g), torch.randn(n, cfg.core_size))
            inputs.append(
                (
                    np.arange(n, dtype=np.int64) % 2,
                    np.linspace(-1, 1, n).astype(np.float32),
                    np.array([True, False, False, True][:n]),
                    state,
                )
            )
            for key, value in zip(
                ("prev_action", "prev_reward", "first"), inputs[-1], strict=False
            ):
                buffer[key][:n] = torch.from_numpy(value)
            buffer["h"][:n], buffer["c"][:n] = state
    with context:
        server.serve(
            [(i, kind, n, 7 + i) for i, (kind, n) in enumerate(zip(kinds, rows, strict=True))]
        )
    assert server.version == 1
    own = ModelPolicy(copy.deepcopy(model).requires_grad_(False), store)
    own.refresh()
    with torch.inference_mode():
        for i, n in enumerate(rows):
            answer = {k: v[:n].numpy() for k, v in buffers[i].items()}
            if core == "lstm":
                logits, values, (h, c) = own.core_step(obs[i], *inputs[i])
                np.testing.assert_allclose(answer["next_h"], h.numpy(), atol=1e-5)
                np.testing.assert_allclose(answer["next_c"], c.numpy(), atol=1e-5)
                np.testing.assert_allclose(answer["values"], values, atol=1e-5)
            else:
                logits = own.logits(obs[i])
                if kinds[i] == FORWARD:
                    np.testing.assert_allclose(answer["values"], own.values(obs[i]), atol=1e-5)
            np.testing.assert_allclose(answer["logits"], logits, atol=1e-5)
            assert np.abs(answer["logits"]).sum() > 0


def test_cartpole_learns_with_the_inference_server(tmp_path):
    """`impala train --inference server` on the local runtime, as a user starts it: CartPole to
    a mean return of 200 (about 130k steps at the defaults), every action answered by the
    server (its forward passes served more rows than one explorer's environments on average:
    requests of both explorers were batched together), and nothing left behind."""
    before = shm_entries()
    out, _, _, records = train_cli(
        tmp_path,
        "--env",
        "CartPole-v1",
        "--inference",
        "server",
        "--total-steps",
        "600000",
        "--target-return",
        "200",
        "--log-interval",
        "1",
        timeout=400,
    )
    assert "done (target return)" in out, out[-1000:]
    last = records[-1]
    assert last["return_mean"] >= 200
    assert last["inference_restarts"] == 0
    # The versions recorded are those the server acted with: the slots bound the lag to a few
    # updates (a wrong version, e.g. the first, would grow with every update).
    assert last["policy_lag"] < 10
    assert last["inference_rows"] >= last["steps"]  # every step acted by the server
    assert last["inference_rows"] / last["inference_batches"] > 16  # --envs-per-explorer
    assert shm_entries() == before


@pytest.fixture
def private_tmp():
    """A TMPDIR of the test's own (short: a Unix socket's path must fit in 107 bytes, or the
    server listens under /tmp): the server's listening folder must be gone at the end."""
    folder = Path(tempfile.mkdtemp(prefix="impala-test-", dir="/tmp"))
    yield folder, dict(os.environ, TMPDIR=str(folder))
    shutil.rmtree(folder, ignore_errors=True)


def _listening_folders(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith("impala-inference-")]


def _server_run(run_dir: Path, env: dict, *extra: str):
    """`impala train` on CartPole with the server, `extra` flags, metrics every 0.3 s."""
    return start_cli(
        "train",
        "--env",
        "CartPole-v1",
        "--inference",
        "server",
        *extra,
        "--run-dir",
        str(run_dir),
        "--log-interval",
        "0.3",
        env=env,
    )


def test_an_explorer_and_the_server_sigkilled_mid_run(tmp_path, private_tmp):
    """The server SIGKILLed with requests read and not answered, then an explorer SIGKILLed
    with its request outstanding (fault points, at the instant a test cannot hit from
    outside): each is started again with a line naming it, explorers waiting on the dead
    server are served by the new one, the run ends on its step budget, and no process,
    /dev/shm entry or listening folder remains."""
    folder, env = private_tmp
    kill_server, kill_explorer = tmp_path / "kill-server", tmp_path / "kill-explorer"
    env["IMPALA_FAULTS"] = f"inference!{kill_server},inference-wait!{kill_explorer}"
    before = shm_entries()
    run_dir = tmp_path / "r"
    proc = _server_run(run_dir, env, "--total-steps", "300000")
    children = []
    try:
        wait_for_learning(run_dir)
        children = project_children(psutil.Process(proc.pid))
        assert len(children) == 3  # two explorers and the server
        assert len(_listening_folders(folder)) == 1
        for trigger, counter in ((kill_server, "inference_restarts"), (kill_explorer, None)):
            trigger.touch()
            wait_until(lambda t=trigger: not t.exists(), 60, f"{trigger.name} consumed")
            if counter is not None:
                wait_until(lambda c=counter: metrics(run_dir)[-1][c] == 1, 60, "its restart")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.strip() == "", err
    assert "inference server failed: killed by SIGKILL; restarting it" in out, out
    assert out.count("failed: killed by SIGKILL; restarting it") == 2, out
    assert "done (step budget)" in out
    last = metrics(run_dir)[-1]
    assert last["inference_restarts"] == 1 and last["explorer_restarts"] == 1
    assert last["steps"] >= 300_000
    assert_gone(children, timeout=30)
    assert project_children(psutil.Process()) == []
    assert shm_entries() == before
    assert _listening_folders(folder) == []  # the server's socket folder was removed


def _server_process(learner: psutil.Process) -> psutil.Process:
    """The inference server among the learner's children: the one listening on the socket."""
    for child in project_children(learner):
        with contextlib.suppress(psutil.Error):
            if any(str(c.laddr).endswith("server.sock") for c in child.net_connections("unix")):
                return child
    return None


def _server_restarted_after(act, run_dir: Path, env: dict, *extra: str):
    """A 200k-step CartPole run with the server, `act(server process)` once it learns, waited
    until the server was started again and the run ended: (proc, out, err, the old server)."""
    proc = _server_run(run_dir, env, *extra, "--total-steps", "200000")
    try:
        wait_for_learning(run_dir)
        learner = psutil.Process(proc.pid)
        server = wait_until(lambda: _server_process(learner), 30, "the server's socket")
        act(server)
        wait_until(lambda: metrics(run_dir)[-1]["inference_restarts"] == 1, 60, "a restart")
        wait_until(lambda: _server_process(learner), 30, "the new server's socket")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return proc, out, err, server


def test_a_hung_server_is_killed_and_restarted(tmp_path, private_tmp):
    """A server that stops making progress (SIGSTOPped here, as a wedged GPU driver call would
    leave it) is killed after --explorer-timeout and started again with a line naming it;
    explorers waiting on it meanwhile are not taken for hung (they beat while they wait)."""
    _, env = private_tmp
    run_dir = tmp_path / "r"
    # --explorer-timeout: short, but not so short that a loaded machine's explorer seems hung
    _, out, _, server = _server_restarted_after(
        psutil.Process.suspend, run_dir, env, "--explorer-timeout", "8"
    )
    assert "inference server failed: no sign of progress for" in out, out
    assert "hung (see --explorer-timeout); restarting it" in out
    last = metrics(run_dir)[-1]
    assert last["explorer_restarts"] == 0 and last["inference_restarts"] == 1, out
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


def test_a_server_sigtermed_alone_is_started_again_in_a_new_folder(tmp_path, private_tmp):
    """SIGTERM to the server alone (a user's `kill`, with the learner alive): the server removes
    its listening folder on the way out (it cannot know the learner still runs: see
    `_terminated`), the runtime makes the folder anew and starts it again, and the run ends
    on its step budget with nothing left behind."""
    folder, env = private_tmp
    run_dir = tmp_path / "r"
    _, out, err, _ = _server_restarted_after(psutil.Process.terminate, run_dir, env)
    assert err.strip() == "", err
    assert "inference server failed: killed by SIGTERM; restarting it" in out, out
    assert "done (step budget)" in out
    assert metrics(run_dir)[-1]["steps"] >= 200_000
    assert _listening_folders(folder) == []


def test_the_servers_sigterm_removes_its_folder_while_its_parent_lives(tmp_path):
    """The handler removes the folder whoever sent SIGTERM: a learner SIGKILLed while it has
    several threads hands its children to one of its dying threads first, so the signal can
    arrive while getppid() still names it (a test on getppid() left the folder behind)."""
    import multiprocessing

    from impala.runtime.inference import _terminated

    folder = tmp_path / "impala-inference-x"
    folder.mkdir()
    (folder / "server.sock").touch()
    ready = multiprocessing.get_context("fork").Event()

    def server() -> None:
        signal.signal(signal.SIGTERM, functools.partial(_terminated, str(folder)))
        ready.set()
        time.sleep(60)

    child = multiprocessing.get_context("fork").Process(target=server)
    child.start()
    try:
        assert ready.wait(30)
        os.kill(child.pid, signal.SIGTERM)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGTERM
    assert not folder.exists()


def test_an_explorer_dialling_a_server_that_never_answers_beats_and_stops_when_asked(tmp_path):
    """A listener that queued the explorer's connection and never answers the handshake (a
    server SIGSTOPped, or wedged, between its listen and its accept): the explorer beats while
    it waits and stops when the run does. Before, it blocked in the handshake without a beat,
    and the runtime killed it as hung beside the hung server (seen as a flaky
    test_a_hung_server_is_killed_and_restarted)."""
    cfg = config.resolve({"env": "CartPole-v1"})
    env = probe_env("CartPole-v1")
    layout = make_layout(cfg, env)
    address = str(tmp_path / "server.sock")
    beats = []
    outcome = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(address)
        listener.listen(1)  # queues connections; nobody accepts them

        def dial() -> None:
            policy = ServerPolicy(
                0,
                env,
                layout,
                layout.allocate(),
                address,
                os.urandom(32),
                go_on=lambda: len(beats) < 4,
                beat=lambda: beats.append(time.monotonic()),
            )
            try:
                policy._connection()
            except StopExploring:
                outcome.append("stopped")

        thread = threading.Thread(target=dial, daemon=True)
        thread.start()
        thread.join(60)
        stuck = thread.is_alive()
    assert not stuck, f"the explorer blocked in the handshake after {len(beats)} beats"
    assert outcome == ["stopped"] and len(beats) == 4


def test_a_dialled_connection_says_hello_and_then_waits_without_a_limit(tmp_path):
    """`_dial` against the standard library's Listener: the handshake passes, HELLO arrives, and
    the connect/handshake limits are lifted once connected (an answer slower than DIAL_STEP is
    still received, not taken for a lost server)."""
    import multiprocessing.connection

    address = str(tmp_path / "server.sock")
    authkey = os.urandom(32)
    heard = []
    with multiprocessing.connection.Listener(address, "AF_UNIX", authkey=authkey) as listener:

        def serve() -> None:
            with listener.accept() as conn:
                heard.append(conn.recv_bytes())
                time.sleep(3 * DIAL_STEP)
                conn.send_bytes(b"answer")
                with contextlib.suppress(EOFError):
                    conn.recv_bytes()  # until the client closes

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        conn = _dial(address, authkey, HELLO.pack(7), DIAL_STEP)
        try:
            assert conn.recv_bytes() == b"answer"
        finally:
            conn.close()
        thread.join(30)
    assert heard == [HELLO.pack(7)]
    with pytest.raises(multiprocessing.AuthenticationError):
        with multiprocessing.connection.Listener(address, "AF_UNIX", authkey=authkey) as other:
            threading.Thread(target=lambda: _accept_quietly(other), daemon=True).start()
            _dial(address, os.urandom(32), HELLO.pack(0), DIAL_STEP).close()


def _accept_quietly(listener) -> None:
    with contextlib.suppress(Exception):
        listener.accept().close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_stopped_learner_leaves_no_server_explorer_or_folder(tmp_path, private_tmp, signum):
    """Ctrl-C stops the server and the explorers with the run. A learner SIGKILLed runs no
    clean-up of its own: the server, told by Linux that its parent died (SIGTERM), removes
    its listening folder and ends; the explorers end too."""
    folder, env = private_tmp
    before = shm_entries()
    run_dir = tmp_path / "r"
    proc = _server_run(run_dir, env)
    try:
        wait_for_learning(run_dir)
        children = project_children(psutil.Process(proc.pid))
        assert len(children) == 3
        assert len(_listening_folders(folder)) == 1
    finally:
        _, out, err = stop_with(proc, signum, timeout=90)
    if signum == signal.SIGINT:
        assert proc.returncode == 130, err
        assert out.strip().splitlines()[-1].startswith("stopped (SIGINT)"), out
        assert err.strip() == "", err
    assert_gone(children, timeout=30)
    assert shm_entries() == before
    assert _listening_folders(folder) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runtime", "serial"], "--inference server needs --runtime local"),
        (["--runtime", "ray"], "--inference server needs --runtime local"),
        (["--algo", "reinforce"], "--inference server needs --algo vtrace"),
        (["--sync", "episode"], "--sync episode cannot hold"),
    ],
)
def test_what_the_server_cannot_do_is_one_line(args, message):
    proc = run_cli("train", "--env", "CartPole-v1", "--inference", "server", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_corridors_episode_sync_yields_to_the_server():
    """The corridor's preset (the seed's) syncs weights per episode, which the server cannot
    hold: asked for the server, the preset's value yields; a user's own --sync episode is
    still refused."""
    assert config.Config().sync == "episode"
    assert config.Config(inference="server").sync == "unroll"
    with pytest.raises(config.ConfigError, match="--sync episode cannot hold"):
        config.Config(inference="server", sync="episode")


def test_the_job_form_refuses_the_server_in_one_line():
    start = time.monotonic()
    proc = run_cli("-l", "127.0.0.1:1", "-e", "127.0.0.1:2", "--inference", "server")
    assert proc.returncode == 2, proc.stderr
    assert "the job form's explorer tasks run the policy themselves" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - start < 120  # refused before anything waits for a peer
