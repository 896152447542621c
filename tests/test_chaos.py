"""The chaos check (benchmarks/chaos.py), 5 minutes per setting: explorers SIGKILLed at random
moments every ~10 s on the local runtime (CartPole, and learner-bound) and the Ray runtime,
stopped (hung), and killed in the middle of replay uploads and slot writes (with forced torn
writes, which must all be detected)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "chaos.py"


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    "setting", ["cartpole", "learner-bound", "ray", "hung", "replay-upload", "slot-write"]
)
def test_chaos(tmp_path, setting):
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--settings", setting, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    [figures] = json.loads(out.read_text())
    assert proc.returncode == 0 and figures["ok"], (figures, proc.stdout[-2000:])
    assert figures["hits"] >= 15 and figures["restarts"] == figures["hits"]
    if setting == "learner-bound":
        assert figures["killed_while_waiting"] > 0  # some kills landed in the wait for a slot
    if setting == "slot-write":
        assert figures["forced_torn"] > 0 and figures["torn_unrolls"] == figures["forced_torn"]
