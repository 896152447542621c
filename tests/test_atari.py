"""Atari and MinAtar on real ROMs and games: the paper's preprocessing, checked against frames
computed here from the raw emulator, and what the explorer learns from versus reports."""

import subprocess
import sys
import textwrap

import cv2
import gymnasium as gym
import numpy as np
import pytest
from conftest import env_with_tests_on_path

from impala.agent import ParameterStore, rollout_spec
from impala.agent.buffer import allocate, numpy_views
from impala.agent.explorer import Explorer
from impala.envs import atari, make_env, make_vector_env, probe_env
from impala.envs.atari import AtariProtocol
from impala.errors import ConfigError
from impala.nets import build_net

PLAIN = AtariProtocol(noop_max=0)


def _explorer(env_id, num_envs, T, *, protocol=PLAIN, **kwargs):
    env = probe_env(env_id, atari_protocol=protocol)
    model = build_net("auto", env, num_hidden=16)
    model.requires_grad_(False)
    store = ParameterStore(*ParameterStore.allocate(model))
    vec = make_vector_env(env_id, num_envs, atari_protocol=protocol)
    explorer = Explorer(0, vec, model, store, unroll_length=T, gamma=0.99, seed=1, **kwargs)
    spec = rollout_spec(env, T, num_envs)
    out = numpy_views(allocate(spec, 1), 0)
    return explorer, out


def test_pong_observations_are_four_stacked_84x84_grey_uint8_frames():
    for env_id in ("PongNoFrameskip-v4", "ALE/Pong-v5"):
        info = probe_env(env_id)
        assert (info.obs_shape, info.obs_dtype, info.num_actions) == ((4, 84, 84), np.uint8, 6)
        assert info.family == "atari"
    vec = make_vector_env("ALE/Pong-v5", 3)
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, 4, 84, 84) and obs.dtype == np.uint8
    vec.close()
    assert (
        probe_env("ALE/Pong-v5", atari_protocol=AtariProtocol(full_action_space=True)).num_actions
        == 18
    )


def test_frames_are_the_max_of_the_last_two_of_four_resized_to_84x84():
    """Against frames made here from the raw emulator: repeat each action 4 times, take the
    pixel-wise max of the last two grey frames, resize with area interpolation."""
    raw = gym.make("PongNoFrameskip-v4", obs_type="grayscale", repeat_action_probability=0.0)
    raw.reset(seed=3)
    vec = make_vector_env("PongNoFrameskip-v4", 1, atari_protocol=PLAIN)
    stacked, _ = vec.reset(seed=3)
    rng = np.random.default_rng(0)
    max_differs_from_last = 0
    made = []
    for _ in range(40):
        action = int(rng.integers(0, 6))
        frames = [raw.step(action)[0] for _ in range(4)]
        stacked = vec.step(np.array([action]))[0]
        want = cv2.resize(
            np.maximum(frames[-2], frames[-1]), (84, 84), interpolation=cv2.INTER_AREA
        )
        last_only = cv2.resize(frames[-1], (84, 84), interpolation=cv2.INTER_AREA)
        made.append(want)
        if len(made) >= 4:  # the stack: the last 4 frames, oldest first
            np.testing.assert_array_equal(stacked[0], np.stack(made[-4:]))
        max_differs_from_last += not np.array_equal(want, last_only)
    assert max_differs_from_last > 0  # the check would see a missing max
    vec.close()


def test_noop_starts_vary_up_to_30_and_can_be_turned_off():
    vec = make_vector_env("PongNoFrameskip-v4", 16)
    _, infos = vec.reset(seed=0)
    frames = infos["episode_frame_number"]
    assert frames.min() >= 0 and frames.max() <= 30 and len(set(frames.tolist())) > 3
    vec.close()
    vec = make_vector_env("PongNoFrameskip-v4", 4, atari_protocol=PLAIN)
    _, infos = vec.reset(seed=0)
    assert infos["episode_frame_number"].tolist() == [0, 0, 0, 0]
    vec.close()


def test_rewards_are_clipped_for_learning_and_reported_unclipped():
    """Space Invaders pays 5 to 30 points per invader: the unroll holds +1, the running score
    the points."""
    explorer, out = _explorer("ALE/SpaceInvaders-v5", 4, 20, reward_clip=1.0)
    learned = 0.0
    for _ in range(20):
        explorer.fill(out)
        learned += out["reward"].sum()
        if learned >= 3:
            break
    assert set(np.unique(out["reward"])) <= {0.0, 1.0} and learned >= 3
    assert explorer.episode_return.sum() >= 5 * learned  # unclipped points of the same steps


def test_a_lost_life_ends_the_episode_for_learning_only():
    """Breakout at random: every lost life is a zero discount (and a first step for the LSTM)
    while the game goes on; the reported episode is the whole game, over all 5 lives."""
    explorer, out = _explorer("ALE/Breakout-v5", 2, 50, episodic_life=True)
    learning_ends = game_ends = 0
    returns = []
    for _ in range(40):
        info = explorer.fill(out)
        learning_ends += int((out["discount"] == 0).sum())
        game_ends += len(info.episode_returns)
        returns += info.episode_returns
        if game_ends >= 1:
            break
    assert game_ends >= 1
    assert learning_ends >= 4 * game_ends + 1  # 5 lives per game, the last one is game over
    # Without episodic life only game overs end episodes.
    explorer, out = _explorer("ALE/Breakout-v5", 2, 50)
    ends = 0
    for _ in range(4):
        info = explorer.fill(out)
        assert int((out["discount"] == 0).sum()) == len(info.episode_returns)
        ends += len(info.episode_returns)


def test_minatar_planes_come_channel_first_as_uint8():
    info = probe_env("MinAtar/Breakout-v1")
    assert (info.obs_shape, info.obs_dtype, info.family) == ((4, 10, 10), np.uint8, "minatar")
    env = make_env("MinAtar/Breakout-v1")
    obs, _ = env.reset(seed=0)
    raw = env.unwrapped.game.state()
    np.testing.assert_array_equal(obs, np.moveaxis(raw, -1, 0))
    assert obs.dtype == np.uint8 and obs.flags.c_contiguous
    assert obs.sum() > 0


def test_an_atari_id_whose_rom_is_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ALE_ROMS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"ROM of 'ALE/Pong-v5' \(pong.bin\) is missing"):
        probe_env("ALE/Pong-v5")


@pytest.mark.parametrize(
    "package, env_id, install",
    [
        ("ale_py", "PongNoFrameskip-v4", "pip install 'impala-rl[atari]'"),
        ("minatar", "MinAtar/Breakout-v1", "pip install 'impala-rl[minatar]'"),
        ("minigrid", "MiniGrid-DoorKey-5x5-v0", "pip install 'impala-rl[minigrid]'"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_install_command(tmp_path, package, env_id, install):
    """The command run where the package cannot be imported (a stand-in that raises
    ImportError shadows it)."""
    (tmp_path / f"{package}.py").write_text(f"raise ImportError('No module named {package}')\n")
    env = env_with_tests_on_path()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "impala.cli",
            "train",
            "--env",
            env_id,
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and install in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_cartpole_without_velocities_hides_them():
    info = probe_env("CartPoleNoVelocity-v1")
    assert info.obs_shape == (2,) and info.max_episode_steps == 500
    env = make_env("CartPoleNoVelocity-v1")
    obs, _ = env.reset(seed=0)
    full = env.unwrapped.state
    np.testing.assert_allclose(obs, np.asarray(full, dtype=np.float32)[[0, 2]])


def test_atari_register_silences_the_banner():
    code = textwrap.dedent(
        """
        from impala.envs import make_vector_env
        make_vector_env("PongNoFrameskip-v4", 1).close()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == proc.stderr == "", proc.stderr
    assert atari.register()


def test_the_frame_cap_truncates_and_the_explorer_bootstraps():
    """108,000 frames (here 400, 100 agent steps) cut a game: truncated, not terminated, in the
    training vector env and in the single env; the explorer reports the 100-step episode, ends
    it for learning and bootstraps it from the value of its last observation."""
    protocol = AtariProtocol(noop_max=0, max_frames_per_episode=400)
    explorer, out = _explorer("PongNoFrameskip-v4", 2, 60, protocol=protocol)
    first = explorer.fill(out)
    assert first.episode_lengths == [] and (out["truncation_value"] == 0).all()
    second = explorer.fill(out)
    assert second.episode_lengths == [100, 100]  # a random Pong game lasts far longer
    cut = 100 - 60 - 1  # the 100th step is index 39 of the second unroll
    assert (out["discount"][cut] == 0).all() and (out["truncation_value"][cut] != 0).all()
    others = np.delete(np.arange(60), cut)
    assert (out["truncation_value"][others] == 0).all() and (out["discount"][others] > 0).all()

    env = atari.make_atari_env("PongNoFrameskip-v4", protocol)
    env.reset(seed=0)
    for step in range(1, 101):
        _, _, terminated, truncated, _ = env.step(0)
        assert not terminated and truncated == (step == 100)
    env.close()


def test_sticky_actions_and_the_full_action_set_are_as_asked():
    """The paper's protocol whatever the id says (ALE/*-v5 ids have 0.25 sticky actions of
    their own): no sticky actions and the minimal action set unless asked for; sticky actions
    with probability 1 repeat the first action (no-op) forever, whatever the agent picks."""
    assert atari.register()  # ale-py's ids, as probe_env registers them
    single = atari.make_atari_env("ALE/Breakout-v5", AtariProtocol())
    assert single.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    assert single.action_space.n == 4
    single.close()
    asked = AtariProtocol(sticky_actions=0.25, full_action_space=True)
    single = atari.make_atari_env("ALE/Breakout-v5", asked)
    assert single.unwrapped.ale.getFloat("repeat_action_probability") == 0.25
    assert single.action_space.n == 18
    single.close()
    assert probe_env("ALE/Breakout-v5", atari_protocol=asked).action.num_actions == 18
    vec = make_vector_env("ALE/Breakout-v5", 2, atari_protocol=asked)
    assert vec.single_action_space.n == 18
    vec.close()

    def frames(sticky: float, actions: np.ndarray) -> np.ndarray:
        protocol = AtariProtocol(noop_max=0, sticky_actions=sticky)
        vec = make_vector_env("PongNoFrameskip-v4", 2, atari_protocol=protocol)
        obs, _ = vec.reset(seed=3)
        seen = [obs]
        for a in actions:
            seen.append(vec.step(a)[0])
        vec.close()
        return np.stack(seen)

    moves = np.random.default_rng(0).integers(2, 4, size=(60, 2))  # Pong's up and down
    noops = np.zeros_like(moves)
    assert np.array_equal(frames(1.0, moves), frames(1.0, noops))
    assert not np.array_equal(frames(0.0, moves), frames(0.0, noops))
