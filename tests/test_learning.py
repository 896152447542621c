"""The main jobs learn, run the way a user runs them (the `impala` command, real processes)."""

import importlib.util
import time

import pytest
from conftest import hang_guard, train_cli


def _train(tmp_path, *args, timeout=240):
    out, _, _, records = train_cli(tmp_path, *args, timeout=timeout)
    return out, records


@pytest.mark.parametrize(
    "args",
    [
        # the main job's learner (V-trace), half its default length, on the serial runtime:
        # deterministic, so the figure does not depend on the machine's load
        ("--runtime", "serial", "-s", "500000"),
        # the same on the asynchronous local runtime, where how explorers and the learner
        # interleave (the policy lag) changes with the load: the slow suite's
        pytest.param(("-s", "500000"), marks=pytest.mark.slow),
        # the seed's own learner; serial (deterministic), a shorter run
        ("--algo", "reinforce", "--runtime", "serial", "-s", "300000"),
    ],
    ids=["vtrace", "vtrace-local", "reinforce"],
)
@pytest.mark.timeout(700)
def test_main_job_learns_the_corridor_policy(tmp_path, args, record_property):
    """`impala train` (the seed's corridor): avg-right-prob ends within 0.59 +- 0.03."""
    start = time.monotonic()
    # A line per update (--log-interval 0): counted by updates, not by seconds.
    out, _ = _train(tmp_path, "--seed", "0", "--log-interval", "0", *args, timeout=600)
    hang_guard(time.monotonic() - start, 600, "training seconds", record_property)
    lines = [line for line in out.splitlines() if line.startswith("task 0 step ")]
    assert len(lines) >= 5
    prob = float(lines[-1].split("avg-right-prob=")[1])
    assert abs(prob - 0.59) <= 0.03, lines[-5:]


@pytest.mark.slow
def test_cartpole_reaches_475_within_60_seconds(tmp_path):
    _, records = _train(tmp_path, "--env", "CartPole-v1", "--log-interval", "1")
    reached = [r["time"] for r in records if (r["return_mean"] or 0) >= 475]
    assert reached, records[-1]
    assert reached[0] < 60, reached[0]


@pytest.mark.slow
def test_cartpole_on_ray_reaches_475(tmp_path):
    if importlib.util.find_spec("ray") is None:  # not imported: Ray reads its environment then
        pytest.skip("ray is not installed")
    _, records = _train(tmp_path, "--env", "CartPole-v1", "--runtime", "ray", "--log-interval", "1")
    reached = [r["time"] for r in records if (r["return_mean"] or 0) >= 475]
    assert reached, records[-1]
