import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

torch.set_num_threads(1)

TESTS = Path(__file__).parent
PROGRAM = [sys.executable, "-m", "impala.cli"]


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def project_children(proc: psutil.Process | None = None) -> list:
    """Live descendants, less multiprocessing's resource tracker (the standard library starts it
    once per interpreter and it ends with the interpreter)."""
    kids = []
    for child in (proc or psutil.Process()).children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                kids.append(child)
        except psutil.NoSuchProcess:
            pass
    return kids


def explorer_processes(parent: psutil.Process | None = None) -> list:
    """The local runtime's explorer processes under `parent` (default: this process)."""
    return [p for p in project_children(parent) if "multiprocessing.spawn" in " ".join(p.cmdline())]


def default_sigint() -> None:
    """A `preexec_fn` for the tests' subprocesses: SIGINT as a user's shell leaves it. A shell
    that started pytest in the background (CI, `cmd &`) leaves SIGINT ignored, children inherit
    that, and impala keeps an ignored SIGINT ignored (as a background job asked), so a test that
    sends SIGINT to a process started without this would wait for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args, env=None, cwd=None, prefix=()) -> subprocess.Popen:
    """`impala ARGS` as a real process with default signal dispositions (SIGINT works)."""
    return subprocess.Popen(
        [*prefix, *PROGRAM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        preexec_fn=default_sigint,
    )


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """`impala ARGV` in this process: its exit code (argparse's --help and errors exit through
    SystemExit) and what it printed."""
    from impala.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(*args, timeout=120, env=None, input=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROGRAM, *args], capture_output=True, text=True, timeout=timeout, env=env, input=input
    )


def train_cli(tmp_path: Path, *args, timeout=240) -> tuple[str, str, Path, list[dict]]:
    """`impala train ARGS` into a fresh run folder; asserts it succeeded. Returns its stdout,
    stderr, the run folder and the metrics records."""
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--run-dir", str(run_dir), *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr, run_dir, metrics(run_dir)


def env_with_tests_on_path() -> dict:
    """The environment for a subprocess that imports the tests' helper modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_learning(run_dir: Path, timeout: float = 90.0, updates: int = 1) -> None:
    wait_until(
        lambda: any(r.get("updates", 0) >= updates for r in metrics(run_dir)),
        timeout,
        f"{updates} learner updates in {run_dir}",
    )


def stop_with(proc: subprocess.Popen, signum: int, timeout: float = 30.0):
    """Sends `signum`, waits; returns (seconds to exit, stdout, stderr)."""
    start = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return time.monotonic() - start, out, err


def assert_gone(procs, timeout: float = 10.0) -> None:
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, [p.pid for p in alive]


def ray_processes(marker: str | None = None) -> list[str]:
    """Ray's own processes on this machine (optionally only those whose command line holds
    `marker`, e.g. a temp dir), as 'pid cmdline' strings."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.info["name"] in ("gcs_server", "raylet") or cmd.startswith("ray::"):
            if marker is None or marker in cmd:
                found.append(f"{proc.pid} {cmd[:100]}")
    return found


def ray_temp_dirs() -> set[str]:
    """The temp dirs of Ray nodes the project started (`RayNode`) that still exist."""
    root = Path(tempfile.gettempdir())
    return {str(path) for path in root.glob("impala-ray-*")}


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


def hang_guard(seconds: float, bound: float, what: str, record=None) -> None:
    """A hang guard: fails only when `seconds` (a measured duration) reached `bound`, a limit
    far above any healthy run on a busy 2-core machine, so that the outcome does not depend on
    the machine's speed. The figure is printed (shown with `pytest -rA`) and, given pytest's
    `record_property` as `record`, kept in the JUnit XML, for the README's figures to quote."""
    if record is not None:
        record(what.replace(" ", "_"), round(seconds, 2))
    print(f"{what}: {seconds:.2f} s (hang guard {bound:g} s)")
    assert seconds < bound, f"{what} took {seconds:.1f} s (hang guard {bound:g} s)"
