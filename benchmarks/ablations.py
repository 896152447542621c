"""The paper's comparisons, in small, on 2 cores: its Table 2 (off-policy corrections, with and
without replay) with APPO beside IMPALA, and a multi-task run with and without PopArt.

    python benchmarks/ablations.py table2 [--steps 2000000] [--seeds 0 1 2] [--out runs/ablations]
    python benchmarks/ablations.py multitask [--steps 6000000] [--seeds 0] [--out ...]

Every run is `impala train` with the flags the table names (resumable: an interrupted script picks
up where it stopped). `table2` writes OUT/table2.md: the mean return of the last 100 episodes at
the end of each run on MinAtar Breakout, mean and spread over seeds, per correction with and
without replay (`--replay-fraction 0.5`), and APPO (`--loss appo`). `multitask` writes
OUT/multitask.md: each game's return at the end of one run over three MinAtar games (the full
action set) with `--value-norm popart` and without.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from suite import records, train_run

TABLE2_ENV = "MinAtar/Breakout-v1"
TABLE2_ROWS = {  # name -> flags beyond --env, --seed and --total-steps
    "no correction": ["--correction", "none"],
    "epsilon-correction": ["--correction", "epsilon"],
    "1-step importance sampling": ["--correction", "is1"],
    "V-trace": ["--correction", "vtrace"],
}
REPLAY = ["--replay-fraction", "0.5", "--replay-size", "10000"]
APPO = ["--loss", "appo"]
GAMES = ("MinAtar/Breakout-v0", "MinAtar/Asterix-v0", "MinAtar/Freeway-v0")


def _final(run_dir: Path, key: str = "return_mean") -> float:
    with_key = [r for r in records(run_dir) if r.get(key) is not None]
    return with_key[-1][key]


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    spread = statistics.pstdev(values)
    return (
        f"{statistics.fmean(values):.1f} +- {spread:.1f} ({', '.join(f'{v:.1f}' for v in values)})"
    )


def table2(steps: int, seeds: list[int], out: Path) -> str:
    base = ["--env", TABLE2_ENV, "--total-steps", str(steps)]
    rows = [
        "| correction | without replay | with replay (half of each batch) |",
        "|---|---|---|",
    ]
    for name, flags in TABLE2_ROWS.items():
        cells = []
        for replay in ([], REPLAY):
            slug = f"{flags[1]}{'-replay' if replay else ''}"
            finals = [
                _final(train_run(f"{slug}-s{s}", [*base, *flags, *replay, "--seed", str(s)], out))
                for s in seeds
            ]
            cells.append(_cell(finals))
        rows.append(f"| {name} | {' | '.join(cells)} |")
    appo = [_final(train_run(f"appo-s{s}", [*base, *APPO, "--seed", str(s)], out)) for s in seeds]
    rows.append(f"| APPO (`--loss appo`, V-trace targets) | {_cell(appo)} | |")
    return "\n".join(rows)


def multitask(steps: int, seeds: list[int], out: Path) -> str:
    base = ["--env", ",".join(GAMES), "--num-explorers", "3", "--total-steps", str(steps)]
    rows = [
        "| value head | " + " | ".join(g.split("/")[1] for g in GAMES) + " |",
        "|---|" + "---|" * len(GAMES),
    ]
    for name, flags in {"PopArt per task": ["--value-norm", "popart"], "plain": []}.items():
        slug = "popart" if flags else "plain"
        dirs = [train_run(f"mt-{slug}-s{s}", [*base, *flags, "--seed", str(s)], out) for s in seeds]
        cells = [_cell([_final(d, f"return_mean/{g}") for d in dirs]) for g in GAMES]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("table2", "multitask"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.experiment == "table2":
        text = table2(args.steps or 2_000_000, args.seeds or [0, 1, 2], args.out)
    else:
        text = multitask(args.steps or 6_000_000, args.seeds or [0], args.out)
    (args.out / f"{args.experiment}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
