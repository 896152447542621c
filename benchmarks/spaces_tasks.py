"""Gymnasium's own tasks with Discrete, Tuple and Dict observations, trained with `impala train
--env ID --seed S` and nothing else (the fallback preset the project picks for them), beside a
random policy's return and the task's known optimum; a Markdown table and `impala plot` curves.

    python benchmarks/spaces_tasks.py [--tasks FrozenLake-v1 ...] [--seeds 0 1 2]
        [--max-seconds 150] [--out runs/spaces]

Gymnasium's registry has no task with a `Dict` observation (its robotics tasks are another
package, gymnasium-robotics; MiniGrid's dicts carry a `Text` mission and reach the network
flattened, `impala.envs.minigrid`), so the `Dict` case is the project's own example
`impala.examples.envs:CueCorridor` (an `[H, W, C]` picture and a position).

Runs go to OUT/<task>-s<seed> with `--resume auto` (`suite.train_run`: an interrupted run picks
up where it stopped). `--max-seconds S` stops each run after S seconds of training (a normal end,
saved) for a machine that cannot afford the preset's 1M steps per run; the table says how many
steps each run got. Each finished policy is then played for `--episodes` episodes with `impala
eval` (actions sampled, as in training): the logged return is the mean of the last 100 training
episodes, noisy on Blackjack (a return's spread is about 1 there), the evaluated one is not.
The table goes to OUT/spaces.md (and stdout), the curves to OUT/<task>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
from pathlib import Path

from suite import _fmt, random_returns, records, train_run  # benchmarks/suite.py


@dataclasses.dataclass(frozen=True)
class Task:
    env: str
    space: str  # the observation space, as Gymnasium prints it (shortened)
    reference: float  # the optimal policy's mean return (or the best known)
    source: str  # where the reference comes from


TASKS = {
    t.env: t
    for t in (
        Task(
            "FrozenLake-v1",
            "Discrete(16)",
            0.744,
            "the optimal policy's success rate within the 100-step limit (dynamic programming)",
        ),
        Task("Taxi-v4", "Discrete(500)", 7.93, "the optimal policy's mean (dynamic programming)"),
        Task(
            "CliffWalking-v1",
            "Discrete(48)",
            -13.0,
            "the shortest path, -13 (the safe path one row up: -17)",
        ),
        Task(
            "Blackjack-v1",
            "Tuple(Discrete(32), Discrete(11), Discrete(2))",
            -0.043,
            "the optimal strategy's mean under Sutton and Barto's rules (dynamic programming)",
        ),
        Task(
            "impala.examples.envs:CueCorridor",
            "Dict(frame: Box(0, 255, (8, 8, 3), uint8), position: Box(-1, 1, (1,)))",
            0.97,
            "reading the cue: 1 - 3 steps x 0.01",
        ),
    )
}


def evaluate(run_dir: Path, episodes: int, seed: int = 1000) -> float | None:
    """The mean return of `episodes` episodes of the run's final policy (`impala eval`); None if
    they take over 5 minutes (CliffWalking has no time limit: a poor policy may wander long)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "impala.cli", "eval", str(run_dir)]
            + ["--episodes", str(episodes), "--seed", str(seed)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
    except subprocess.TimeoutExpired:
        return None
    found = re.search(r"return mean (-?[0-9.]+)", out)
    if found is None:
        raise SystemExit(f"impala eval {run_dir}: no return in its output:\n{out}")
    return float(found.group(1))


def figures(run_dir: Path, episodes: int) -> dict:
    recs = records(run_dir)
    return {
        "last": recs[-1]["return_mean"],
        "steps": recs[-1]["steps"],
        "seconds": recs[-1]["time"],
        "eval": evaluate(run_dir, episodes) if episodes else None,  # None: not evaluated
    }


def table(results: dict[str, list[dict]], random: dict[str, float], stop: str) -> str:
    rows = [
        "| task | observation space | command | env steps (mean) | wall time | last 100 "
        "episodes, mean over seeds (each) | evaluated (episodes) | random policy | reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for env, per_seed in results.items():
        task = TASKS[env]
        last = [f["last"] for f in per_seed]
        steps = statistics.fmean(f["steps"] for f in per_seed)
        seconds = statistics.fmean(f["seconds"] for f in per_seed)
        evaluated = "-"
        evals = [f["eval"] for f in per_seed]
        if None not in evals:
            evaluated = f"{_fmt(statistics.fmean(evals))} ({', '.join(map(_fmt, evals))})"
        rows.append(
            f"| {env} | `{task.space}` | `impala train --env {env} --seed S{stop}` "
            f"| {steps / 1e3:.0f}k | {seconds:.0f} s "
            f"| {_fmt(statistics.fmean(last))} ({', '.join(map(_fmt, last))}) "
            f"| {evaluated} | {_fmt(random[env])} | {task.reference:g}: {task.source} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/spaces"))
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop each run after this many seconds (default: the preset's step budget)",
    )
    parser.add_argument(
        "--episodes", type=int, default=1000, help="episodes of `impala eval` per run (0: none)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stop = [] if args.max_seconds is None else ["--max-seconds", f"{args.max_seconds:g}"]
    results: dict[str, list[dict]] = {}
    for env in args.tasks:
        name = env.replace("/", "_").replace(":", "_")
        dirs = [
            train_run(
                f"{name}-s{seed}",
                ["--env", env, "--seed", str(seed), "--log-interval", "1", *stop],
                args.out,
            )
            for seed in args.seeds
        ]
        results[env] = [figures(d, args.episodes) for d in dirs]
        plot = [sys.executable, "-m", "impala.cli", "plot", *map(str, dirs)]
        subprocess.call(plot + ["-o", str(args.out / f"{name}.png"), "--title", env])
    text = table(results, random_returns(list(results), args.out), "".join(" " + a for a in stop))
    (args.out / "spaces.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
