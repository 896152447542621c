"""Checkpoints and resume: the file format, exact resume of the serial runtime, the local
runtime's learner SIGKILLed and resumed, damaged checkpoints, changed settings, TensorBoard and
the progress display."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import (
    assert_gone,
    explorer_processes,
    hang_guard,
    metrics,
    run_cli,
    run_main,
    shm_entries,
    start_cli,
    train_cli,
    wait_until,
)

from impala import checkpoint
from impala.config import resolve
from impala.errors import ConfigError
from impala.shutdown import StopSignals
from impala.training import train


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _StopAfter(io.StringIO):
    """An output stream that asks the run to stop (like a Ctrl-C) once it has printed `lines`
    progress lines."""

    def __init__(self, signals: StopSignals, lines: int) -> None:
        super().__init__()
        self.signals, self.lines = signals, lines

    def write(self, text: str) -> int:
        if text.startswith(("steps ", "task ")):
            self.lines -= 1
            if self.lines == 0:
                self.signals.request(signal.SIGINT)
        return super().write(text)


# --- the file ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_the_newest_and_ignores_half_written_files(tmp_path):
    state = {
        "config": {"env": "CartPole-v1"},
        "record": {},
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "optimizer": {"state": {0: {"ms": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]},
        "counters": {"steps": 0},
        "rng": checkpoint.rng_state(),
        "source": {"generator": torch.Generator().manual_seed(3).get_state()},
    }
    for steps in (100, 200, 300, 400):
        state["counters"] = {"steps": steps, "updates": steps // 10}
        checkpoint.save(state, tmp_path, keep=3)
    names = [p.name for p in checkpoint.listed(tmp_path)]
    assert names == ["ckpt-000000000200.pt", "ckpt-000000000300.pt", "ckpt-000000000400.pt"]
    # A run killed while writing leaves only a .tmp file, which is never read.
    (checkpoint.folder(tmp_path) / "ckpt-000000000500.pt.tmp").write_bytes(b"\x80\x02half")
    path, loaded = checkpoint.latest(tmp_path)
    assert path.name == "ckpt-000000000400.pt"
    assert loaded["counters"] == {"steps": 400, "updates": 40}
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["version"] == checkpoint.FORMAT_VERSION


def test_random_generator_states_round_trip():
    rng = np.random.default_rng(5)
    saved = checkpoint.numpy_rng_state(rng)
    torch.manual_seed(1)
    np.random.seed(2)
    global_state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), rng.random(3))
    checkpoint.set_rng_state(global_state)
    checkpoint.set_numpy_rng_state(rng, saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert np.array_equal(rng.random(3), expected[2])


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    good = {"config": {}, "model": {}, "counters": {"steps": 1}}
    path = checkpoint.save(good, tmp_path, keep=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="damaged or truncated"):
        checkpoint.load(path)
    path.write_bytes(b"not a checkpoint at all")  # never one: says so, not "damaged"
    with pytest.raises(ConfigError, match=r"is not a checkpoint \(not a file PyTorch wrote\)"):
        checkpoint.load(path)
    torch.save({"something": "else"}, path)
    with pytest.raises(ConfigError, match="not an impala checkpoint"):
        checkpoint.load(path)


# --- exact resume (serial) ---------------------------------------------------------------------
SERIAL_RUNS = {
    "cartpole-fifo": dict(env="CartPole-v1", total_steps=24_000),
    "corridor-replay": dict(total_steps=12_000),  # the seed's replay buffer
    "lstm": dict(env="CartPoleNoVelocity-v1", core="lstm", core_size=16, total_steps=6_000),
    # APPO: its target network and circular buffer (and the draws from it) are kept too
    "appo": dict(
        env="CartPole-v1", loss="appo", appo_passes=3, appo_target_interval=4, total_steps=12_000
    ),
    # the paper's replay experiment (the learner's ring of sequences) with a policy-lag limit
    "replay-mix": dict(
        env="CartPole-v1",
        replay_fraction=0.5,
        replay_size=100,
        max_policy_lag=1,
        total_steps=12_000,
    ),
    # continuous actions: the environments replay float actions (the fallback preset: replay)
    "box": dict(env="Pendulum-v1", max_steps_per_episode=50, total_steps=4_000),
    # Dict observations (a uint8 picture, a vector, a Discrete mode) in the explorers' state and
    # the replay buffer's storage, one field per part
    "dict-obs": dict(env="envs_for_tests:DictCues-v0", envs_per_explorer=4, total_steps=3_000),
}


@pytest.mark.parametrize("name", list(SERIAL_RUNS))
def test_serial_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, name):
    settings = dict(
        SERIAL_RUNS[name], runtime="serial", log_interval=0.0, progress="lines", tensorboard=False
    )
    whole = train(resolve({**settings, "run_dir": str(tmp_path / "whole")}), out=io.StringIO())
    # The same run stopped by a Ctrl-C after a few updates, then resumed to its end.
    signals = StopSignals()
    first = train(
        resolve({**settings, "run_dir": str(tmp_path / "cut")}),
        out=_StopAfter(signals, 5),
        signals=signals,
    )
    assert first.signal == signal.SIGINT and 0 < first.updates < whole.updates
    resumed = train(resolve({}), out=io.StringIO(), resume=str(tmp_path / "cut"))
    assert (resumed.steps, resumed.updates) == (whole.steps, whole.updates)
    assert _same_weights(_model(tmp_path / "cut"), _model(tmp_path / "whole"))
    # Nothing recorded twice (the replay buffer makes several updates per env step count).
    marks = [(r["steps"], r["updates"]) for r in metrics(tmp_path / "cut")]
    assert marks == sorted(set(marks))


# --- the local runtime's learner killed outright ---------------------------------------------
@pytest.mark.timeout(600)  # the sum of the waits' guards below (90 + 60 + 60 + 300 s)
def test_learner_sigkilled_and_resumed_continues_and_still_learns_cartpole(
    tmp_path, record_property
):
    """Also: the explorers end with their SIGKILLed learner, leaving no shared memory behind.
    Learning is judged on a step budget, not on reaching a return in time: on the asynchronous
    local runtime the policy lag, so what a number of steps teaches, changes with the load. (The
    serial runtime's resume is checked bit for bit above; test_learning.py's slow suite has the
    local runtime reach 475.)"""
    before_shm = shm_entries()
    run_dir = tmp_path / "run"
    budget = 300_000  # the preset's is 2M; ended by it, not by a return reached
    args = ("train", "--env", "CartPole-v1", "--run-dir", str(run_dir), "--log-interval", "0.2")
    proc = start_cli(*args, "--checkpoint-interval", "0.01", "--total-steps", str(budget))
    try:
        # Kill once a checkpoint exists and records were logged after it (they must go).
        def logged_past_a_checkpoint() -> bool:
            ckpts = checkpoint.listed(run_dir)
            newest = int(ckpts[-1].name[5:17]) if ckpts else None
            return newest is not None and any(r["steps"] > newest for r in metrics(run_dir))

        wait_until(logged_past_a_checkpoint, 90, "records logged after a checkpoint")
        explorers = explorer_processes(psutil.Process(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert explorers
    # Explorers end with their learner; this returns as soon as they are gone.
    assert_gone(explorers, timeout=60)
    assert shm_entries() == before_shm
    path, saved = checkpoint.latest(run_dir)
    before = metrics(run_dir)
    done, lr0 = saved["counters"]["steps"], saved["optimizer"]["param_groups"][0]["lr"]
    assert 0 < done < budget and saved["returns"], done  # killed in the middle of its budget
    return_at_kill = sum(saved["returns"]) / len(saved["returns"])
    start = time.monotonic()
    resumed = run_cli("train", "--resume", str(run_dir), timeout=300)
    seconds = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from {path.name}: {done:,} steps" in resumed.stdout
    after = metrics(run_dir)
    # Nothing recorded twice. A record is keyed by steps and updates together: env steps are
    # counted from the explorers' unroll reports, which need not come in the turn that brings
    # their batch, so an interval can make updates without counting steps (as in CI once).
    marks = [(r["steps"], r["updates"]) for r in after]
    assert marks == sorted(set(marks)), "a record made twice"
    assert len(before) > sum(r["steps"] <= done for r in after)  # records after the kill went
    later = [r for r in after if r["steps"] > done]
    assert later and later[0]["updates"] > saved["counters"]["updates"]
    assert later[0]["learning_rate"] <= lr0  # the schedule goes on (linear decay)
    assert "done (step budget)" in resumed.stdout and later[-1]["steps"] >= budget
    # It learned after the resume: a policy that does not learn stays near a random one's mean
    # return (about 22); 300k steps ended at 224-310 in six runs here, under two and four
    # CPU-bound processes too.
    returns = f"{return_at_kill:.1f} at the kill, {later[-1]['return_mean']:.1f} at the end"
    print(f"return mean {returns}")
    assert later[-1]["return_mean"] >= 100 and later[-1]["return_mean"] > return_at_kill, returns
    hang_guard(seconds, 300, "resumed run seconds", record_property)


# --- damaged checkpoints, changed settings, resume auto (the command, in this process) -----------
CARTPOLE_SERIAL = ("--env", "CartPole-v1", "--runtime", "serial", "--no-tensorboard")


def test_resume_auto_falls_back_to_an_older_checkpoint_and_a_named_damaged_one_is_refused(
    tmp_path, capsys
):
    run_dir = str(tmp_path / "run")
    common = (*CARTPOLE_SERIAL, "--total-steps", "4000", "--run-dir", run_dir)
    code, _, err = run_main(capsys, "train", *common, "--checkpoint-interval", "0.0001")
    assert code == 0, err
    ckpts = checkpoint.listed(run_dir)
    assert len(ckpts) >= 2
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated on purpose
    code, _, err = run_main(capsys, "train", "--resume", str(newest))
    assert code == 2
    assert err.count("\n") == 1 and "damaged or truncated" in err
    code, out, err = run_main(capsys, "train", *common, "--resume", "auto")
    assert code == 0, err
    assert "trying an older one" in err
    assert f"from {ckpts[-2].name}" in out


def test_resume_refuses_changed_settings_unless_overridden(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(
        capsys, "train", *CARTPOLE_SERIAL, "--total-steps", "2000", "--run-dir", str(run_dir)
    )
    assert code == 0, err
    code, _, err = run_main(capsys, "train", "--resume", str(run_dir), "--learning-rate", "0.1")
    assert code == 2 and err.count("\n") == 1
    assert "--learning-rate 0.1 (was" in err and "--override" in err
    # How long it runs is not a change of what it learns: a longer budget goes on at once.
    code, _, err = run_main(capsys, "train", "--resume", str(run_dir), "--total-steps", "3000")
    assert code == 0, err
    code, _, err = run_main(
        capsys, "train", "--resume", str(run_dir), "--learning-rate", "0.1", "--override"
    )
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["learning_rate"] == 0.1


def test_resume_auto_starts_a_run_then_finds_it_done(tmp_path, capsys):
    args = ("train", *CARTPOLE_SERIAL, "--total-steps", "2000", "--run-dir", str(tmp_path / "r"))
    code, out, err = run_main(capsys, *args, "--resume", "auto")
    assert code == 0 and "resuming" not in out, err
    code, out, err = run_main(capsys, *args, "--resume", "auto")
    assert code == 0, err
    assert "resuming" in out and "reached before this resume" in out
    code, _, err = run_main(capsys, "train", "--resume", "auto")
    assert code == 2 and "--run-dir" in err


# --- TensorBoard and the progress display ------------------------------------------------------
def test_tensorboard_scalars_read_back_and_continue_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = dict(env="CartPole-v1", runtime="serial", total_steps=12_000, log_interval=0.0)
    signals = StopSignals()
    run_dir = tmp_path / "run"
    train(
        resolve({**settings, "run_dir": str(run_dir)}), out=_StopAfter(signals, 4), signals=signals
    )
    # TensorBoard reads a folder's event files in name order: time (whole seconds), host, pid,
    # then a per-process counter compared as text (10 before 9). Two sessions in one process
    # within one second could be read in the wrong order: the resumed one starts a second later.
    time.sleep(1.01 - time.time() % 1)
    train(resolve({}), out=io.StringIO(), resume=str(run_dir))
    records = metrics(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in (
        "episodes/return_mean",
        "loss/loss",
        "learner/learning_rate",
        "run/steps_per_second",
    ):
        assert tag in tags
    loss = events.Scalars("loss/loss")
    assert [e.step for e in loss] == [r["steps"] for r in records if r.get("loss") is not None]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records if "loss" in r])


def test_the_eta_is_the_nearer_of_the_step_budget_and_the_time_limit(monkeypatch):
    from impala.metrics import Tracker

    # The time limit's share counts from the Tracker's start: a fixed clock, so that a machine
    # that stalls between the Tracker's start and its line does not change the figure.
    monkeypatch.setattr(Tracker, "session_seconds", property(lambda self: 0.0))

    def eta(**settings):
        cfg = resolve({"env": "CartPole-v1", "tensorboard": False, **settings})
        line = Tracker(cfg, None, out=io.StringIO())._line(sps=1000.0)
        return line.split("| eta ")[1].split(" |")[0]

    assert eta(total_steps=10**12, max_seconds=120) == "2m00s"  # impala bench
    assert eta(total_steps=60_000, max_seconds=3600) == "1m00s"
    assert eta(total_steps=60_000) == "1m00s"


def test_progress_bar_and_plain_lines(tmp_path):
    settings = dict(env="CartPole-v1", runtime="serial", total_steps=3000, tensorboard=False)
    bar = io.StringIO()
    train(resolve({**settings, "progress": "bar", "run_dir": str(tmp_path / "a")}), out=bar)
    text = bar.getvalue()
    assert "\r" in text and "/3.00k" in text and "step/s" in text and "return" in text  # tqdm
    assert "steps/s |" not in text
    lines = io.StringIO()  # not a terminal: plain lines (auto)
    train(resolve({**settings, "log_interval": 0.0, "run_dir": str(tmp_path / "b")}), out=lines)
    assert "\r" not in lines.getvalue() and "| eta " in lines.getvalue()
    corridor = io.StringIO()  # the seed's learner line, whatever the display
    train(
        resolve(
            dict(runtime="serial", total_steps=400, progress="bar", run_dir=str(tmp_path / "c"))
        ),
        out=corridor,
    )
    assert "avg-right-prob=" in corridor.getvalue() and "\r" not in corridor.getvalue()


def test_checkpoints_every_interval_and_at_the_end(tmp_path):
    _, _, run_dir, _ = train_cli(
        tmp_path,
        *("--env", "CartPole-v1", "--runtime", "serial", "--total-steps", "3000"),
        *("--checkpoint-interval", "0.00001", "--keep-checkpoints", "2"),
    )
    ckpts = checkpoint.listed(run_dir)
    assert len(ckpts) == 2
    _, last = checkpoint.latest(run_dir)
    assert last["counters"]["steps"] >= 3000
    assert os.path.getsize(run_dir / "metrics.jsonl") == last["metrics_offset"]
    assert not list(checkpoint.folder(run_dir).glob("*.tmp"))
    assert time.time() - ckpts[-1].stat().st_mtime < 120


# --- edges found by the expert review: the schedules across a resume -----------------------------
def _rates(run_dir):
    """(env steps, learning rate) of each update's record (log interval 0: one per update)."""
    return [(r["steps"], r["learning_rate"]) for r in metrics(run_dir) if "learning_rate" in r]


def test_resuming_with_a_longer_budget_continues_the_decay_instead_of_reheating_it(tmp_path):
    """--resume RUN --total-steps 2N took the linear decay back up (progress was steps / the new
    total: from ~half the rate to three quarters of it). The decay now goes on from the rate it
    had reached, to 0 at the new budget; the resume line says so; a rate stated again with
    --override restarts the decay there; a run whose decay had ended says how to restart it."""
    settings = dict(env="CartPole-v1", runtime="serial", total_steps=8000, log_interval=0.0)
    run_dir = tmp_path / "run"
    lr0 = resolve(settings).learning_rate
    signals = StopSignals()
    train(
        resolve({**settings, "run_dir": str(run_dir)}), out=_StopAfter(signals, 6), signals=signals
    )
    before = _rates(run_dir)
    stopped_at, last_rate = before[-1]
    assert 0 < stopped_at < 8000 and last_rate == pytest.approx(lr0 * (1 - stopped_at / 8000))
    out = io.StringIO()
    longer = resolve({"total_steps": 16000})
    train(longer, out=out, resume=str(run_dir), given={"total_steps"})
    first_line = out.getvalue().splitlines()[0]
    after = _rates(run_dir)[len(before) :]
    steps, rate = after[0]  # the first update after the resume
    continued = (lr0 * (1 - stopped_at / 8000)) * (1 - (steps - stopped_at) / (16000 - stopped_at))
    assert rate == pytest.approx(continued, rel=1e-9)
    assert rate < last_rate  # never back up (the old rule gave lr0 * (1 - steps / 16000))
    assert rate != pytest.approx(lr0 * (1 - steps / 16000), rel=1e-3)
    assert "falling linearly to 0 at 16,000 steps" in first_line
    assert after[-1][0] >= 16000 and after[-1][1] == pytest.approx(0.0, abs=lr0 * 0.05)
    # the decay has ended: going on again keeps it at 0, and says how to restart it
    out = io.StringIO()
    train(resolve({"total_steps": 20000}), out=out, resume=str(run_dir), given={"total_steps"})
    assert "learning rate 0 (its linear decay has ended; --override" in out.getvalue()
    assert all(rate == 0.0 for _, rate in _rates(run_dir)[-3:])
    # a rate stated again restarts the decay from there
    count = len(_rates(run_dir))
    out = io.StringIO()
    restated = resolve({"total_steps": 24000, "learning_rate": 1e-3})
    given = {"total_steps", "learning_rate"}
    train(restated, out=out, resume=str(run_dir), given=given, override=True)
    resumed_at = int(out.getvalue().split(": ", 1)[1].split(" steps")[0].replace(",", ""))
    steps, rate = _rates(run_dir)[count]
    assert rate == pytest.approx(1e-3 * (1 - (steps - resumed_at) / (24000 - resumed_at)))
    assert "learning rate 0.001, falling linearly to 0 at 24,000 steps" in out.getvalue()
