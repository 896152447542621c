"""`--config FILE` (TOML, YAML or JSON, a run's config.json among them): settings over the env's
preset and under the command line's flags, type-checked, and bad files answered in one line with
exit code 2. Every command here stops at --print-config: nothing trains."""

import dataclasses
import json

import pytest

from impala import config
from impala.cli import build_job_parser, main

CORRIDOR_LR = config.PRESETS[config.CORRIDOR_ID]["learning_rate"]
CARTPOLE_LR = config.PRESETS["CartPole-v1"]["learning_rate"]


def printed(capsys, *args: str) -> config.Config:
    """The config `impala ARGS --print-config` prints (asserting it succeeded)."""
    code = main([*args, "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    settings = json.loads(out)
    settings.pop(config.RESOLVED_KEY)  # what 'auto' resolves to: not a setting
    return config.Config(**settings)


def one_line_error(capsys, *args: str) -> str:
    """The one line on stderr of `impala ARGS`, which must exit with code 2."""
    code = main(list(args))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err + out
    return lines[0]


SAME_SETTINGS = {
    "toml": 'env = "CartPole-v1"\nlearning-rate = 1e-3\nnum_explorers = 3\n'
    'grad_clip = "none"\ntensorboard = false\nreplay_ratio = 2\n',
    "yaml": "env: CartPole-v1\nlearning-rate: 1e-3\nnum_explorers: 3\ngrad_clip: null\n"
    "tensorboard: false\nreplay_ratio: 2\n",
    "yml": "# comment\nenv: CartPole-v1\nlearning-rate: 0.001\nnum_explorers: 3\n"
    "grad_clip: none\ntensorboard: no\nreplay_ratio: 2\n",
    "json": '{"env": "CartPole-v1", "learning-rate": 0.001, "num_explorers": 3, '
    '"grad_clip": null, "tensorboard": false, "replay_ratio": 2}',
}


@pytest.mark.parametrize("suffix", SAME_SETTINGS)
def test_toml_yaml_and_json_files_give_their_settings(suffix, tmp_path, capsys):
    path = tmp_path / f"settings.{suffix}"
    path.write_text(SAME_SETTINGS[suffix])
    for command in ("train", "bench"):
        cfg = printed(capsys, command, "--config", str(path))
        assert cfg.env == "CartPole-v1" and cfg.num_explorers == 3
        assert cfg.learning_rate == 1e-3  # 'learning-rate': the flag's spelling; YAML's 1e-3
        assert cfg.grad_clip is None and cfg.tensorboard is False
        assert cfg.replay_ratio == 2.0 and isinstance(cfg.replay_ratio, float)  # int for float
        assert cfg.optimizer == "adam"  # the file's env chose the preset under the file


def test_a_run_config_json_fed_back_is_the_same_run_in_a_new_folder(tmp_path, capsys):
    cfg = config.resolve(
        dict(
            env="ALE/Pong-v5",
            learning_rate=3e-4,
            seed=7,
            grad_clip=None,
            max_seconds=600.0,
            core="lstm",
            total_steps=123_456,
            run_dir=str(tmp_path / "old"),
        )
    )
    record = {"atari_protocol": {"noop_max": 30, "sticky_actions": 0.0, "grayscale": True}}
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json(extra=record) + "\n")
    again = printed(capsys, "train", "--config", str(run / "config.json"))
    assert again == dataclasses.replace(cfg, run_dir=None)  # run_dir: a new default folder
    new = str(tmp_path / "new")
    assert printed(capsys, "train", "--config", str(run / "config.json"), "--run-dir", new) == (
        dataclasses.replace(cfg, run_dir=new)
    )
    # A run's record under another name is known by its extra keys; a file of one's own that
    # names a run_dir keeps it.
    (tmp_path / "pong.json").write_text(cfg.to_json(extra=record))
    assert printed(capsys, "train", "--config", str(tmp_path / "pong.json")).run_dir is None
    (tmp_path / "mine.json").write_text(json.dumps({"run_dir": new}))
    assert printed(capsys, "train", "--config", str(tmp_path / "mine.json")).run_dir == new


def test_a_cartpole_config_json_reproduces_the_preset_run(tmp_path, capsys):
    cfg = printed(capsys, "train", "--env", "CartPole-v1", "--seed", "3")
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert printed(capsys, "train", "--config", str(tmp_path / "config.json")) == cfg


def test_defaults_then_preset_then_file_then_flags(tmp_path, capsys):
    assert printed(capsys, "train").learning_rate == CORRIDOR_LR
    preset = printed(capsys, "train", "--env", "CartPole-v1")
    assert preset.learning_rate == CARTPOLE_LR and preset.optimizer == "adam"
    lr = tmp_path / "lr.toml"
    lr.write_text("learning_rate = 0.005\n")
    with_file = printed(capsys, "train", "--env", "CartPole-v1", "--config", str(lr))
    assert with_file == dataclasses.replace(preset, learning_rate=0.005)  # file beats preset
    assert printed(capsys, "train", "--config", str(lr)).learning_rate == 0.005  # beats default
    flag = printed(capsys, "train", "--env", "CartPole-v1", "--config", str(lr), "-a", "0.01")
    assert flag == dataclasses.replace(preset, learning_rate=0.01)  # the flag beats the file
    # The file's env picks the preset; a flag's env beats the file's.
    env = tmp_path / "env.yaml"
    env.write_text("env: CartPole-v1\nseed: 5\n")
    assert printed(capsys, "train", "--config", str(env)) == dataclasses.replace(preset, seed=5)
    corridor = printed(capsys, "train", "--config", str(env), "--env", config.CORRIDOR_ID)
    assert corridor.learning_rate == CORRIDOR_LR and corridor.seed == 5
    # -s on the command line is the budget, over the total steps of the file (as of the preset).
    steps = tmp_path / "steps.json"
    steps.write_text('{"env": "CartPole-v1", "total_steps": 5000}')
    assert printed(capsys, "train", "--config", str(steps)).steps_total == 5000
    budget = printed(capsys, "train", "--config", str(steps), "-s", "100")
    assert budget.total_steps is None and budget.steps_total == 100 * budget.num_explorers


def test_settings_the_run_will_not_read_are_warned_about(tmp_path):
    """A file's settings count as the user's for the warnings, but a run's config.json (every
    setting) warns only about those that differ from what the run would have without it."""
    mine = tmp_path / "mine.toml"
    mine.write_text('env = "CartPole-v1"\nbuffer_size = 500\n')
    settings, given = config.with_config_file({}, mine)
    warnings = config.inapplicable(config.resolve(settings), given)
    assert warnings == ["--buffer-size has no effect with --buffer fifo"]
    run = tmp_path / "config.json"
    run.write_text(config.resolve({"env": "CartPole-v1", "seed": 2}).to_json())
    settings, given = config.with_config_file({"learn_batch_size": 8}, run)
    assert given == {"env", "seed", "learn_batch_size"}
    assert config.inapplicable(config.resolve(settings), given) == [
        "--learn-batch-size has no effect with --buffer fifo"
    ]


# (file name, its text, what the one line must say besides the file's path)
BAD_FILES = [
    ("int.toml", 'num_explorers = "abc"', "num_explorers must be an integer, got 'abc'"),
    ("float-for-int.yaml", "unroll_length: 2.5", "unroll_length must be an integer, got 2.5"),
    ("bool.json", '{"tensorboard": 3}', "tensorboard must be true or false, got 3"),
    ("list.toml", "gamma = [0.9, 0.99]", "gamma must be a finite number, got [0.9, 0.99]"),
    ("bool-for-float.yaml", "gamma: true", "gamma must be a finite number, got True"),
    ("nan.toml", "learning_rate = nan", "learning_rate must be a finite number, got nan"),
    ("optional.json", '{"grad_clip": "big"}', "grad_clip must be a finite number or none"),
    ("choice.toml", 'algo = "ppo"', "algo must be one of vtrace, reinforce, got 'ppo'"),
    ("env.yaml", "env: 3", "env must be a string, got 3"),
    ("dashes.yaml", "learning-rate: fast", "learning-rate must be a finite number, got 'fast'"),
    ("unknown.toml", "lr = 1\nnum_explorer = 2", "unknown setting(s) lr, num_explorer"),
    ("twice.yaml", "learning_rate: 0.1\nlearning-rate: 0.2", "learning_rate is given twice"),
    ("syntax.toml", "seed = 1\nlearning_rate = = 2", "invalid TOML: Invalid value (at line 2"),
    ("syntax.yaml", "seed: 1\ngamma: [0.9\nalgo: x", "invalid YAML: expected ',' or ']'"),
    ("syntax.json", '{"seed": 1,\n"gamma" 0.9}', "invalid JSON: Expecting ':' delimiter: line 2"),
    ("list.yaml", "- seed\n- 1", "must hold a table of settings, not a list"),
    ("settings.ini", "seed = 1", "must end in .toml, .yaml, .yml, .json"),
    ("latin1.toml", b"seed = 1 # \xe9", "not UTF-8 text (byte 12)"),
    ("invalid.toml", "num_explorers = 0", "--num-explorers must be a positive integer, got 0"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES, ids=[row[0] for row in BAD_FILES])
@pytest.mark.parametrize("command", ["train", "bench"])
def test_a_bad_file_is_one_line_and_exit_2(command, name, text, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_line_error(capsys, command, "--config", str(path), "--print-config")
    assert message in line, line
    if not message.startswith("--"):  # the file's own problems name the file
        assert line.startswith(f"impala {command}: error: config file '{path}': "), line


def test_a_missing_or_unreadable_file_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    line = one_line_error(capsys, "train", "--config", str(missing))
    assert line == (
        f"impala train: error: cannot read config file '{missing}': No such file or directory"
    )
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "Is a directory" in one_line_error(capsys, "bench", "--config", str(folder))


def test_yaml_syntax_errors_give_the_line(tmp_path, capsys):
    path = tmp_path / "at.yaml"
    path.write_text("seed: 1\ngamma: [0.9\nalgo: x\n")
    assert "(line 3, column 5)" in one_line_error(capsys, "train", "--config", str(path))


def test_the_job_form_takes_a_config_file(tmp_path, capsys):
    assert build_job_parser().parse_args(["-l", "a:1", "-e", "b:2", "--config", "f.toml"])
    missing = tmp_path / "missing.toml"
    line = one_line_error(
        capsys, "-l", "localhost:45671", "-e", "localhost:45672", "--config", str(missing)
    )
    assert line == (
        f"impala (learner 0): error: cannot read config file '{missing}': No such file or directory"
    )
