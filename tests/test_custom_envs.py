"""Your own environments: `--env package.module:make_env` with `--env-kwargs`, built by the same
factory in the learner's probe, every explorer, evaluation and video; how it is told apart from
`module:EnvId`; bad factories as one line and exit 2."""

import importlib.util
import json
from pathlib import Path

import gymnasium as gym
import pytest
from conftest import env_with_tests_on_path, project_children, run_cli, run_main, shm_entries

from impala import config
from impala.envs import make_env, probe_env
from impala.errors import ConfigError
from impala.evaluation import evaluate
from impala.examples.envs import NoisyObservations, make_cartpole
from impala.training import train

FACTORY = "impala.examples.envs:make_cartpole"


def test_a_factory_is_called_with_its_keyword_arguments():
    env = make_env(FACTORY, env_kwargs={"pole_length": 0.8, "noise": 0.1}, max_episode_steps=7)
    assert isinstance(env, gym.wrappers.TimeLimit) and env.spec.max_episode_steps == 7
    assert isinstance(env.env, NoisyObservations) and env.unwrapped.length == 0.8
    env.close()
    info = probe_env(FACTORY, env_kwargs={"noise": 0.1})
    assert (info.obs_shape, info.action.describe(), info.family) == (
        (4,),
        "Discrete(2)",
        "gymnasium",
    )
    # a multi-task list may name factories too (their kwargs are --env-kwargs)
    both = probe_env(f"{FACTORY},CartPole-v1", env_kwargs={})
    assert both.tasks == (FACTORY, "CartPole-v1")


def test_a_callable_attribute_is_a_factory_and_anything_else_a_registered_id(tmp_path, monkeypatch):
    """The rule, the same in every process: `module:attr` is a factory where the module imports
    and `attr` is callable; otherwise the module is imported for the id it registers."""
    (tmp_path / "both_forms.py").write_text(
        "import gymnasium as gym\n"
        "from gymnasium.envs.classic_control.cartpole import CartPoleEnv\n"
        "from gymnasium.envs.classic_control.acrobot import AcrobotEnv\n"
        "gym.register(id='Shadowed', entry_point=AcrobotEnv)\n"
        "gym.register(id='Registered-v0', entry_point=CartPoleEnv, max_episode_steps=9)\n"
        "def Shadowed(**kwargs):\n"
        "    return CartPoleEnv(**kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # 'Shadowed' is both an id and a callable: the callable wins (CartPole, not Acrobot)
    assert probe_env("both_forms:Shadowed").obs_shape == (4,)
    assert probe_env("both_forms:Registered-v0").max_episode_steps == 9
    with pytest.raises(ConfigError, match="has no environment factory 'Nothing'"):
        probe_env("both_forms:Nothing")


def test_registered_ids_take_keyword_arguments_too():
    env = make_env("CartPole-v1", env_kwargs={"sutton_barto_reward": True})
    assert env.unwrapped._sutton_barto_reward is True
    env.close()


# (command line, text the one line must contain)
BAD_ENVS = [
    (["--env", "no_such_module_y:make_env"], "cannot import module 'no_such_module_y'"),
    (["--env", "impala.examples.envs:no_factory"], "has no environment factory 'no_factory'"),
    (["--env", "extend_for_tests:NOT_CALLABLE"], "has no environment factory 'NOT_CALLABLE'"),
    (["--env", "extend_for_tests:factory_raises"], "raised ConnectionError: the simulator at"),
    (["--env", "extend_for_tests:factory_returns_a_dict"], "returned a dict, not a gymnasium.Env"),
    (["--env", "__main__:make_env"], "module '__main__' is the script being run"),
    (["--env", FACTORY, "--env-kwargs", '{"pole_length": -1}'], "raised ValueError: pole_length"),
    (["--env", FACTORY, "--env-kwargs", '{"colour": 1}'], "unexpected keyword argument 'colour'"),
    (["--env", FACTORY, "--env-kwargs", '{"noise": NaN}'], "must hold JSON values only"),
    (["--env", FACTORY, "--env-kwargs", "[0.1]"], "--env-kwargs: not a JSON object"),
    (["--env", "CartPole-v1", "--env-kwargs", '{"colour": 1}'], "with --env-kwargs: CartPoleEnv"),
]
if importlib.util.find_spec("ale_py") is not None:
    BAD_ENVS.append(
        (["--env", "ALE/Pong-v5", "--env-kwargs", '{"mode": 1}'], "not taken by Atari games")
    )


@pytest.mark.parametrize("args, message", BAD_ENVS, ids=lambda v: " ".join(v)[:60])
def test_a_bad_environment_factory_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    run = tmp_path / "run"
    shm = shm_entries()
    code, out, err = run_main(capsys, "train", *args, "--run-dir", str(run))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err + out
    assert len(lines) == 1 and message in lines[0], err
    assert not run.exists()
    assert shm_entries() == shm and project_children() == []


def test_video_needs_a_factory_that_takes_render_mode(tmp_path, capsys):
    cfg = config.resolve(
        {
            "env": "extend_for_tests:no_render_mode",
            "runtime": "serial",
            "total_steps": 200,
            "run_dir": str(tmp_path / "run"),
            "progress": "lines",
        }
    )
    train(cfg, out=open(tmp_path / "out.txt", "w"))
    with pytest.raises(ConfigError, match="accept that keyword"):
        evaluate(
            tmp_path / "run", episodes=1, video=tmp_path / "v.mp4", out=open(tmp_path / "e", "w")
        )


def test_settings_files_take_factories_and_keyword_arguments(tmp_path, capsys):
    file = tmp_path / "run.toml"
    file.write_text(
        f'env = "{FACTORY}"\n'
        'net = "impala.examples.custom_net:build"\n'
        "[env_kwargs]\npole_length = 0.8\nnoise = 0.05\n"
        "[net-kwargs]\nhidden = 32\n"
    )
    code, out, err = run_main(capsys, "train", "--config", str(file), "--print-config")
    assert code == 0, err
    cfg = json.loads(out)
    assert (cfg["env"], cfg["env_kwargs"]) == (FACTORY, {"pole_length": 0.8, "noise": 0.05})
    assert (cfg["net"], cfg["net_kwargs"]) == ("impala.examples.custom_net:build", {"hidden": 32})
    file.write_text(f'env = "{FACTORY}"\nenv_kwargs = 3\n')
    code, _, err = run_main(capsys, "train", "--config", str(file), "--print-config")
    assert code == 2 and "env_kwargs must be a table of keyword arguments, got 3" in err, err


def _logged_calls(log_dir: Path) -> dict[int, list[dict]]:
    return {
        int(path.stem): [json.loads(line) for line in path.read_text().splitlines()]
        for path in log_dir.glob("*.jsonl")
    }


@pytest.mark.timeout(240)
def test_the_factory_builds_every_environment_of_a_local_run_and_its_evaluation(tmp_path):
    """`impala train --env extend_for_tests:logged_cartpole --env-kwargs ...` on the local
    runtime (spawned explorers), then `impala eval --episodes 2 --video`: the learner's probe,
    both explorer processes, the evaluation and its video were all built by the factory, with
    the kwargs."""
    logs = tmp_path / "logs"
    logs.mkdir()
    kwargs = {"log_dir": str(logs), "pole_length": 0.6}
    run_dir = tmp_path / "run"
    common = ["--env-kwargs", json.dumps(kwargs), "--net", "impala.examples.custom_net:build"]
    proc = run_cli(
        "train",
        "--env",
        "extend_for_tests:logged_cartpole",
        *common,
        "--runtime",
        "local",
        "--num-explorers",
        "2",
        "--envs-per-explorer",
        "4",
        "--total-steps",
        "3000",
        "--run-dir",
        str(run_dir),
        timeout=200,
        env=env_with_tests_on_path(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = _logged_calls(logs)
    assert len(trained) >= 3  # this run's command (the probe) and two explorer processes
    calls = [call for per_process in trained.values() for call in per_process]
    assert all(call["kwargs"] == {"pole_length": 0.6} for call in calls), calls
    assert sum(len(c) for c in trained.values()) >= 1 + 2 * 4
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["env"], saved["env_kwargs"]) == ("extend_for_tests:logged_cartpole", kwargs)

    video = tmp_path / "episode.mp4"
    proc = run_cli(
        "eval",
        str(run_dir),
        "--episodes",
        "2",
        "--video",
        str(video),
        timeout=120,
        env=env_with_tests_on_path(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert video.stat().st_size > 0
    evaluated = {pid: c for pid, c in _logged_calls(logs).items() if pid not in trained}
    modes = [call["render_mode"] for per_process in evaluated.values() for call in per_process]
    assert len(evaluated) == 1  # `impala eval`: its probes, the video's env and one more
    assert modes.count("rgb_array") == 1 and len(modes) >= 3, modes


@pytest.mark.timeout(300)
def test_a_factory_and_a_custom_network_on_ray(tmp_path):
    """A short smoke run on the Ray runtime (explorers as Ray actors, which import the factory
    and the network by reference), then its evaluation."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    cfg = config.resolve(
        {
            "env": make_cartpole,  # the Python API's form: a callable, turned into a reference
            "env_kwargs": {"pole_length": 0.7},
            "net": "impala.examples.custom_net:build",
            "net_kwargs": {"hidden": 16},
            "runtime": "ray",
            "num_explorers": 2,
            "envs_per_explorer": 4,
            "batch_size": 4,
            "total_steps": 4000,
            "run_dir": str(tmp_path / "run"),
            "progress": "lines",
        }
    )
    assert cfg.env == FACTORY
    result = train(cfg, out=open(tmp_path / "out.txt", "w"))
    assert result.steps >= 4000 and result.episodes > 0
    figures = evaluate(tmp_path / "run", episodes=3, out=open(tmp_path / "eval.txt", "w"))
    assert figures["episodes"] == 3


@pytest.mark.timeout(400)
def test_the_job_form_takes_a_factory_and_a_custom_network(tmp_path):
    """The seed's job form, learner and explorer tasks started as users start them, each
    building the factory's environments and the custom network from its own command line."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    from test_distributed import Job, _assert_no_ray_processes

    job = Job(tmp_path, 1, 1)
    flags = [
        *("--env", FACTORY, "--env-kwargs", '{"pole_length": 0.7}'),
        *("--net", "impala.examples.custom_net:build", "--net-kwargs", '{"hidden": 16}'),
        *("-s", "3000", "--envs-per-explorer", "4", "--batch-size", "4"),
    ]
    try:
        job.start("learner", 0, *flags)
        job.start("explorer", 0, *flags)
        assert job.wait("explorer0", 200) == 0, job.err("explorer0")
        assert job.wait("learner0", 60) == 0, job.err("learner0")
    finally:
        job.close()
    _assert_no_ray_processes()
    assert "learner 0 done (step budget): 3," in job.out("learner0"), job.out("learner0")
    saved = json.loads((tmp_path / "run-learner0" / "config.json").read_text())
    assert (saved["env"], saved["net"]) == (FACTORY, "impala.examples.custom_net:build")


def test_the_dict_observation_example_env_and_its_encoder():
    """`CueCorridor` (an image part and a vector part) passes Gymnasium's checker and needs its
    picture: a policy reading the cue earns about 1, one ignoring it about 0. Its network is the
    Dict encoder example, checked against the contract on this space (training it waits for
    the Dict observation spaces, another branch's)."""
    from gymnasium.utils.env_checker import check_env

    from impala.distributions import ActionSpec
    from impala.examples import dict_encoder
    from impala.examples.envs import CueCorridor
    from impala.nets.contract import check_network

    env = CueCorridor(render_mode="rgb_array")
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    assert env.render().shape == (8, 8, 3)

    def mean_return(policy, episodes=200):
        total = 0.0
        for episode in range(episodes):
            obs, _ = env.reset(seed=episode)
            done = False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(policy(obs))
                total += reward
                done = terminated or truncated
        return total / episodes

    reads_cue = mean_return(lambda obs: int(obs["frame"][0, -1, 0] == 255))
    always_right = mean_return(lambda obs: 1)
    assert reads_cue > 0.95 and abs(always_right) < 0.3, (reads_cue, always_right)
    spec = ActionSpec.discrete(2)
    model = dict_encoder.build(env.observation_space, spec, config.Config())
    check_network(model, env.observation_space, spec)
