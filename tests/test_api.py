"""The Python API (`import impala`): what importing it does, `impala.Config` against the command
line, `impala.train` (the same run as `impala train`, callbacks, early stopping, resume) and
bad input as ConfigError with the command's one line."""

import dataclasses
import io
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import project_children, run_main

import impala
from impala import config as config_mod
from impala.errors import ConfigError

API = {
    "__version__",
    "Config",
    "train",
    "TrainResult",
    "Callback",
    "StopTraining",
    "load_policy",
    "Policy",
    "register_net",
    "PolicyValueNetwork",
    "RecurrentPolicyValueNetwork",
    "check_network",
    "PolicyState",
    "evaluate",
    "EvalResult",
    "ConfigError",
    "RunFailed",
}
OPTIONAL = ("ray", "wandb", "ale_py", "minatar", "minigrid", "Box2D", "cv2", "tensorboard")


# --- the package -----------------------------------------------------------------------------
def test_importing_impala_starts_nothing_and_imports_nothing_optional():
    """In a fresh interpreter: after `import impala` no optional package (nor torch or Gymnasium:
    the API loads on first use), no thread, no child process; then every name of `__all__`."""
    probe = """
import json, sys, threading, psutil
import impala
after_import = sorted(sys.modules)
state = dict(
    modules=after_import,
    threads=threading.active_count(),
    children=len(psutil.Process().children()),
    all=impala.__all__,
)
names = {name: type(getattr(impala, name)).__name__ for name in impala.__all__}
state["names"] = names
state["after_use"] = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
print(json.dumps(state))
""".replace("OPTIONAL", repr(OPTIONAL))
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)
    roots = {name.split(".")[0] for name in state["modules"]}
    assert not roots & {*OPTIONAL, "torch", "gymnasium", "numpy"}, sorted(roots)
    assert state["threads"] == 1 and state["children"] == 0
    assert set(state["all"]) == API
    assert state["names"]["train"] == "function" and state["names"]["Config"] == "type"
    assert state["after_use"] == []  # using the API loads no optional package either


def test_every_public_name_is_documented():
    for name in API - {"__version__"}:
        obj = getattr(impala, name)
        assert (obj.__doc__ or "").strip(), name
        for attr, member in vars(obj).items() if isinstance(obj, type) else ():
            if (callable(member) or isinstance(member, property)) and not attr.startswith("_"):
                assert (member.__doc__ or "").strip(), f"{name}.{attr}"


# --- Config: the command line's resolution ------------------------------------------------
CASES = [
    (
        {"env": "CartPole-v1", "total_steps": 100_000},
        ["--env", "CartPole-v1", "--total-steps", "100000"],
    ),
    (
        {"env": "ALE/Pong-v5", "learning_rate": 1e-4},
        ["--env", "ALE/Pong-v5", "--learning-rate", "1e-4"],
    ),
    (
        {"env": "MinAtar/Breakout-v1", "core": "lstm"},
        ["--env", "MinAtar/Breakout-v1", "--core", "lstm"],
    ),
    ({"env": "Acrobot-v1", "algo": "reinforce"}, ["--env", "Acrobot-v1", "--algo", "reinforce"]),
    ({"env": "Pendulum-v1", "steps_per_explorer": 5000}, ["--env", "Pendulum-v1", "-s", "5000"]),
    ({}, []),  # the seed's corridor
]


@pytest.mark.parametrize("settings, argv", CASES, ids=lambda v: str(v)[:40])
def test_config_is_what_the_command_line_runs(settings, argv, capsys):
    code, out, err = run_main(capsys, "train", *argv, "--print-config")
    assert code == 0, err
    printed = json.loads(out)
    printed.pop("resolved")
    assert impala.Config(**settings) == config_mod.Config(**printed)
    assert impala.Config(**settings) == config_mod.resolve(settings)


def test_config_presets_and_replace():
    cfg = impala.Config(env="CartPole-v1", total_steps=100_000)
    preset = config_mod.PRESETS["CartPole-v1"]
    assert cfg.learning_rate == preset["learning_rate"] != config_mod.Config.learning_rate
    assert cfg.total_steps == 100_000  # yours over the preset's
    again = dataclasses.replace(cfg, seed=3)  # every other value as it was, presets aside
    assert again.seed == 3 and dataclasses.replace(again, seed=0) == cfg
    assert impala.Config(env="CartPole-v1", learning_rate=1).learning_rate == 1.0  # int -> float


@pytest.mark.parametrize(
    "settings, argv",
    [
        ({"num_explorers": 0}, ["--num-explorers", "0"]),
        ({"gamma": 2.0}, ["--gamma", "2"]),
        ({"net": "seed", "core": "lstm"}, ["--net", "seed", "--core", "lstm"]),
        ({"env": "CartPole-v9"}, ["--env", "CartPole-v9"]),
    ],
)
def test_bad_settings_raise_the_command_lines_one_line(settings, argv, capsys, tmp_path):
    """The same ConfigError message in Python as the command's error line; nothing written."""
    code, _, err = run_main(capsys, "train", *argv, "--run-dir", str(tmp_path / "r"))
    assert code == 2
    with pytest.raises(ConfigError) as raised:
        impala.train(impala.Config(run_dir=str(tmp_path / "r"), **settings), out=io.StringIO())
    assert err.strip() == f"impala train: error: {raised.value}"
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "r").exists()


def test_config_refuses_unknown_names_and_wrong_types():
    with pytest.raises(
        ConfigError, match=r"unknown config field\(s\): learning_rat \(did you mean"
    ):
        impala.Config(learning_rat=0.1)
    with pytest.raises(ConfigError, match="learning_rate must be a finite number, got 'fast'"):
        impala.Config(learning_rate="fast")
    with pytest.raises(ConfigError, match="total_steps must be an integer or none, got 1.5"):
        impala.Config(total_steps=1.5)
    with pytest.raises(ConfigError, match="must be an impala.Config"):
        impala.train({"env": "CartPole-v1"})


# --- train: the same run, callbacks ----------------------------------------------------------
SERIAL = dict(env="CartPole-v1", runtime="serial", envs_per_explorer=4, batch_size=8)


def _model(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_train_is_the_same_run_as_the_command_line(tmp_path, capsys):
    """The serial runtime is deterministic: the API's run and the command's have the same
    weights, config.json and counters."""
    code, out, err = run_main(
        capsys,
        "train",
        *("--env", "CartPole-v1", "--runtime", "serial", "--envs-per-explorer", "4"),
        *("--batch-size", "8", "--total-steps", "4000", "--run-dir", str(tmp_path / "cli")),
    )
    assert code == 0, err
    result = impala.train(
        impala.Config(**SERIAL, total_steps=4000, run_dir=str(tmp_path / "api")), out=io.StringIO()
    )
    assert isinstance(result, impala.TrainResult)
    assert result.run_dir == tmp_path / "api" and result.stop_reason == "step budget"
    cli, api = _model(tmp_path / "cli"), _model(tmp_path / "api")
    assert all(torch.equal(cli[k], api[k]) for k in cli)
    cli_cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    api_cfg = json.loads((tmp_path / "api" / "config.json").read_text())
    assert {**cli_cfg, "run_dir": None} == {**api_cfg, "run_dir": None}
    last = json.loads((tmp_path / "api" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (result.env_steps, result.updates, result.episodes) == (
        last["steps"],
        last["updates"],
        last["episodes"],
    )
    assert result.return_mean == pytest.approx(last["return_mean"])
    assert f"{result.env_steps:,} steps, {result.updates:,} updates" in out


class Recorder(impala.Callback):
    """Keeps what it is called with; stops the run at `stop_at` env steps."""

    def __init__(self, stop_at=None, fail_at=None):
        self.records, self.checkpoints, self.ends = [], [], []
        self.stop_at, self.fail_at = stop_at, fail_at

    def on_record(self, record):
        self.records.append(record)
        if self.fail_at is not None and record["steps"] >= self.fail_at:
            raise ValueError("a bug in the user's callback")
        if self.stop_at is not None and record["steps"] >= self.stop_at:
            raise impala.StopTraining("return high enough")

    def on_checkpoint(self, path, steps):
        self.checkpoints.append((path, steps, path.is_file()))

    def on_end(self, result):
        self.ends.append(result)


def test_a_callback_stops_the_run_cleanly_with_its_checkpoint(tmp_path):
    recorder = Recorder(stop_at=2000)
    run_dir = tmp_path / "r"
    cfg = impala.Config(**SERIAL, total_steps=50_000, log_interval=0.0, run_dir=str(run_dir))
    result = impala.train(cfg, callbacks=[recorder], out=io.StringIO())
    assert result.stop_reason == "callback: return high enough"
    assert 2000 <= result.env_steps < 50_000
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recorder.records == records  # every record, as written
    path, steps, existed = recorder.checkpoints[-1]
    assert existed and steps == result.env_steps and path.parent == run_dir / "checkpoints"
    assert recorder.ends == [result] and (run_dir / "model.pt").is_file()
    assert impala.load_policy(path).steps == result.env_steps  # the checkpoint loads


def test_an_error_in_a_callback_is_raised_after_the_run_is_saved(tmp_path):
    recorder = Recorder(fail_at=1000)
    run_dir = tmp_path / "r"
    cfg = impala.Config(**SERIAL, total_steps=50_000, log_interval=0.0, run_dir=str(run_dir))
    with pytest.raises(ValueError, match="a bug in the user's callback"):
        impala.train(cfg, callbacks=[recorder], out=io.StringIO())
    assert (run_dir / "model.pt").is_file() and list((run_dir / "checkpoints").glob("*.pt"))
    # No callback is called once one failed (no on_end either).
    assert [r["steps"] >= 1000 for r in recorder.records].count(True) == 1
    assert recorder.checkpoints == recorder.ends == []
    with pytest.raises(ConfigError, match="has none of the methods on_record"):
        impala.train(cfg, callbacks=[object()])


def test_settings_the_run_will_not_read_are_warned_about_as_the_command_does(tmp_path):
    """`impala train --appo-clip 0.3` warns that it has no effect with the IMPALA loss; so does
    impala.train, as a UserWarning from the caller's line, however the Config was made."""
    cfg = impala.Config(**SERIAL, total_steps=640, run_dir=str(tmp_path / "a"), appo_clip=0.3)
    with pytest.warns(UserWarning, match=r"^--appo-clip has no effect with --loss impala$") as seen:
        impala.train(cfg, out=io.StringIO())
    assert len(seen) == 1 and seen[0].filename == __file__
    replaced = dataclasses.replace(
        impala.Config(**SERIAL, total_steps=640), run_dir=str(tmp_path / "b"), wandb_project="x"
    )
    with pytest.warns(UserWarning, match=r"^--wandb-project has no effect with --wandb False$"):
        impala.train(replaced, out=io.StringIO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings that all apply: no warning
        impala.train(
            impala.Config(**SERIAL, total_steps=640, run_dir=str(tmp_path / "c"), seed=3),
            out=io.StringIO(),
        )


def test_resume_goes_on_with_the_run(tmp_path):
    run_dir = tmp_path / "r"
    cfg = impala.Config(**SERIAL, total_steps=3000, log_interval=0.0, run_dir=str(run_dir))
    first = impala.train(cfg, out=io.StringIO())
    with pytest.raises(ConfigError, match=r"settings differ from the checkpoint's: --seed 1"):
        impala.train(dataclasses.replace(cfg, seed=1, total_steps=6000), resume=run_dir)
    longer = impala.train(
        dataclasses.replace(cfg, total_steps=6000), resume=run_dir, out=io.StringIO()
    )
    assert longer.run_dir == run_dir and first.env_steps < longer.env_steps >= 6000
    assert longer.episodes > first.episodes  # the counters went on
    again = impala.train(resume=run_dir, out=io.StringIO())  # the checkpoint's settings
    assert again.stop_reason == "step budget (reached before this resume)"
    with pytest.raises(ConfigError, match=r"resume='auto' needs config.run_dir"):
        impala.train(impala.Config(**SERIAL), resume="auto")
    fresh = tmp_path / "auto"
    started = impala.train(
        dataclasses.replace(cfg, run_dir=str(fresh)), resume="auto", out=io.StringIO()
    )
    assert started.run_dir == fresh and started.env_steps >= 3000


def test_train_on_the_local_runtime(tmp_path):
    """The default runtime: explorer processes, all stopped when `train` returns."""
    cfg = impala.Config(
        env="CartPole-v1",
        total_steps=6000,
        num_explorers=2,
        envs_per_explorer=4,
        batch_size=8,
        run_dir=str(tmp_path / "r"),
    )
    assert cfg.runtime == "local"
    recorder = Recorder()
    result = impala.train(cfg, callbacks=[recorder], out=io.StringIO())
    assert result.stop_reason == "step budget" and result.env_steps >= 6000
    assert result.updates > 0 and recorder.records and recorder.ends == [result]
    assert "torn_unrolls" in recorder.records[-1]  # the local runtime's own counter
    assert project_children() == []


def test_train_on_the_ray_runtime(tmp_path):
    """Seen from a callback while the run is on: Ray is up (the run's first record comes while
    it trains, however fast the machine: the step budget cannot run out first and the callback
    then stops it), and down once `train` returns."""
    pytest.importorskip("ray")
    cfg = impala.Config(
        env="CartPole-v1",
        runtime="ray",
        total_steps=10**9,
        num_explorers=1,
        envs_per_explorer=4,
        batch_size=8,
        log_interval=0.5,
        max_seconds=240,  # a hang guard
        run_dir=str(tmp_path / "r"),
    )
    import ray

    on_ray = []

    class Watch(Recorder):
        def on_record(self, record):
            super().on_record(record)
            on_ray.append(ray.is_initialized())
            raise impala.StopTraining("seen on Ray")

    recorder = Watch()
    result = impala.train(cfg, callbacks=[recorder], out=io.StringIO())
    assert result.stop_reason == "callback: seen on Ray", result
    assert recorder.records and recorder.ends == [result] and on_ray[0]
    assert not ray.is_initialized() and project_children() == []
