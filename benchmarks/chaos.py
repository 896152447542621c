"""Chaos check: explorers killed, hung and cut off mid-write while `impala train` runs.

    python benchmarks/chaos.py                       # 5 minutes each, every setting
    python benchmarks/chaos.py --minutes 1 --settings hung,slot-write --out chaos.json

For each setting a real `impala train` process runs, and every 5-15 s (10 s on average) one of
its explorers is hit, at whatever it is doing:
- `cartpole`, `learner-bound`, `ray`: SIGKILLed from outside (a local explorer process or a Ray
  actor's process); in the learner-bound setting explorers mostly wait for a free slot, and the
  check counts how many were killed while asleep in that wait;
- `hung`: stopped with SIGSTOP (alive, making no progress: an environment deadlocked in step());
  the run must notice within --explorer-timeout (5 s here), kill and restart it;
- `replay-upload`: SIGKILLed in the middle of copying its local buffer into its slice of the
  seed's replay buffer (an injected fault, `impala.faults`, armed by a trigger file);
- `slot-write`: SIGKILLed with an unroll written into its slot but not handed on, and every third
  time a forced torn write first: the slot handed on without its end serial, which the learner
  must detect (`torn_unrolls`) and not learn from.
Checked, and printed as figures:
- env steps and learner updates grow in every 30-s window after the warm-up;
- every hit explorer was restarted (restarts = hits);
- torn unrolls: none where none was forced, exactly as many as were forced in `slot-write`;
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
    "hung": ["--env", "CartPole-v1", "--explorer-timeout", "5"],
    "replay-upload": [
        "--env",
        "CartPole-v1",
        "--buffer",
        "replay",
        "--envs-per-explorer",
        "8",
        "--upload-frequency",
        "1",
        "--replay-ratio",
        "4",
        "--learn-batch-size",
        "160",
        "--buffer-size",
        "4000",
    ],
    "slot-write": ["--env", "CartPole-v1"],
}
# How each setting hits an explorer: from outside (a signal), or through a fault point armed by
# a trigger file that the next explorer to reach the point consumes.
HITS = {"hung": "stop", "replay-upload": "replay-upload", "slot-write": "slot-write"}
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


def _created(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return float("inf")


def _stopped(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return True


def _asleep(proc: psutil.Process) -> bool:
    """Sleeping in a timed wait: an explorer polling for a free slot (the only sleep in its
    loop) rather than stepping its environments or acting."""
    try:
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
        return proc.status() == psutil.STATUS_SLEEPING and "nanosleep" in wchan
    except (OSError, psutil.Error):
        return False


class _Hitter:
    """Hits one explorer of the run at a time, as its setting says (see the module doc), and
    counts the hits that landed: a signal lands at once; a trigger file when an explorer
    consumes it at its fault point (the next trigger waits until then)."""

    def __init__(self, name: str, root: psutil.Process, folder: Path, rng: random.Random):
        self.name, self.root, self.folder, self.rng = name, root, folder, rng
        self.how = HITS.get(name, "kill")
        self.landed, self.forced_torn, self.asleep = 0, 0, 0
        self.pending: Path | None = None
        self.pending_torn = False

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.how == "replay-upload":
            env["IMPALA_FAULTS"] = f"replay-upload!{self.folder / 'hit'}"
        elif self.how == "slot-write":
            env["IMPALA_FAULTS"] = (
                f"slot-write!{self.folder / 'hit'},slot-torn!{self.folder / 'torn'}"
            )
        return env

    def hit(self) -> None:
        self.settle()
        if self.pending is not None:
            return  # the last trigger has not been consumed yet
        if self.how in ("kill", "stop"):
            # A stopped (hung) one is being dealt with: never hit twice. Nor, for `hung`, one
            # still starting: its start-up has a grace of its own (120 s), beyond this run.
            young = time.time() - (15 if self.how == "stop" else 0)
            victims = [
                p
                for p in _explorers(self.root, self.name == "ray")
                if not _stopped(p) and _created(p) < young
            ]
            if victims:
                victim = self.rng.choice(victims)
                self.asleep += _asleep(victim)
                victim.send_signal(signal.SIGKILL if self.how == "kill" else signal.SIGSTOP)
                self.landed += 1
            return
        # Every third slot-write hit: a torn write forced first (handed on without its end
        # serial), then the kill.
        self.pending_torn = self.how == "slot-write" and (self.landed + 1) % 3 == 0
        self.pending = self.folder / ("torn" if self.pending_torn else "hit")
        self.pending.write_text("")

    def settle(self) -> None:
        if self.pending is not None and not self.pending.exists():
            self.landed += 1
            self.forced_torn += self.pending_torn
            self.pending = None

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.unlink(missing_ok=True)
        self.settle()


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
    hitter = _Hitter(name, None, run_dir.parent, rng)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=hitter.environment()
        )
    root = hitter.root = psutil.Process(proc.pid)
    descendants: set[psutil.Process] = set()
    memory, hit_times = [], []
    start = time.monotonic()
    next_hit = start + WARMUP / 2 + rng.uniform(0.5, 1.5) * every
    while proc.poll() is None:
        now = time.monotonic()
        descendants.update(root.children(recursive=True))
        memory.append((now - start, tree_rss_mib(root)))
        hitter.settle()
        # No hit in the run's last seconds: an explorer hit while the run ends is (rightly) not
        # restarted, which would read as a missed restart.
        if now >= next_hit and now - start < seconds - 15:
            landed = hitter.landed
            hitter.hit()
            if hitter.landed > landed or hitter.pending is not None:
                hit_times.append(round(now - start, 1))
            next_hit = now + rng.uniform(0.5, 1.5) * every
        if now - start >= seconds - 15:
            hitter.cancel()
        time.sleep(1.0)
    hitter.cancel()
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
    torn = records[-1].get("torn_unrolls")
    figures = {
        "setting": name,
        "seconds": round(records[-1]["time"], 1),
        "exit_code": proc.returncode,
        "hits": hitter.landed,
        "killed_while_waiting": hitter.asleep,
        "restarts": output.count("restarting it"),
        "hung_detected": output.count(": hung (see --explorer-timeout)"),
        "forced_torn": hitter.forced_torn,
        "steps": records[-1]["steps"],
        "updates": records[-1]["updates"],
        "min_steps_per_window": min((w["steps"] for w in windows), default=0),
        "min_updates_per_window": min((w["updates"] for w in windows), default=0),
        "windows": len(windows),
        "torn_unrolls": torn,
        "memory_mib_after_warmup": round(after[0], 1) if after else None,
        "memory_mib_max_after_warmup": round(max(after), 1) if after else None,
        "memory_growth": round(max(after) / after[0] - 1, 4) if after else None,
        "processes_left": left,
        "shm_left": sorted(set(os.listdir("/dev/shm")) - shm_before),
        "hit_times": hit_times,
    }
    figures["ok"] = bool(
        proc.returncode == 0
        and hitter.landed > 0
        and figures["restarts"] == hitter.landed
        and (name != "hung" or figures["hung_detected"] == hitter.landed)
        and figures["windows"] > 0
        and figures["min_steps_per_window"] > 0
        and figures["min_updates_per_window"] > 0
        and (ray or torn == hitter.forced_torn)
        and figures["memory_growth"] is not None
        and figures["memory_growth"] <= 0.10
        and not left
        and not figures["shm_left"]
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="per setting (default: 5)")
    parser.add_argument("--every", type=float, default=10.0, help="mean seconds between hits")
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
            f"{name}: {args.minutes:g} min, an explorer hit every ~{args.every:g} s ...",
            flush=True,
        )
        figures = run_setting(name, args.minutes * 60 + WARMUP, args.every, rng)
        results.append(figures)
        print(json.dumps({k: v for k, v in figures.items()}), flush=True)
    print()
    print(
        f"{'setting':<14} {'ok':<3} {'hits':>5} {'waiting':>7} {'min steps/30s':>13} "
        f"{'min upd/30s':>11} {'torn':>9} {'mem MiB':>8} {'growth':>7}"
    )
    for f in results:
        torn = f"{f['torn_unrolls']}/{f['forced_torn']}"
        print(
            f"{f['setting']:<14} {'yes' if f['ok'] else 'NO':<3} {f['hits']:>5} "
            f"{f['killed_while_waiting']:>7} {f['min_steps_per_window']:>13,} "
            f"{f['min_updates_per_window']:>11,} {torn:>9} "
            f"{f['memory_mib_after_warmup']:>8} {f['memory_growth']:>+7.1%}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(f["ok"] for f in results) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
