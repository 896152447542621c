"""The Python API's entry points: `impala.train` and `impala.evaluate`, and what they return.

They run what `impala train` and `impala eval` run (the same code, on every runtime), and
raise `ConfigError` with the one line the command prints for bad input.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from impala.callbacks import Hooks
from impala.config import Config
from impala.errors import ConfigError

if TYPE_CHECKING:
    from impala.policy import Policy

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `impala.train` returns once the run has ended and everything is saved.

    Attributes:
        run_dir: the run folder: config.json, metrics.jsonl, tensorboard/, checkpoints/ and
            model.pt (load the policy with `impala.load_policy(result.run_dir)`).
        env_steps: env steps made by all explorers (a resumed run's earlier sessions included).
        updates: learner updates.
        episodes: episodes finished.
        seconds: seconds of training (earlier sessions of a resumed run included).
        return_mean: the mean return of the last 100 episodes (unclipped); None if no episode
            ended.
        task_returns: a multi-task run's mean return of the last 100 episodes of each task.
        stop_reason: why the run ended: "step budget", "time limit", "target return",
            "callback: <reason>" (a callback's `StopTraining`), "SIGINT" or "SIGTERM".
        signal: the signal that stopped the run (Ctrl-C is `signal.SIGINT`), else None.
        last_metrics: the learner's metrics of its last update (loss, policy lag, ...).
    """

    run_dir: Path
    env_steps: int
    updates: int
    episodes: int
    seconds: float
    return_mean: float | None
    task_returns: dict[str, float]
    stop_reason: str
    signal: int | None
    last_metrics: dict[str, float]

    @property
    def steps_per_second(self) -> float:
        """Env steps a second over the run."""
        return self.env_steps / self.seconds if self.seconds > 0 else 0.0


def train(
    config: Config | None = None,
    *,
    callbacks: Sequence[Any] = (),
    resume: PathLike | None = None,
    override: bool = False,
    out: IO[str] | None = None,
) -> TrainResult:
    """Trains as `config` says: the same run as `impala train` with those settings.

    The run writes its folder (`config.run_dir`, default `runs/<env>-<time>-<pid>`) as the
    command does, on the runtime the config names (`"local"`: explorer processes, the default;
    `"serial"`: one process; `"ray"`). The local and Ray runtimes start processes: call `train`
    under `if __name__ == "__main__":` in a script (they are started by spawning).

    Ctrl-C (SIGINT) and SIGTERM end the run as its end does (explorers stopped, checkpoint and
    model.pt saved) and `train` returns, with `signal` set, when called from the main thread.

    Args:
        config: the settings, e.g. `impala.Config(env="CartPole-v1", total_steps=200_000)`.
            May be None with `resume`: the run goes on with its checkpoint's settings.
        callbacks: objects with any of `on_record`, `on_checkpoint` and `on_end`
            (`impala.Callback`); raise `impala.StopTraining` in one to end the run early.
        resume: go on with a run from its newest good checkpoint, as `--resume` does: a run
            folder, a checkpoint file, or "auto" (the run in `config.run_dir` if it has a
            checkpoint, else a new run there: rerun the same script after a preemption).
            Counters, the learning-rate schedule, logs and curves continue. The settings of
            `config` must be the checkpoint's, but for how long the run goes and how it is
            logged (`total_steps`, `max_seconds`, `checkpoint_interval`, ...).
        override: with `resume`, apply the settings of `config` that differ from the
            checkpoint's rather than refusing them.
        out: where progress lines and the summary go (default: standard output).

    Returns:
        The run's folder, counters, recent mean return and why it stopped.

    Raises:
        ConfigError: bad input (settings, an environment that cannot be made, a run folder
            that already holds a run, a checkpoint that does not fit); the message is the one
            line `impala train` prints.
        RunFailed: the run could not go on (an explorer in a crash loop), after the same
            clean-up and save as a normal end.
        Exception: what a callback raised, after the run has ended and been saved.
    """
    from impala import training

    hooks = Hooks(callbacks)
    if config is not None and not isinstance(config, Config):
        raise ConfigError(f"config must be an impala.Config, got {type(config).__name__}")
    if config is None and resume is None:
        raise ConfigError("impala.train needs a config (or resume= to go on with a run)")
    resume_arg = None if resume is None else os.fspath(resume)
    if resume_arg == "auto" and (config is None or config.run_dir is None):
        raise ConfigError(
            "resume='auto' needs config.run_dir: the folder to resume from (or to start in)"
        )
    given: set[str] = set()
    if config is not None and resume_arg is None:
        _warn_inapplicable(config)
    if config is None:
        config = Config()  # stands for the checkpoint's settings: none of its own is given
    elif resume_arg is not None:
        given = {f.name for f in dataclasses.fields(Config)}  # the whole config is the user's
    result = training.train(
        config, out=out, resume=resume_arg, given=given, override=override, hooks=hooks
    )
    if hooks.error is not None:
        raise hooks.error
    outcome = TrainResult(
        run_dir=Path(result.run_dir) if result.run_dir is not None else Path(),
        env_steps=result.steps,
        updates=result.updates,
        episodes=result.episodes,
        seconds=result.seconds,
        return_mean=result.return_mean,
        task_returns=dict(result.task_returns),
        stop_reason=result.stop_reason,
        signal=result.signal,
        last_metrics=dict(result.last_metrics),
    )
    hooks.end(outcome)
    return outcome


def _warn_inapplicable(config: Config) -> None:
    """`impala train`'s warnings for settings the run will not read (`--appo-clip` without
    `--loss appo`, ...), as Python warnings (UserWarning) from the caller's line. The settings
    the user chose are those that differ from what the env's preset alone makes: a Config does
    not remember how it was built (`dataclasses.replace` passes every field)."""
    from impala import config as config_mod

    preset = Config(env=config.env, env_kwargs=config.env_kwargs)
    chosen = {
        f.name
        for f in dataclasses.fields(Config)
        if getattr(config, f.name) != getattr(preset, f.name)
    }
    for message in config_mod.inapplicable(config, chosen):
        warnings.warn(message, UserWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `impala.evaluate` returns: the episodes' unclipped returns and lengths.

    Attributes:
        env: the environment id played (a multi-task run's ids, comma-separated).
        returns: each episode's return (unclipped, whole games for Atari), in the order they
            ended; a multi-task run's: every task's, task after task.
        lengths: each episode's length in agent steps, in the same order.
        greedy: whether the most probable actions were played.
        weights: the file the weights came from.
        weights_steps: env steps of that checkpoint; None for a run's final model.pt.
        video: the video written, if one was asked for.
        tasks: a multi-task run's results per task id (empty for one task).
    """

    env: str
    returns: list[float]
    lengths: list[int]
    greedy: bool
    weights: Path
    weights_steps: int | None
    video: Path | None = None
    tasks: dict[str, EvalResult] = dataclasses.field(default_factory=dict)

    @property
    def return_mean(self) -> float:
        """The mean return over the episodes."""
        return sum(self.returns) / len(self.returns)

    @property
    def return_std(self) -> float:
        """The standard deviation of the returns (over the episodes played, ddof 0)."""
        mean = self.return_mean
        return (sum((r - mean) ** 2 for r in self.returns) / len(self.returns)) ** 0.5

    @property
    def length_mean(self) -> float:
        """The mean episode length in agent steps."""
        return sum(self.lengths) / len(self.lengths)

    @classmethod
    def _from_figures(cls, figures: dict[str, Any]) -> EvalResult:
        if "tasks" in figures:
            tasks = {task: cls._from_figures(f) for task, f in figures["tasks"].items()}
            first = next(iter(tasks.values()))
            return cls(
                env=figures["env"],
                returns=[r for t in tasks.values() for r in t.returns],
                lengths=[n for t in tasks.values() for n in t.lengths],
                greedy=figures["greedy"],
                weights=first.weights,
                weights_steps=first.weights_steps,
                video=first.video,
                tasks=tasks,
            )
        return cls(
            env=figures["env"],
            returns=list(figures["returns"]),
            lengths=list(figures["lengths"]),
            greedy=figures["greedy"],
            weights=Path(figures["weights"]),
            weights_steps=figures["weights_steps"],
            video=Path(figures["video"]) if figures.get("video") else None,
        )


def evaluate(
    policy: PathLike | Policy,
    *,
    episodes: int = 10,
    greedy: bool = False,
    seed: int = 0,
    video: PathLike | None = None,
    out: IO[str] | None = None,
) -> EvalResult:
    """Plays whole episodes with a trained policy: what `impala eval` does.

    The environments are made as the run made them (for Atari the paper's protocol, whole
    games, unclipped scores); up to 8 play together, each a fixed share of the episodes.
    The summary line `impala eval` prints goes to `out`.

    Args:
        policy: a run folder (its newest checkpoint that loads, else its model.pt), a
            checkpoint file, or a Policy from `impala.load_policy`.
        episodes: episodes to play (a multi-task run: of each task).
        greedy: the most probable action instead of one sampled from the policy.
        seed: the environments' and the sampling's seed.
        video: a .mp4, .mkv, .mov, .avi or .webm file to record the first episode in.
        out: where the summary line goes (default: standard output).

    Returns:
        The episodes' returns and lengths (with their mean, spread...) and which weights
        played.

    Raises:
        ConfigError: nothing to load there, a file that is not a checkpoint, a video that
            cannot be written or an environment that cannot render.
    """
    from impala import evaluation

    figures = evaluation.evaluate(
        policy if not isinstance(policy, (str, os.PathLike)) else Path(policy),
        episodes=episodes,
        greedy=greedy,
        seed=seed,
        video=Path(video) if video is not None else None,
        out=out,
    )
    return EvalResult._from_figures(figures)
