"""`impala eval`: whole episodes with a trained policy, and the statistics of their returns.

The weights come from a checkpoint file (`RUN_DIR/checkpoints/ckpt-<steps>.pt`, its config inside
it) or a run folder: its newest checkpoint that loads, else its `model.pt` with its `config.json`
(runs from before checkpoints). Everything is loaded on the CPU, so a GPU run's weights evaluate
on a machine without one.

The agent plays as it was trained, with the `impala.policy.Policy` a user's own loop gets from
`impala.load_policy` (one conversion of observations, one way of acting): the same environment
protocol (for Atari whole games, unclipped scores, with the training's no-op starts and sticky
actions), the recurrent state carried and reset as the explorers do. Each of the environments
stepped together plays a fixed share of the episodes, so short episodes are not over-represented.

With `--video FILE`, the first episode of environment 0 is recorded from the environment's own
`render()` (render_mode "rgb_array") and written by imageio's ffmpeg writer at the environment's
`render_fps` (an Atari game at its own speed, 15 agent steps a second: see `video_fps`): one
frame after the reset and one after every step, so an episode of L steps gives
L + 1 frames, the last one showing where it ended. The environments are then Gymnasium's single
ones stepped in a `SyncVectorEnv` (for Atari, the same protocol through Gymnasium's wrappers
rather than ale-py's vector environment, which does not render).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import IO, Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv

from impala.config import Config
from impala.envs import make_env, make_vector_env
from impala.envs.factory import PadChannels, env_family
from impala.errors import ConfigError, RunFailed
from impala.policy import Policy, Weights, load_policy, load_run, load_weights

__all__ = ["Weights", "evaluate", "load_run", "load_weights", "video_frame"]

MAX_PARALLEL_ENVS = 8
# The containers imageio-ffmpeg writes here with a codec each (WebM takes VP8/VP9 only).
VIDEO_CODECS = {
    ".mp4": "libx264",
    ".mkv": "libx264",
    ".mov": "libx264",
    ".avi": "libx264",
    ".webm": "libvpx-vp9",
}
DEFAULT_FPS = 30
# Atari's video: the console draws 60 frames a second and an agent's step is `frame_skip` of
# them (4: 15 steps a second), whatever the env's render_fps says (ale-py's 30).
ATARI_FRAMES_PER_SECOND = 60
MIN_VIDEO_SIDE = 160  # smaller pictures (MinAtar's 10x10) are enlarged by whole pixels


def check_video_path(path: Path) -> None:
    """ConfigError, one line, unless a video can be written at `path`."""
    if path.suffix.lower() not in VIDEO_CODECS:
        raise ConfigError(
            f"--video: '{path}' is not a video file name: its suffix must be one of "
            f"{', '.join(VIDEO_CODECS)}"
        )
    if path.is_dir():
        raise ConfigError(f"--video: '{path}' is a folder")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"--video: the folder '{folder}' does not exist")
    tmp = VideoFile.temporary(path)
    try:  # a real try: permissions alone do not tell (root, read-only mounts, /proc)
        tmp.open("wb").close()
        tmp.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--video: cannot write in the folder '{folder}': {exc.strerror}"
        ) from None


def video_frame(frame: Any) -> np.ndarray | None:
    """`render()`'s picture as what the video encoder takes: RGB uint8 `[H, W, 3]`, H and W even
    (enlarged by whole pixels if small). None if it is no picture."""
    if frame is None:
        return None
    a = np.asarray(frame)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.size == 0:
        return None
    a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[..., :3]
    if a.dtype.kind in "fb":  # floats in [0, 1] (matplotlib's convention: MinAtar) or booleans
        a = np.clip(a.astype(np.float64) * 255.0 + 0.5, 0, 255)
    a = a.astype(np.uint8, copy=False)
    k = -(-MIN_VIDEO_SIDE // max(a.shape[:2]))
    if k > 1:
        a = a.repeat(k, axis=0).repeat(k, axis=1)
    h, w = a.shape[:2]
    if h % 2 or w % 2:  # H.264 in 4:2:0 takes even sizes only
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return a


class VideoFile:
    """One video written frame by frame by imageio's ffmpeg writer, to a temporary name in the
    same folder that becomes `path` only when it is complete."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        self.tmp = self.temporary(path)
        self.frames = 0
        self._writer = None

    @staticmethod
    def temporary(path: Path) -> Path:
        return path.with_name(f".{path.stem}.part{path.suffix}")

    def append(self, frame: np.ndarray) -> None:
        try:
            if self._writer is None:
                import imageio.v2 as imageio

                self._writer = imageio.get_writer(
                    self.tmp,
                    format="FFMPEG",
                    fps=self.fps,
                    codec=VIDEO_CODECS[self.path.suffix.lower()],
                    macro_block_size=1,  # no resizing: frames are made even-sized instead
                    ffmpeg_log_level="error",
                )
            self._writer.append_data(frame)
        except (OSError, ValueError, RuntimeError) as exc:
            self.discard()
            raise RunFailed(f"--video: cannot write '{self.path}': {_one_line(exc)}") from None
        self.frames += 1

    def finish(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            os.replace(self.tmp, self.path)
        except (OSError, ValueError, RuntimeError) as exc:
            self.discard()
            raise RunFailed(f"--video: cannot write '{self.path}': {_one_line(exc)}") from None

    def discard(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)


class EpisodeRecorder(gym.Wrapper):
    """Renders its environment's first episode into `video`: after the first reset and after
    every step until the episode ends. Rendering inside `step` catches the last picture of the
    episode before the vector environment's same-step autoreset starts the next one."""

    def __init__(self, env: gym.Env, video: VideoFile, env_id: str) -> None:
        super().__init__(env)
        self.video = video
        self.env_id = env_id
        self.recording = False
        self.done = False
        self.steps = 0
        self.episode_return = 0.0

    def _capture(self) -> None:
        try:
            picture = self.env.render()
        except gym.error.DependencyNotInstalled as exc:
            raise ConfigError(
                f"--video: {self.env_id} cannot render frames: {_one_line(exc)}"
            ) from None
        frame = video_frame(picture)
        if frame is None:
            raise ConfigError(f"--video: {self.env_id} cannot render frames")
        self.video.append(frame)

    def reset(self, **kwargs):
        result = self.env.reset(**kwargs)
        if not self.done and not self.recording:
            self.recording = True
            self._capture()
        return result

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.recording:
            self.steps += 1
            self.episode_return += float(reward)
            self._capture()
            if terminated or truncated:
                self.recording, self.done = False, True
                self.video.finish()
        return obs, reward, terminated, truncated, info


def video_fps(cfg: Config, env_id: str, env: gym.Env) -> float:
    """Frames a second of a video of `env`, one frame per agent step: an Atari game plays at its
    own speed (the console's 60 frames a second over the protocol's frame skip), others at their
    `render_fps` (DEFAULT_FPS where they give none)."""
    if env_family(env_id) == "atari":
        return ATARI_FRAMES_PER_SECOND / cfg.atari_protocol.frame_skip
    return env.metadata.get("render_fps") or DEFAULT_FPS


def _recording_vector_env(
    cfg: Config, env_id: str, num_envs: int, video_path: Path, pad: tuple[int, ...] | None
) -> tuple[VectorEnv, EpisodeRecorder]:
    """`num_envs` single environments of `env_id` in a SyncVectorEnv, the first rendering into a
    video (`pad`: a multi-task network's frame shape)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame's pictures need no display
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Gymnasium's warning about an unknown render mode
            first = make_env(env_id, render_mode="rgb_array", **cfg.env_options)
    except ConfigError:
        raise
    except (TypeError, ValueError):  # an environment that takes no render_mode
        raise ConfigError(f"--video: {env_id} cannot render frames") from None
    modes = first.metadata.get("render_modes") or ()
    if first.render_mode != "rgb_array" or "rgb_array" not in modes:
        first.close()
        raise ConfigError(f"--video: {env_id} cannot render frames")
    fps = video_fps(cfg, env_id, first)
    recorder = EpisodeRecorder(first, VideoFile(video_path, fps), env_id)

    def padded(env: gym.Env) -> gym.Env:
        if pad is None or tuple(env.observation_space.shape) == tuple(pad):
            return env
        return PadChannels(env, pad[0])

    makers = [lambda: padded(recorder)] + [
        lambda: padded(make_env(env_id, **cfg.env_options)) for _ in range(num_envs - 1)
    ]
    try:
        vec_env = SyncVectorEnv(makers, autoreset_mode=AutoresetMode.SAME_STEP)
    except BaseException:
        first.close()
        raise
    return vec_env, recorder


def evaluate(
    path: Path | Policy,
    *,
    episodes: int = 10,
    greedy: bool = False,
    seed: int = 0,
    video: Path | None = None,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Plays `episodes` whole episodes with the policy of `path` (a run folder or a checkpoint
    file, or a loaded Policy); prints and returns the statistics of their unclipped returns (and
    the returns and lengths themselves). With `video`, records the first episode of environment
    0 there. A multi-task run's policy plays `episodes` of each of its tasks (a line and figures
    per task, under "tasks"; the video is of the first task)."""
    if episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {episodes}")
    out = out if out is not None else sys.stdout
    if video is not None:
        video = Path(video)
        check_video_path(video)
    policy = path if isinstance(path, Policy) else load_policy(Path(path), seed=seed)
    weights = Weights(policy.config, {}, policy.source, policy.steps)
    cfg, env = policy.config, policy.env_info
    if not env.tasks:
        return _play(policy, weights, cfg.env, episodes, greedy, seed, video, out)
    per_task = {
        task: _play(policy, weights, task, episodes, greedy, seed, video if k == 0 else None, out)
        for k, task in enumerate(env.tasks)
    }
    return dict(env=cfg.env, episodes=episodes, greedy=greedy, tasks=per_task)


def _play(
    policy: Policy,
    weights: Weights,
    env_id: str,
    episodes: int,
    greedy: bool,
    seed: int,
    video: Path | None,
    out: IO[str],
) -> dict[str, Any]:
    """`episodes` episodes of `env_id` (one of a multi-task run's tasks), printed and returned."""
    cfg, env = policy.config, policy.env_info
    num_envs = min(episodes, MAX_PARALLEL_ENVS)
    quota = [episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)]
    pad = env.padded_shape  # a multi-task network's frames
    recorder = None
    if video is None:
        vec_env = make_vector_env(env_id, num_envs, obs_shape=pad, **cfg.env_options)
    else:
        vec_env, recorder = _recording_vector_env(cfg, env_id, num_envs, video, pad)
    try:
        returns, lengths = _episodes(policy, vec_env, quota, greedy, seed)
    finally:
        vec_env.close()
        if recorder is not None and not recorder.done:
            recorder.video.discard()
    r = np.asarray(returns)
    figures = dict(
        env=env_id,
        episodes=episodes,
        greedy=greedy,
        return_mean=float(r.mean()),
        return_std=float(r.std()),
        return_min=float(r.min()),
        return_max=float(r.max()),
        length_mean=float(np.mean(lengths)),
        weights=str(weights.path),
        weights_steps=weights.steps,
        returns=returns,
        lengths=lengths,
    )
    how = "greedy actions" if greedy else "actions sampled from pi"
    protocol = ""
    if env.family == "atari":
        p = cfg.atari_protocol
        protocol = (
            f"; whole games, unclipped scores, up to {p.noop_max} no-op starts, sticky actions "
            f"{p.sticky_actions:g}, at most {p.max_frames_per_episode:,} frames"
        )
    print(
        f"{episodes} episodes of {env_id} ({how}{protocol}): return mean "
        f"{figures['return_mean']:.2f} +- {figures['return_std']:.2f} (std), min "
        f"{figures['return_min']:g}, max {figures['return_max']:g}; mean length "
        f"{figures['length_mean']:.0f} steps; weights {weights.describe()}",
        file=out,
        flush=True,
    )
    if recorder is not None:
        v = recorder.video
        figures.update(
            video=str(v.path),
            video_frames=v.frames,
            video_fps=v.fps,
            video_steps=recorder.steps,
            video_return=recorder.episode_return,
        )
        print(
            f"video: {v.path}, {v.frames} frames at {v.fps:g} fps (env 0's first episode: its "
            f"start and {recorder.steps} steps, return {recorder.episode_return:g})",
            file=out,
            flush=True,
        )
    return figures


def _episodes(
    policy: Policy, vec_env: VectorEnv, quota: list[int], greedy: bool, seed: int
) -> tuple[list[float], list[int]]:
    """Plays until environment i has finished `quota[i]` episodes: their unclipped returns and
    lengths, in the order they ended. As the explorers play: the environments reset with `seed`
    and actions sampled from a generator seeded with it, an LSTM's state reset at each episode's
    start (and at a lost life with --episodic-life, as in training) and fed the last reward."""
    episodic_life = policy.config.episodic_life
    policy.seed(seed)
    obs, infos = vec_env.reset(seed=seed)
    lives = infos.get("lives")
    quota = list(quota)
    n = len(quota)
    episode_return = np.zeros(n, dtype=np.float64)
    episode_length = np.zeros(n, dtype=np.int64)
    returns: list[float] = []
    lengths: list[int] = []
    state, reward, start = None, None, None
    while any(quota):
        actions, state = policy.act(obs, state, greedy=greedy, reward=reward, episode_start=start)
        obs, reward, terminated, truncated, infos = vec_env.step(actions)
        done = terminated | truncated
        start = done
        new_lives = infos.get("lives")
        if episodic_life and lives is not None and new_lives is not None:
            start = done | (np.asarray(new_lives) < lives)
        lives = new_lives
        episode_return += reward
        episode_length += 1
        for i in np.flatnonzero(done).tolist():
            if quota[i]:
                quota[i] -= 1
                returns.append(float(episode_return[i]))
                lengths.append(int(episode_length[i]))
        episode_return[done] = 0.0
        episode_length[done] = 0
    return returns, lengths


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
