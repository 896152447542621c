"""`impala eval RUN_DIR_OR_CHECKPOINT`: which weights play (a checkpoint file, a run folder's
newest good checkpoint, else its model.pt), `--video` (one whole episode, L steps -> L + 1
frames: the start and one per step), and bad input as one line with exit code 2.

Checkpoints load with map_location="cpu" (impala.checkpoint.load), which is what lets a GPU run's
checkpoint evaluate here; a checkpoint with CUDA tensors cannot be made on a machine without
CUDA, so that is not tested here."""

import dataclasses
import io
import sys

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from impala import checkpoint
from impala.agent.factory import build_model, settle
from impala.cli import main
from impala.config import resolve
from impala.envs import ShortCorridorEnv, probe_env
from impala.evaluation import evaluate, video_frame

BIG = 10**9  # env steps of the checkpoints made here: newer than any the training writes


def _save(run_dir, steps, cfg, model_state):
    state = {
        "config": dataclasses.asdict(cfg),
        "record": {},
        "model": model_state,
        "counters": {"steps": steps, "updates": 0},
    }
    return checkpoint.save(state, run_dir, keep=10)


def _untrained(env_id, run_dir, steps=BIG, seed=0, **fields):
    """A checkpoint of an untrained network for `env_id` in `run_dir`."""
    cfg = resolve({"env": env_id, "run_dir": str(run_dir), **fields})
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env, learner=False)
    torch.manual_seed(seed)
    return _save(run_dir, steps, cfg, build_model(cfg, env).state_dict())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short CartPole run on the serial runtime: config.json, model.pt (and the checkpoints
    the training writes, if it writes them)."""
    from impala.training import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = resolve(
        {"env": "CartPole-v1", "runtime": "serial", "total_steps": 2000, "run_dir": str(run_dir)}
    )
    train(cfg, out=io.StringIO())
    return run_dir


def _only_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _frames(path):
    return list(iio.imiter(path, plugin="FFMPEG"))


# --- which weights play --------------------------------------------------------------------------
def test_a_checkpoint_file_plays_with_the_config_inside_it(tmp_path, capsys):
    ckpt = _untrained("CartPole-v1", tmp_path / "run", steps=200_000)
    alone = tmp_path / "elsewhere" / "ckpt.pt"  # no config.json anywhere near it
    alone.parent.mkdir()
    alone.write_bytes(ckpt.read_bytes())
    assert main(["eval", str(alone), "--episodes", "3"]) == 0
    out, err = capsys.readouterr()
    line = _only_line(out)
    assert line.startswith("3 episodes of CartPole-v1 (actions sampled from pi): return mean ")
    assert line.endswith(f"; weights {alone} (200,000 env steps)")
    assert err == ""


def test_a_run_folder_plays_its_newest_good_checkpoint(trained, tmp_path, capsys):
    """Newer than the training's own checkpoints: one that loads, then a damaged one (skipped
    with a warning). The statistics are those of that checkpoint's weights."""
    good = _untrained("CartPole-v1", trained, steps=BIG, seed=1)
    damaged = checkpoint.path_for(trained, BIG + 1)
    damaged.write_bytes(good.read_bytes()[:3000])
    try:
        from_folder = evaluate(trained, episodes=4, greedy=True, seed=3, out=io.StringIO())
        _, err = capsys.readouterr()
        assert f"checkpoint '{damaged}' is damaged or truncated" in err
        from_file = evaluate(good, episodes=4, greedy=True, seed=3, out=io.StringIO())
    finally:
        damaged.unlink()
        good.unlink()
    assert from_folder["weights"] == str(good) and from_folder["weights_steps"] == BIG
    assert from_folder == from_file


def test_a_run_folder_without_checkpoints_plays_its_model_pt(trained, tmp_path, capsys):
    old = tmp_path / "old-run"  # a run from before checkpoints
    old.mkdir()
    for name in ("config.json", "model.pt"):
        (old / name).write_bytes((trained / name).read_bytes())
    assert main(["eval", str(old), "--episodes", "2", "--greedy"]) == 0
    line = _only_line(capsys.readouterr().out)
    assert line.startswith("2 episodes of CartPole-v1 (greedy actions)")
    assert line.endswith(f"; weights {old / 'model.pt'} (saved at the end of the run)")


# --- video ---------------------------------------------------------------------------------------
def test_video_of_cartpole_holds_the_whole_first_episode(tmp_path, capfd):
    pytest.importorskip("pygame", reason="CartPole draws with pygame (gymnasium[classic-control])")
    ckpt = _untrained("CartPole-v1", tmp_path / "run")
    video = tmp_path / "cartpole.mp4"
    # One episode: its length is the statistics' mean length.
    figures = evaluate(ckpt, episodes=1, video=video, out=io.StringIO())
    frames = _frames(video)
    assert len(frames) == figures["length_mean"] + 1 == figures["video_frames"]
    assert frames[0].shape == (400, 600, 3)
    assert iio.immeta(video, plugin="FFMPEG")["fps"] == 50  # CartPole's render_fps
    # More episodes than the one recorded, through the command.
    assert main(["eval", str(ckpt), "--episodes", "5", "--video", str(video)]) == 0
    out, err = capfd.readouterr()  # the file descriptors: SDL writes to fd 2 itself
    stats, said = out.strip().splitlines()
    assert stats.startswith("5 episodes of CartPole-v1")
    steps = int(said.split(" steps, ")[0].split()[-1])
    assert said.startswith(f"video: {video}, {steps + 1} frames at 50 fps (env 0's first episode")
    assert len(_frames(video)) == steps + 1
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["cartpole.mp4"]  # no .part
    assert "XDG_RUNTIME_DIR" not in err


def test_video_of_the_corridor_shows_the_agent_from_start_to_goal(tmp_path):
    ckpt = _untrained("ShortCorridor-v0", tmp_path / "run")
    video = tmp_path / "corridor.mkv"
    figures = evaluate(ckpt, episodes=1, seed=2, video=video, out=io.StringIO())
    frames = _frames(video)
    assert len(frames) == figures["length_mean"] + 1 == figures["video_steps"] + 1
    assert figures["video_fps"] == 4 and frames[0].shape == (48, 192, 3)
    agent = np.array([40, 60, 140])

    def agent_in(frame, cell):
        return np.abs(frame[24, 48 * cell + 24].astype(int) - agent).max() < 40

    assert agent_in(frames[0], 0) and not agent_in(frames[0], 3)
    assert agent_in(frames[-1], 3)  # the corridor ends at the goal only (no time limit here)


def test_video_of_an_atari_game_through_gymnasiums_wrappers(tmp_path):
    pytest.importorskip("ale_py")
    ckpt = _untrained("PongNoFrameskip-v4", tmp_path / "run", max_steps_per_episode=25)
    video = tmp_path / "pong.webm"
    figures = evaluate(ckpt, episodes=2, video=video, out=io.StringIO())
    frames = _frames(video)
    assert len(frames) == figures["video_steps"] + 1 and frames[0].shape == (210, 160, 3)
    assert figures["video_steps"] <= 25
    # The game's own speed: 60 frames a second, 4 of them per agent step (ale-py says 30 fps,
    # which played it twice as fast).
    assert figures["video_fps"] == 15 and iio.immeta(video, plugin="FFMPEG")["fps"] == 15


def test_video_frames_are_rgb_uint8_of_even_size():
    minatar_like = np.random.default_rng(0).random((10, 10, 3))  # floats in [0, 1]
    frame = video_frame(minatar_like)
    assert frame.dtype == np.uint8 and frame.shape == (160, 160, 3)
    assert frame[0, 0].tolist() == np.round(minatar_like[0, 0] * 255).astype(int).tolist()
    assert video_frame(np.zeros((201, 301), np.uint8)).shape == (202, 302, 3)
    assert video_frame(np.zeros((200, 300, 4), np.uint8)).shape == (200, 300, 3)
    assert video_frame(None) is None and video_frame(np.zeros(5)) is None


# --- bad input -----------------------------------------------------------------------------------
class _NoPictures(ShortCorridorEnv):
    metadata = {"render_modes": []}


def _bad_inputs(tmp_path):
    ckpt = _untrained("ShortCorridor-v0", tmp_path / "run")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    if "NoPictures-v0" not in gym.registry:
        gym.register("NoPictures-v0", entry_point=_NoPictures)
    blind = _untrained("NoPictures-v0", tmp_path / "blind")
    ok = str(ckpt)
    notes, empty = tmp_path / "notes.txt", tmp_path / "empty.pt"
    notes.write_text("a new user's guess at what eval takes\n")
    empty.write_bytes(b"")
    config_json = tmp_path / "run" / "config.json"
    config_json.write_text("{}")
    return [
        ([str(notes)], f"'{notes}' is not a checkpoint (not a file PyTorch wrote): give a run"),
        ([str(empty)], f"'{empty}' is not a checkpoint (an empty file)"),
        ([str(config_json)], f"'{config_json}' is not a checkpoint (not a file PyTorch wrote)"),
        ([str(tmp_path / "nothing")], f"'{tmp_path / 'nothing'}' is not a run folder or a check"),
        ([str(truncated)], f"checkpoint '{truncated}' is damaged or truncated"),
        ([str(tmp_path / "foreign.pt")], f"'{tmp_path / 'foreign.pt'}' is not an impala check"),
        ([ok, "--episodes", "0"], "--episodes must be positive, got 0"),
        ([ok, "--episodes", "-3"], "--episodes must be positive, got -3"),
        ([ok, "--video", str(tmp_path / "a.gif")], "its suffix must be one of .mp4, .mkv, .mov"),
        ([ok, "--video", str(tmp_path / "video")], f"'{tmp_path / 'video'}' is not a video file"),
        ([ok, "--video", str(tmp_path / "no" / "a.mp4")], f"folder '{tmp_path / 'no'}' does not"),
        ([str(blind), "--video", str(tmp_path / "a.mp4")], "--video: NoPictures-v0 cannot render"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    torch.save({"not": "ours"}, tmp_path / "foreign.pt")
    for args, message in _bad_inputs(tmp_path):
        capsys.readouterr()
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(["eval", *args]) == 2, args
        out, err = capsys.readouterr()
        line = _only_line(err)
        assert line.startswith("impala eval: error: ") and message in line, (args, line)
        assert out == ""
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no video, no .part


def test_an_env_that_cannot_draw_without_pygame_is_one_line(tmp_path, capsys, monkeypatch):
    ckpt = _untrained("CartPole-v1", tmp_path / "run")
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if it were not installed
    video = tmp_path / "a.mp4"
    assert main(["eval", str(ckpt), "--video", str(video)]) == 2
    line = _only_line(capsys.readouterr().err)
    assert "--video: CartPole-v1 cannot render frames: pygame is not installed" in line
    assert not video.exists() and not (tmp_path / ".a.part.mp4").exists()
