"""Device check: the GPU learner on a machine with one NVIDIA GPU and many cores, in one go.

    python benchmarks/device_check.py                  # or: make device-check
    python benchmarks/device_check.py --budget 480 --out runs/device-check

Meant for a 16-core, 1-GPU machine, and under 8 minutes there (`--budget`, seconds, default 460):
1. the CUDA tests (`pytest -m cuda`: the learner's device paths on the real GPU, the CPU and GPU
   updates compared, a policy acting on the GPU);
2. `impala bench --env PongNoFrameskip-v4 --device cuda` with an explorer per core but one
   (`--num-explorers auto`): the random-policy ceiling, the training throughput and their ratio,
   the learner's updates per second and the GPU's utilisation;
3. `impala train --env PongNoFrameskip-v4 --device cuda --seed 1` (its preset, explorers as
   above) timed to a mean score of 18 over the last 100 games (`--target-return 18`), stopped by
   what is left of the budget: the time and steps to 18, or the score reached when time ran out.
Then one table, printed and written to OUT/device-check.md (each step's output beside it).

Without a CUDA device it says so in one line and exits with 2 (a CPU-only torch, or no GPU
visible). Exit code 0 when every step ran (Pong not reaching 18 within the budget is a figure, not
a failure), 1 when a test failed or a command did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PONG = "PongNoFrameskip-v4"
TARGET = 18.0


def cuda_missing() -> str | None:
    """Why there is no CUDA device for the learner here, or None if there is one."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no GPU is visible to torch (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


def run(cmd: list[str], log: Path, timeout: float, cwd: Path | None = None) -> tuple[int, float]:
    """`cmd` with its output into `log`: its exit code (124 when it ran past `timeout` s: it is
    killed) and the seconds it took."""
    start = time.monotonic()
    with open(log, "w") as out:
        try:
            code = subprocess.run(
                cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.monotonic() - start


def impala(*args: str) -> list[str]:
    return [sys.executable, "-m", "impala.cli", *args]


def cuda_tests(out: Path, timeout: float) -> tuple[str, str, bool]:
    if not (REPO / "tests").is_dir():
        return "n/a", "no tests/ folder beside this script", True
    log = out / "cuda-tests.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]
    code, seconds = run(cmd, log, timeout, cwd=REPO)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    ok = code == 0
    return ("passed" if ok else f"FAILED (exit {code})"), f"{summary}; {seconds:.0f} s", ok


def pong_bench(out: Path, explorers: str, timeout: float) -> tuple[str, str, bool]:
    run_dir = out / "bench-pong"
    code, seconds = run(
        impala(
            "bench", "--env", PONG, "--device", "cuda", "--num-explorers", explorers,
            "--seconds", "45", "--warmup", "20", "--ceiling-seconds", "20",
            "--run-dir", str(run_dir),
        ),
        out / "bench-pong.log",
        timeout,
    )  # fmt: skip
    figures_file = run_dir / "bench.json"
    if code != 0 or not figures_file.exists():
        return f"FAILED (exit {code})", f"see {out / 'bench-pong.log'}", False
    f = json.loads(figures_file.read_text())
    gpu = f.get("gpu_utilization_percent")
    return (
        "done",
        f"{f['explorers']} explorers x {f['envs_per_explorer']} envs: ceiling "
        f"{f['random_ceiling_steps_per_s']:,.0f} steps/s, training "
        f"{f['training_steps_per_s']:,.0f} steps/s, ratio {f['ratio']:.0%}; learner "
        f"{f['learner_updates_per_s']:.1f} updates/s on {f['learner_device']}, GPU "
        + (f"{gpu:.0f}%" if gpu is not None else "n/a (nvidia-ml-py missing)")
        + f"; {seconds:.0f} s",
        True,
    )


def pong_to_18(out: Path, explorers: str, seconds: float) -> tuple[str, str, bool]:
    run_dir = out / "train-pong"
    code, _ = run(
        impala(
            "train", "--env", PONG, "--device", "cuda", "--seed", "1",
            "--num-explorers", explorers, "--target-return", str(TARGET),
            "--max-seconds", f"{seconds:.0f}", "--log-interval", "10", "--progress", "lines",
            "--run-dir", str(run_dir),
        ),
        out / "train-pong.log",
        seconds + 120,
    )  # fmt: skip
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    scored = [r for r in records if r.get("return_mean") is not None]
    if code != 0 or not scored:
        return f"FAILED (exit {code})", f"see {out / 'train-pong.log'}", False
    reached = next((r for r in scored if r["return_mean"] >= TARGET), None)
    if reached is not None:
        return (
            "reached 18",
            f"mean score {reached['return_mean']:.1f} at {reached['steps']:,} steps after "
            f"{reached['time']:.0f} s ({reached['steps'] / reached['time']:,.0f} steps/s)",
            True,
        )
    last, best = scored[-1], max(r["return_mean"] for r in scored)
    return (
        "not reached",
        f"mean score {last['return_mean']:.1f} (best {best:.1f}) at {last['steps']:,} steps "
        f"when the budget stopped it after {last['time']:.0f} s "
        f"({last['steps'] / max(last['time'], 1e-9):,.0f} steps/s); the command run alone "
        f"without --max-seconds goes on to 18",
        True,
    )


def table(rows: list[tuple[str, str, str]], header: str) -> str:
    lines = [header, "", "| check | result | figures |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=460.0, help="seconds for all three steps")
    parser.add_argument("--out", default=None, help="folder for the logs and the table")
    parser.add_argument(
        "--num-explorers", default="auto", help="explorers of the bench and the Pong run"
    )
    args = parser.parse_args()
    why = cuda_missing()
    if why is not None:
        print(f"device-check: no CUDA device here ({why}); it needs an NVIDIA GPU", file=sys.stderr)
        return 2
    import torch

    start = time.monotonic()
    out = Path(args.out or REPO / "runs" / time.strftime("device-check-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"device-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}), {len(os.sched_getaffinity(0))} cores, budget {args.budget:.0f} s"
    )
    print(header, flush=True)
    rows, ok = [], True

    def left() -> float:
        return args.budget - (time.monotonic() - start)

    print("1/3 CUDA tests ...", flush=True)
    result, figures, passed = cuda_tests(out, timeout=min(150.0, left()))
    rows.append(("CUDA tests (pytest -m cuda)", result, figures))
    ok &= passed
    print(f"    {result}: {figures}\n2/3 impala bench --env {PONG} --device cuda ...", flush=True)
    result, figures, passed = pong_bench(out, args.num_explorers, timeout=min(180.0, left()))
    rows.append((f"impala bench --env {PONG} --device cuda", result, figures))
    ok &= passed
    seconds = max(30.0, left() - 40.0)  # the run's start and end beside its training time
    print(f"    {result}: {figures}\n3/3 Pong to {TARGET:g} within {seconds:.0f} s ...", flush=True)
    result, figures, passed = pong_to_18(out, args.num_explorers, seconds)
    rows.append((f"{PONG} to a mean score of {TARGET:g} (seed 1)", result, figures))
    ok &= passed
    rows.append(("total", "ok" if ok else "FAILED", f"{time.monotonic() - start:.0f} s"))
    text = table(rows, header)
    (out / "device-check.md").write_text(text)
    print("\n" + text + f"\n(table and logs in {out})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
