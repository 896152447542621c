"""The defaults' benchmark: `impala train --env ID --seed S` and nothing else, on Gymnasium tasks
with published PPO/A2C results at a known step budget, three seeds each; a Markdown table of our
mean and spread at the published budget beside the published figure, and `impala plot` curves.

    python benchmarks/suite.py [--tasks CartPole-v1 ...] [--seeds 0 1 2] [--out runs/suite]

Runs go to OUT/<task>-s<seed> with `--resume auto`, so an interrupted suite picks up where it
stopped (a finished run is only read). `--stop-at-budget` stops each run (SIGTERM: saved like a
normal end) once it is past its task's published budget rather than at its preset's total, which
saves most of the time on the tasks with budgets under 1M; the collapse check then covers the
budget only. `--args` adds flags to every run: an experiment, not the defaults. The table goes to
OUT/suite.md (and stdout), the curves to OUT/<task>.png.

A task passes when the mean over seeds of the return at the published budget (the mean of the last
100 episodes, as logged) reaches its target: 90% of the way from a uniformly random policy's
return (measured here, 100 episodes) to the published score, so that returns of any sign and
offset are judged alike (90% of a negative score would be better than the score). The table also
says whether the task's "solved" threshold (Gymnasium's reward_threshold) was reached. A run
collapses when the mean return over its last 10% is more than 10% of its return range below its
best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ZOO = "rl-baselines3-zoo benchmark.md"


@dataclasses.dataclass(frozen=True)
class Task:
    env: str
    algo: str  # the published algorithm
    budget: int  # its env steps
    score: float  # its mean return
    threshold: float | None  # the task's "solved" return (Gymnasium's reward_threshold)
    source: str = ZOO
    note: str = ""

    def target(self, random: float) -> float:
        """90% of the way from `random` (a random policy's return) to the published score."""
        return random + 0.9 * (self.score - random)


def random_return(env_id: str, episodes: int = 100, seed: int = 0) -> float:
    """The mean return of `episodes` episodes of uniformly random actions (the environment as
    `impala train` makes it, time limit included)."""
    from impala.envs import make_env

    env = make_env(env_id)
    env.action_space.seed(seed)
    total = 0.0
    try:
        for episode in range(episodes):
            env.reset(seed=seed + episode)
            done = False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                done = terminated or truncated
    finally:
        env.close()
    return total / episodes


def random_returns(envs: list[str], out: Path) -> dict[str, float]:
    """`random_return` of each env, kept in OUT/random.json (measured once)."""
    path = out / "random.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for env in envs:
        if env not in known:
            known[env] = random_return(env)
    path.write_text(json.dumps(known, indent=2) + "\n")
    return known


TASKS = {
    t.env: t
    for t in (
        Task("CartPole-v1", "A2C", 500_000, 500.0, 475.0),
        Task("Acrobot-v1", "PPO", 1_000_000, -73.5, -100.0),
        Task("LunarLander-v3", "PPO", 1_000_000, 242.1, 200.0, note="published on v2"),
        Task("MountainCar-v0", "PPO", 1_000_000, -110.4, -110.0, note="sparse reward"),
        # MiniGrid: the zoo's PPO saw MiniGrid's FlatObsWrapper observations, as ours do; the
        # reward is sparse (1 - 0.9 steps / max_steps on success, else 0).
        Task("MiniGrid-KeyCorridorS3R1-v0", "PPO", 500_000, 0.949, None, note="sparse reward"),
        Task("MiniGrid-DoorKey-5x5-v0", "PPO", 100_000, 0.964, None, note="sparse reward"),
    )
}


def run(
    task: Task, seed: int, out: Path, stop_at_budget: bool = False, extra: list[str] = ()
) -> Path:
    name = f"{task.env.replace('/', '_')}-s{seed}"
    # a metrics record every second (logging only): CartPole passes 0.5M steps in seconds
    args = ["--env", task.env, "--seed", str(seed), "--log-interval", "1", *extra]
    return train_run(name, args, out, stop_at=task.budget if stop_at_budget else None)


STOPPED_AT_BUDGET = "stopped_at_budget"  # a run's marker: stopped past its budget on purpose


def train_run(name: str, args: list[str], out: Path, stop_at: int | None = None) -> Path:
    """`impala train ARGS` in OUT/NAME (resumed if it was stopped, only read if it is done),
    its output in OUT/NAME.log; exits on a failed run. With `stop_at`, the run is sent SIGTERM
    once its metrics are past that many env steps (and marked, so that it is only read later)."""
    run_dir = out / name
    if (run_dir / STOPPED_AT_BUDGET).exists():
        return run_dir
    command = [sys.executable, "-m", "impala.cli", "train", *args, "--run-dir", str(run_dir)]
    command += ["--resume", "auto", "--progress", "lines"]
    start = time.monotonic()
    with open(out / f"{name}.log", "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stopped = False
        try:
            while process.poll() is None:
                time.sleep(1.0)
                if stop_at is not None and not stopped and _steps(run_dir) > stop_at:
                    process.send_signal(signal.SIGTERM)
                    stopped = True
            code = process.wait()
        finally:
            if process.poll() is None:  # this script interrupted: the run saves and stops too
                process.send_signal(signal.SIGTERM)
                process.wait()
    if stopped and code == 128 + signal.SIGTERM:
        (run_dir / STOPPED_AT_BUDGET).write_text(f"{stop_at}\n")
    elif code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log.name}")
    print(f"{name}: {time.monotonic() - start:.0f} s", flush=True)
    return run_dir


def _steps(run_dir: Path) -> int:
    """The env steps of a run's last metrics record (0 before the first)."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["steps"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if r.get("return_mean") is not None]


def figures(task: Task, run_dir: Path) -> dict:
    recs = records(run_dir)
    at_budget = [r for r in recs if r["steps"] <= task.budget] or recs[:1]
    returns = [r["return_mean"] for r in recs]
    tail = recs[int(0.9 * len(recs)) :]
    best, worst = max(returns), min(returns)
    tail_mean = statistics.fmean(r["return_mean"] for r in tail)
    return {
        "at_budget": at_budget[-1]["return_mean"],
        "seconds_to_budget": at_budget[-1]["time"],
        "best": best,
        "tail": tail_mean,
        "collapsed": best - tail_mean > 0.1 * (best - worst),
        "steps": recs[-1]["steps"],
        "seconds": recs[-1]["time"],
    }


def _fmt(x: float) -> str:
    """Returns of any scale: one decimal from 10 up, three significant digits below."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def table(results: dict[str, list[dict]], random: dict[str, float], extra: str = "") -> str:
    rows = [
        "| task | published (steps) | random policy | target | ours at that budget, mean +- std "
        "(seeds) | passes | solved threshold | best / last 10% (collapse?) | wall time to the "
        "budget | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for env, per_seed in results.items():
        task = TASKS[env]
        target = task.target(random[env])
        at = [f["at_budget"] for f in per_seed]
        mean = statistics.fmean(at)
        std = statistics.pstdev(at) if len(at) > 1 else 0.0
        seconds = statistics.fmean(f["seconds_to_budget"] for f in per_seed)
        best = statistics.fmean(f["best"] for f in per_seed)
        tail = statistics.fmean(f["tail"] for f in per_seed)
        collapsed = sum(f["collapsed"] for f in per_seed)
        note = f", {task.note}" if task.note else ""
        solved = "-"
        if task.threshold is not None:
            solved = f"{task.threshold:g}: {'yes' if mean >= task.threshold else 'no'}"
        rows.append(
            f"| {env} | {task.algo} {task.score:g} ({task.budget / 1e6:g}M{note}) "
            f"| {_fmt(random[env])} | {_fmt(target)} "
            f"| {_fmt(mean)} +- {_fmt(std)} ({', '.join(map(_fmt, at))}) "
            f"| {'yes' if mean >= target else 'no'} | {solved} | {_fmt(best)} / {_fmt(tail)} "
            f"({collapsed} of {len(per_seed)}) | {seconds:.0f} s "
            f"| `impala train --env {env} --seed S{' ' + extra if extra else ''}` |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument(
        "--stop-at-budget",
        action="store_true",
        help="stop each run once past its task's budget, not at its preset's total",
    )
    parser.add_argument(
        "--args", default="", help="flags added to every run, quoted (an experiment)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    extra = shlex.split(args.args)
    for env in args.tasks:
        task = TASKS[env]
        dirs = [run(task, seed, args.out, args.stop_at_budget, extra) for seed in args.seeds]
        results[env] = [figures(task, d) for d in dirs]
        subprocess.call(
            [
                sys.executable,
                "-m",
                "impala.cli",
                "plot",
                *map(str, dirs),
                "-o",
                str(args.out / f"{env.replace('/', '_')}.png"),
                "--title",
                env,
            ]
        )
    text = table(results, random_returns(list(results), args.out), args.args)
    (args.out / "suite.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
