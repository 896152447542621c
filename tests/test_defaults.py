"""The fallback preset (every env id without a preset of its own): what it is, and short runs on
two tasks of the defaults' benchmark (benchmarks/suite.py) with nothing but `--env`."""

from __future__ import annotations

import math
import time

import pytest
from conftest import hang_guard, train_cli

from impala.config import FALLBACK, FALLBACK_BOX, MINIGRID, PRESETS, resolve


@pytest.mark.parametrize("env_id", ["Acrobot-v1", "LunarLander-v3", "mypackage:Anything-v0"])
def test_ids_without_a_preset_get_the_fallback(env_id):
    cfg = resolve({"env": env_id})
    for name, value in PRESETS[FALLBACK].items():
        assert getattr(cfg, name) == value, name
    assert cfg.value_norm == "popart" and cfg.buffer == "replay" and cfg.loss == "appo"


@pytest.mark.parametrize("env_id", ["MountainCarContinuous-v0", "LunarLanderContinuous-v3"])
def test_ids_with_continuous_actions_get_the_continuous_fallback(env_id):
    cfg = resolve({"env": env_id})
    for name, value in PRESETS[FALLBACK_BOX].items():
        assert getattr(cfg, name) == value, name
    assert (cfg.buffer, cfg.loss, cfg.appo_passes, cfg.gamma) == ("fifo", "appo", 4, 0.99)


def test_pendulum_is_the_continuous_fallback_with_a_shorter_horizon():
    cfg = resolve({"env": "Pendulum-v1"})
    assert (cfg.buffer, cfg.loss, cfg.appo_passes, cfg.gamma) == ("fifo", "appo", 4, 0.95)
    assert resolve({"env": "Pendulum-v1", "gamma": 0.99}).gamma == 0.99  # yours wins


@pytest.mark.parametrize("env_id", ["MiniGrid-DoorKey-5x5-v0", "BabyAI-GoToLocal-v0"])
def test_minigrid_ids_get_the_fallback_with_a_growing_target_interval(env_id):
    cfg = resolve({"env": env_id})
    for name, value in PRESETS[MINIGRID].items():
        assert getattr(cfg, name) == value, name
    assert (cfg.loss, cfg.appo_target_interval, cfg.appo_target_growth) == ("appo", 1000, 0.1)
    assert resolve({"env": "Acrobot-v1"}).appo_target_growth == 0.0  # the fallback: fixed


def test_the_fallbacks_vtrace_extras_yield_to_the_seeds_choices():
    """--algo reinforce (or the seed's network) with the fallback is a run, not an error about
    the preset's PopArt or APPO, which only V-trace with a value head takes."""
    cfg = resolve({"env": "Acrobot-v1", "algo": "reinforce"})
    assert (cfg.value_norm, cfg.loss, cfg.buffer) == ("none", "impala", "replay")
    cfg = resolve({"env": "Acrobot-v1", "net": "seed"})
    assert (cfg.value_norm, cfg.loss) == ("none", "appo")


def test_presets_of_their_own_stay():
    assert resolve({}).net == "seed"  # the corridor: the seed's
    assert resolve({"env": "CartPole-v1"}).value_norm == "none"
    assert resolve({"env": "MinAtar/Breakout-v1"}).net == "minatar"


@pytest.mark.parametrize(
    "env_id, steps", [("Acrobot-v1", 24000), ("MiniGrid-Empty-Random-5x5-v0", 12000)]
)
def test_the_fallback_trains_on_suite_tasks(tmp_path, env_id, steps, record_property):
    if env_id.startswith("MiniGrid"):
        pytest.importorskip("minigrid")
    start = time.monotonic()
    _, _, _, records = train_cli(
        tmp_path, "--env", env_id, "--total-steps", str(steps), "--log-interval", "0.2"
    )
    # A step budget: only train_cli's subprocess timeout (240 s) is a time limit.
    hang_guard(time.monotonic() - start, 240, "training seconds", record_property)
    last = records[-1]
    # Acrobot's first episodes last 500 steps: uploads (every episode) start after that.
    assert last["updates"] > 10 and last["steps"] >= steps and last["return_mean"] is not None
    # The final record may come after the last update (explorers still finishing their share):
    # the update metrics are those of the last record with updates in its interval.
    learned = [r for r in records if "loss" in r][-1]
    assert math.isfinite(learned["loss"])
    if env_id == "Acrobot-v1":
        assert learned["popart_sigma"] > 1.0  # the scale of its returns
        assert 0.0 <= learned["clip_fraction"] <= 1.0  # APPO's loss
