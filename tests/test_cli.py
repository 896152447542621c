"""The command line: every command answers bad input with one line naming the offending value
and exit code 2, leaving nothing running and nothing half-written (a table over all commands)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import project_children, run_cli, run_main, shm_entries

from impala import __version__, config
from impala.cli import main
from impala.errors import ConfigError

J = ["-l", "localhost:45671", "-e", "localhost:45672"]  # a job's host lists (nothing listens)

# (command line, text the one line must contain); RUN is replaced by a fresh run folder.
BAD_INPUT = [
    # train
    (["train", "--env", "NoSuchEnv-v9"], "unknown environment id 'NoSuchEnv-v9'"),
    (["train", "--env", "CartPol-v1"], "'CartPol-v1' (did you mean CartPole-v1"),
    (["train", "--env", "envs_for_tests:ImportFails-v0"], "'a_renderer_that_is_not_installed'"),
    (["train", "--env", "no_such_module:Env-v0"], "cannot import module 'no_such_module'"),
    (["train", "--env", "envs_for_tests:MultiBinaryActions-v0"], "MultiBinary(2), which no"),
    (["train", "--env", "envs_for_tests:TextObservations-v0"], "has a Text observation space"),
    (["train", "--num-explorers", "0"], "--num-explorers must be a positive integer, got 0"),
    (["train", "--unroll-length", "-3"], "--unroll-length must be a positive integer, got -3"),
    (["train", "-s", "-5"], "--steps-per-explorer must be a positive integer, got -5"),
    (["train", "--num-explorers", "two"], "must be an integer or 'auto', got 'two'"),
    (["train", "--learning-rate", "fast"], "invalid float value: 'fast'"),
    (["train", "--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["train", "--vtrace-lambda", "2"], "--vtrace-lambda must be in [0, 1], got 2.0"),
    (["train", "--clip-rho-threshold", "-1"], "--clip-rho-threshold must be positive"),
    (["train", "--max-restarts", "-1"], "--max-restarts must not be negative, got -1"),
    (["train", "--restart-window", "0"], "--restart-window must be positive, got 0.0"),
    (["train", "--algo", "ppo"], "invalid choice: 'ppo'"),
    (["train", "--env", "CartPole-v1", "--batch-size", "40", "--envs-per-explorer", "16"], "(40)"),
    (["train", "--run-dir", "/proc/impala-run"], "'/proc/impala-run'"),
    (["train", "--run-dir", "FILE/run"], "FILE/run"),
    (["train", "--run-dir", "HELD"], "'HELD' already holds a run"),
    (["--env", "CartPole-v1"], "no command before '--env'"),
    (["fly"], "invalid choice: 'fly'"),
    # bench
    (["bench", "--env", "ALE/NoSuchGame-v5"], "unknown environment id 'ALE/NoSuchGame-v5'"),
    (["train", "--env", "CarRacing-v3", "--net", "mlp"], "'mlp' needs a flat vector"),
    (["train", "--env", "MinAtar/Breakout-v1", "--net", "mlp"], "'mlp' needs a flat vector"),
    (["train", "--env", "CartPole-v1", "--net", "shallow"], "'shallow' needs image observations"),
    (["train", "--core", "lstm", "--net", "seed"], "--core lstm needs a network with a torso"),
    (["train", "--env", "CartPole-v1", "--core", "lstm", "--algo", "reinforce"], "--algo vtrace"),
    (["train", "--env", "CartPole-v1", "--device", "gpu"], "invalid choice: 'gpu'"),
    (["train", "--env", "CartPole-v1", "--loss", "appo", "--algo", "reinforce"], "needs --algo"),
    (["train", "--appo-clip", "1.5"], "--appo-clip must be in (0, 1), got 1.5"),
    (["train", "--appo-passes", "0"], "--appo-passes must be a positive integer, got 0"),
    (["train", "--replay-fraction", "1"], "--replay-fraction must be in [0, 1), got 1.0"),
    (["train", "--env", "CartPole-v1,Acrobot-v1"], "must share an action space"),
    (["bench", "--env", "CartPole-v1", "--seconds", "0"], "--seconds must be positive, got 0.0"),
    (["bench", "--env", "CartPole-v1", "--warmup", "-1"], "--warmup must be positive, got -1.0"),
    (["bench", "--env", "CartPole-v1", "--run-dir", "/proc/impala-run"], "'/proc/impala-run'"),
    (["bench", "--num-explorers", "0"], "--num-explorers must be a positive integer, got 0"),
    # eval
    (["eval", "/nonexistent/run"], "'/nonexistent/run' is not a run folder"),
    (["eval", "HELD"], "cannot read 'HELD/config.json'"),
    (["eval", "/tmp", "--episodes", "zero"], "invalid int value: 'zero'"),
    # the seed's job form
    (["-l", "localhost:abc", "-e", "localhost:1234"], "'localhost:abc' is not host:port"),
    (["-l", "localhost:1233", "-e", "localhost", "-j", "explorer"], "'localhost' is not host:port"),
    (["-l", "localhost:1233", "-e", "localhost:99999"], "'localhost:99999' is not host:port"),
    (["-l", "localhost:1233", "-e", ""], "'' is not host:port"),
    (["-l", "localhost:1233", "-e", "localhost:1233"], "an address appears twice"),
    (["-l", "localhost:1233", "-e", "127.0.0.1:1233"], "an address appears twice"),
    ([*J, "-j", "explorer", "-t", "1"], "--task-index 1 is outside the explorer list"),
    ([*J, "-t", "-1"], "--task-index -1 is outside the learner list"),
    ([*J, "-j", "boss"], "invalid choice: 'boss'"),
    (["-l", "no-such-host.invalid:1233", "-e", "localhost:1234"], "'no-such-host.invalid'"),
    ([*J, "--peer-timeout", "0"], "--peer-timeout must be positive, got 0.0"),
    ([*J, "--env", "NoSuchEnv-v9"], "unknown environment id 'NoSuchEnv-v9'"),
    ([*J, "--gamma", "-1"], "--gamma must be in [0, 1], got -1.0"),
    ([*J, "--run-dir", "/proc/impala-run"], "'/proc/impala-run'"),
    ([*J, "-l", "203.0.113.9:1233"], "not an address of this machine"),
    # statistics that each of several learners would follow on its own batches
    (
        ["-l", "localhost:1231,localhost:1232", "-e", "localhost:1234", "--env", "Acrobot-v1"],
        "--value-norm popart with several learners is not supported yet",
    ),
    (
        [
            *("-l", "localhost:1231,localhost:1232", "-e", "localhost:1234"),
            *("--env", "Acrobot-v1", "--value-norm", "none"),
        ],
        "--obs-norm with several learners is not supported yet",
    ),
]


if not torch.cuda.is_available():
    BAD_INPUT.append((["train", "--device", "cuda"], "--device cuda: no CUDA device here"))


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=lambda v: " ".join(v)[:60])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    """In this process (`main`, as the program runs it; a real program start is checked in
    test_main_module_runs and the crash-loop tests): a subprocess per row cost a minute."""
    file = tmp_path / "a-file"
    file.write_text("x")
    held = tmp_path / "held"
    held.mkdir()
    (held / "model.pt").write_bytes(b"earlier results")
    run = tmp_path / "run"
    subs = {"FILE/run": f"{file}/run", "HELD": str(held)}
    args = [subs.get(a, a) for a in args]
    message = message.replace("FILE/run", f"{file}/run").replace("HELD", str(held))
    if args and args[0] in ("train", "bench") and "--run-dir" not in args:
        args += ["--run-dir", str(run)]
    if args and args[0].startswith("-") and "--run-dir" not in args and "-l" in args:
        args += ["--run-dir", str(run)]
    shm = shm_entries()
    code, out, err = run_main(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err + out
    assert len(lines) == 1 and message in lines[0], err
    assert not run.exists()  # nothing half-written
    assert (held / "model.pt").read_bytes() == b"earlier results"
    assert shm_entries() == shm and project_children() == []  # nothing left running


def test_a_read_only_run_folder_is_one_line(tmp_path):
    """A read-only file system (root ignores a folder's permission bits, not a read-only mount)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        proc = run_cli("train", "--run-dir", str(ro / "run"))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"cannot write the run folder '{ro / 'run'}': Read-only file system" in lines[0]


def _main_output(capsys, *argv) -> str:
    """What `impala ARGV` prints, run in this process; it must succeed."""
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    return out


def test_version_help_and_print_config(tmp_path, capsys):
    assert _main_output(capsys, "--version").strip() == f"impala {__version__}"
    assert "Exit codes: 0 done, 1 failed" in _main_output(capsys, "--help")
    for command in ("train", "bench", "eval", "plot"):  # help texts with a '%' once crashed
        assert "usage: impala" in _main_output(capsys, command, "--help")
    assert "i on task i % K" in " ".join(_main_output(capsys, "train", "--help").split())
    assert run_cli("--version").stdout.strip() == f"impala {__version__}"  # the real program
    proc = run_cli("train", "--env", "CartPole-v1", "--learning-rate", "0.01", "--print-config")
    assert proc.returncode == 0, proc.stderr
    settings = __import__("json").loads(proc.stdout)
    assert settings.pop("resolved")["net"] == "mlp"  # what 'auto' stands for
    cfg = config.Config(**settings)
    assert cfg.learning_rate == 0.01 and cfg.optimizer == "adam"  # the preset, then the user
    assert not (tmp_path / "runs").exists()


JOB = ["-l", "127.0.0.1:1", "-e", "127.0.0.1:2"]  # the job form (never started: see below)

# (command line, the unknown option, the option suggested first). Abbreviations are refused:
# argparse took --learning-rat for --learning-rate and --lr for --lr-schedule.
UNKNOWN_OPTIONS = [
    (["train", "--learning-rat", "0.1"], "--learning-rat", "--learning-rate"),
    (["train", "--learning-rat=0.1"], "--learning-rat", "--learning-rate"),
    (["train", "--lr", "3e-4"], "--lr", "--learning-rate"),  # another library's name
    (["train", "--num_actors", "4"], "--num_actors", "--num-explorers"),
    (["train", "--batch", "8"], "--batch", "--batch-size"),
    (["bench", "--num-envs", "4"], "--num-envs", "--envs-per-explorer"),
    (["bench", "--second", "3"], "--second", "--seconds"),
    (["eval", "/nonexistent/run", "--episode", "3"], "--episode", "--episodes"),
    (["eval", "--greed"], "--greed", "--greedy"),  # not "RUN_DIR is required"
    (["plot", "--outpt", "f.png", "/nonexistent/run"], "--outpt", "--output"),  # not "-o required"
    ([*JOB, "--learning-rat", "1"], "--learning-rat", "--learning-rate"),
    ([*JOB, "--learner", "1"], "--learner", "--learner-hosts"),  # was "ambiguous option"
    (["train", "--zzzz", "1"], "--zzzz", None),  # nothing close: no suggestion
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Commands that would train, bench or start a job task fail the test instead (an option
    that parses by mistake must not start a run in the test process)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command line was accepted")

    for target in (
        "impala.training.train",
        "impala.bench.bench",
        "impala.runtime.jobs.run_from_args",
    ):
        monkeypatch.setattr(target, refuse)


@pytest.mark.parametrize("argv, unknown, suggested", UNKNOWN_OPTIONS, ids=lambda v: str(v)[:40])
def test_an_unknown_option_is_named_with_the_closest(
    argv, unknown, suggested, capsys, tmp_path, nothing_runs
):
    if argv[0] in ("train", "bench"):
        argv = [*argv, "--print-config"]
    if argv[0] not in ("eval", "plot"):
        argv = [*argv, "--run-dir", str(tmp_path / "run")]
    code, out, err = run_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out, (code, out, err)
    line = lines[0]
    if suggested is None:
        assert line.endswith(f"error: unknown option '{unknown}'"), line
    else:  # the first suggestion, then maybe others: "(did you mean A?)", "(did you mean A, B?)"
        assert f"error: unknown option '{unknown}' (did you mean {suggested}" in line, line
        assert line.split(f"did you mean {suggested}", 1)[1][:1] in ("?", ","), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, prefix",
    [
        (["train", "--learning-rat", "0.1", "--print-config"], "--learning-rat"),
        (["bench", "--ceiling-sec", "3", "--print-config"], "--ceiling-sec"),
        (["eval", "/nonexistent/run", "--episode", "3"], "--episode"),
        (["plot", "/nonexistent/run", "-o", "f.png", "--tit", "x"], "--tit"),
        ([*JOB, "--peer-time", "5"], "--peer-time"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_argparse_itself_takes_no_prefix(argv, prefix, capsys, monkeypatch, nothing_runs):
    """Without the early check of unknown options, every parser still refuses a prefix of one
    of its options (allow_abbrev=False) rather than taking it for that option."""
    monkeypatch.setattr("impala.cli._unknown_option", lambda parser, argv: None)
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and f"unrecognized arguments: {prefix}" in err, err


def test_options_with_their_values_attached_still_parse(capsys, monkeypatch):
    out = _main_output(
        capsys, "train", "--env=CartPole-v1", "--learning-rate=0.1", "-s500", "--print-config"
    )
    settings = __import__("json").loads(out)
    settings.pop("resolved")
    cfg = config.Config(**settings)
    assert (cfg.env, cfg.learning_rate, cfg.steps_per_explorer) == ("CartPole-v1", 0.1, 500)
    seen = {}

    def fake_job(args, signals):
        seen.update(args)
        return 0

    monkeypatch.setattr("impala.runtime.jobs.run_from_args", fake_job)
    code, _, err = run_main(
        capsys, "--learner-hosts=127.0.0.1:1", "--explorer-hosts=127.0.0.1:2", "--gamma=0.5"
    )
    assert code == 0, err  # the job form is told by its long options with '=' too
    assert (seen["learner_hosts"], seen["explorer_hosts"], seen["gamma"]) == (
        "127.0.0.1:1",
        "127.0.0.1:2",
        0.5,
    )


def test_flags_that_do_not_apply_get_a_warning(tmp_path):
    proc = run_cli(
        "train",
        "--env",
        "CartPole-v1",
        "--runtime",
        "serial",
        "--total-steps",
        "2000",
        "--learn-batch-size",
        "64",
        "--vtrace-lambda",
        "0.9",
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "impala train: warning: --learn-batch-size has no effect with --buffer fifo"
    ]
    proc = run_cli(
        "train",
        "--algo",
        "reinforce",
        "--entropy-cost",
        "0.1",
        "--runtime",
        "serial",
        "-s",
        "2000",
        "--run-dir",
        str(tmp_path / "r2"),
    )
    assert "--entropy-cost has no effect with --algo reinforce" in proc.stderr


def test_the_batch_actually_used_is_stated(tmp_path):
    proc = run_cli("train", "--runtime", "serial", "-s", "2000", "--run-dir", str(tmp_path / "r"))
    assert "note: each update samples 1 sequence(s) of 40 steps" in proc.stdout
    assert "--learn-batch-size 32" in proc.stdout


def test_seed_flags_map_to_config(monkeypatch):
    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        return type("R", (), {"signal": None})()

    monkeypatch.setattr("impala.training.train", fake_train)
    code = main(
        [
            "train",
            "-s",
            "500",
            "-m",
            "50",
            "-b",
            "200",
            "--learn-batch-size",
            "16",
            "-f",
            "2",
            "--num-hidden",
            "7",
            "-g",
            "0.9",
            "-a",
            "0.01",
            "-t",
            "3",
            "--clip-rho-threshold",
            "none",
        ]
    )
    assert code == 0
    cfg = seen["cfg"]
    assert (cfg.steps_per_explorer, cfg.max_steps_per_episode, cfg.buffer_size) == (500, 50, 200)
    assert (cfg.learn_batch_size, cfg.upload_frequency, cfg.num_hidden) == (16, 2, 7)
    assert (cfg.gamma, cfg.learning_rate, cfg.task_index) == (0.9, 0.01, 3)
    assert cfg.clip_rho_threshold is None


def test_presets_then_explicit_values():
    cfg = config.resolve({"env": "CartPole-v1", "learning_rate": 0.5})
    assert cfg.net == "mlp" and cfg.learning_rate == 0.5
    seed = config.resolve({})
    assert (seed.env, seed.net, seed.num_hidden, seed.gamma, seed.optimizer) == (
        "ShortCorridor-v0",
        "seed",
        10,
        0.97,
        "rmsprop",
    )
    with pytest.raises(ConfigError, match="unknown config field"):
        config.resolve({"nope": 1})
    # the user's -s is the budget, not the preset's total
    assert (
        config.resolve({"env": "CartPole-v1", "steps_per_explorer": 60_000}).steps_total == 120_000
    )
    assert config.resolve({"env": "CartPole-v1"}).steps_total == 2_000_000


def test_main_module_runs():
    proc = subprocess.run([sys.executable, "-m", "impala.cli", "--version"], capture_output=True)
    assert proc.returncode == 0 and os.fsdecode(proc.stdout).startswith("impala ")


def test_print_config_shows_what_auto_resolves_to(tmp_path, capsys):
    """The settings stay as given ('auto' stays 'auto': the printout works as a --config file on
    another machine); "resolved" says what the run here would use."""
    import json

    import torch

    from impala.agent.learner import bf16_is_fast

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = {  # env: the network and obs-norm 'auto' stands for
        "CartPole-v1": ("mlp", "off"),
        "Acrobot-v1": ("mlp", "on"),  # the fallback preset's obs_norm 'auto': on for an MLP
        "MinAtar/Breakout-v1": ("minatar", "off"),
    }
    cpu_bf16 = bf16_is_fast(torch.device("cpu"))  # explorers act on the CPU
    for env_id, (net, obs_norm) in cases.items():
        printed = json.loads(_main_output(capsys, "train", "--env", env_id, "--print-config"))
        if env_id == "Acrobot-v1":  # the fallback preset leaves both to 'auto'
            assert (printed["net"], printed["obs_norm"]) == ("auto", "auto")
        fast_bf16 = net == "minatar" and bf16_is_fast(torch.device(device))  # conv nets only
        assert printed["resolved"] == {
            "net": net,
            "obs_norm": obs_norm,
            "device": device,
            "precision": "bf16" if fast_bf16 else "fp32",
            # 'auto', the default: explorers act on the CPU, bf16 for a conv net where it is fast
            "explorer_precision": "bf16" if net == "minatar" and cpu_bf16 else "fp32",
        }, env_id
    printed = json.loads(_main_output(capsys, "train", "--device", "auto", "--print-config"))
    assert printed["device"] == "auto" and printed["resolved"]["device"] == device
    saved = tmp_path / "printed.json"
    saved.write_text(json.dumps(printed))
    again = json.loads(_main_output(capsys, "train", "--config", str(saved), "--print-config"))
    assert again == printed  # the printout read back as a config file: the same settings
    if not torch.cuda.is_available():
        code, out, err = run_main(capsys, "train", "--device", "cuda", "--print-config")
        assert code == 2 and out == "" and "--device cuda: no CUDA device here" in err
