"""Chaos check: explorers SIGKILLed at random moments while `impala train` runs.

    python benchmarks/chaos.py                       # 5 minutes each: cartpole, learner-bound, ray
    python benchmarks/chaos.py --minutes 1 --settings learner-bound --out chaos.json

For each setting a real `impala train` process runs; every 5-15 s (10 s on average) one of its
explorers (a local explorer process or a Ray actor's process) is killed with SIGKILL, at whatever
it is doing; in the learner-bound setting explorers mostly wait for a free slot, and the check
counts how many were killed while asleep in that wait. Checked, and printed as figures:
- env steps and learner updates grow in every 30-s window after the warm-up;
- every batch the learner took was whole (`torn_unrolls` stays 0 on the local runtime);
- the resident memory of all the run's processes stays within 10% of its size after warm-up;
- afterwards no process of the run and no new shared-memory segment is left.
Exit code 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from impala.bench import tree_rss_mib

SETTINGS = {
    "cartpole": ["--env", "CartPole-v1"],
    "learner-bound": [
        "--env",
        "CartPole-v1",
        "--num-hidden",
        "512",
        "--num-layers",
        "3",
        "--envs-per-explorer",
        "4",
        "--batch-size",
        "8",
    ],
    "ray": ["--env", "CartPole-v1", "--runtime", "ray"],
}
WARMUP = 30.0
WINDOW = 30.0


def _explorers(root: psutil.Process, ray: bool) -> list[psutil.Process]:
    found = []
    for proc in root.children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if (ray and "_ExplorerActor" in cmd) or (not ray and "multiprocessing.spawn" in cmd):
            found.append(proc)
    return found


def _asleep(proc: psutil.Process) -> bool:
    """Sleeping in a timed wait: an explorer polling for a free slot (the only sleep in its
    loop) rather than stepping its environments or acting."""
    try:
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
        return proc.status() == psutil.STATUS_SLEEPING and "nanosleep" in wchan
    except (OSError, psutil.Error):
        return False


def run_setting(name: str, seconds: float, every: float, rng: random.Random) -> dict:
    ray = name == "ray"
    run_dir = Path(tempfile.mkdtemp(prefix=f"impala-chaos-{name}-")) / "run"
    shm_before = set(os.listdir("/dev/shm"))
    argv = [
        sys.executable,
        "-m",
        "impala.cli",
        "train",
        *SETTINGS[name],
        "--run-dir",
        str(run_dir),
        "--total-steps",
        str(10**12),
        "--lr-schedule",
        "constant",
        "--max-seconds",
        str(seconds),
        "--log-interval",
        "1",
        "--max-restarts",
        "100",
    ]
    # The child's output goes to a file: a pipe read only at the end fills up and blocks it.
    log_path = run_dir.parent / f"{name}.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    descendants: set[psutil.Process] = set()
    kills, asleep, memory, kill_times = 0, 0, [], []
    start = time.monotonic()
    next_kill = start + WARMUP / 2 + rng.uniform(0.5, 1.5) * every
    while proc.poll() is None:
        now = time.monotonic()
        descendants.update(root.children(recursive=True))
        memory.append((now - start, tree_rss_mib(root)))
        # No kill in the run's last seconds: an explorer killed while the run ends is (rightly)
        # not restarted, which would read as a missed restart.
        if now >= next_kill and now - start < seconds - 5:
            victims = _explorers(root, ray)
            if victims:
                victim = rng.choice(victims)
                asleep += _asleep(victim)
                victim.kill()
                kills += 1
                kill_times.append(round(now - start, 1))
            next_kill = now + rng.uniform(0.5, 1.5) * every
        time.sleep(1.0)
    output = log_path.read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = []
    t = WARMUP
    while t + WINDOW <= records[-1]["time"]:
        inside = [r for r in records if t <= r["time"] <= t + WINDOW]
        windows.append(
            {
                "from": t,
                "steps": inside[-1]["steps"] - inside[0]["steps"] if inside else 0,
                "updates": inside[-1]["updates"] - inside[0]["updates"] if inside else 0,
            }
        )
        t += WINDOW
    after = [m for t_, m in memory if t_ >= WARMUP]
    time.sleep(2)
    left = [p.pid for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    figures = {
        "setting": name,
        "seconds": round(records[-1]["time"], 1),
        "exit_code": proc.returncode,
        "kills": kills,
        "killed_while_waiting": asleep,
        "restarts": output.count("restarting it"),
        "steps": records[-1]["steps"],
        "updates": records[-1]["updates"],
        "min_steps_per_window": min((w["steps"] for w in windows), default=0),
        "min_updates_per_window": min((w["updates"] for w in windows), default=0),
        "windows": len(windows),
        "torn_unrolls": records[-1].get("torn_unrolls"),
        "memory_mib_after_warmup": round(after[0], 1) if after else None,
        "memory_mib_max_after_warmup": round(max(after), 1) if after else None,
        "memory_growth": round(max(after) / after[0] - 1, 4) if after else None,
        "processes_left": left,
        "shm_left": sorted(set(os.listdir("/dev/shm")) - shm_before),
        "kill_times": kill_times,
    }
    figures["ok"] = bool(
        proc.returncode == 0
        and kills > 0
        and figures["restarts"] == kills
        and figures["windows"] > 0
        and figures["min_steps_per_window"] > 0
        and figures["min_updates_per_window"] > 0
        and (ray or figures["torn_unrolls"] == 0)
        and figures["memory_growth"] is not None
        and figures["memory_growth"] <= 0.10
        and not left
        and not figures["shm_left"]
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="per setting (default: 5)")
    parser.add_argument("--every", type=float, default=10.0, help="mean seconds between kills")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    results = []
    for name in args.settings.split(","):
        if name not in SETTINGS:
            parser.error(f"unknown setting '{name}' (choose from {', '.join(SETTINGS)})")
    for name in args.settings.split(","):
        print(
            f"{name}: {args.minutes:g} min, an explorer killed every ~{args.every:g} s ...",
            flush=True,
        )
        figures = run_setting(name, args.minutes * 60 + WARMUP, args.every, rng)
        results.append(figures)
        print(json.dumps({k: v for k, v in figures.items()}), flush=True)
    print()
    print(
        f"{'setting':<14} {'ok':<3} {'kills':>5} {'waiting':>7} {'min steps/30s':>13} "
        f"{'min upd/30s':>11} {'torn':>4} {'mem MiB':>8} {'growth':>7}"
    )
    for f in results:
        print(
            f"{f['setting']:<14} {'yes' if f['ok'] else 'NO':<3} {f['kills']:>5} "
            f"{f['killed_while_waiting']:>7} {f['min_steps_per_window']:>13,} "
            f"{f['min_updates_per_window']:>11,} {str(f['torn_unrolls']):>4} "
            f"{f['memory_mib_after_warmup']:>8} {f['memory_growth']:>+7.1%}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(f["ok"] for f in results) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
