"""Defaults that adapt to the machine: `--device auto` (the default) and `--num-explorers auto`,
and the one line `make device-check` prints where there is no CUDA device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main
from device_standin import StandInCuda

from impala.agent.learner import bf16_is_fast
from impala.config import Config, load_config_file, resolve
from impala.devices import auto_explorers, resolve_device, usable_cores

DEVICE_CHECK = Path(__file__).parent.parent / "benchmarks" / "device_check.py"


def test_the_learner_goes_where_auto_finds_a_gpu():
    """The default device is 'auto': the CPU where torch sees no GPU (nothing changes on CPU
    machines), CUDA where it sees one (the stand-in GPU here)."""
    assert Config().device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(resolve({"env": "CartPole-v1"}).device).type == expected
    with StandInCuda():
        assert resolve_device(resolve({"env": "CartPole-v1"}).device).type == "cuda"


def test_auto_explorers_are_one_per_core_but_the_learners():
    assert [auto_explorers(n) for n in (1, 2, 3, 16, 64)] == [2, 2, 2, 15, 63]
    assert auto_explorers() == auto_explorers(usable_cores()) >= 2


def test_num_explorers_auto_everywhere_a_setting_is_given(capsys, tmp_path):
    """'auto' from the command line, a config file and the Python API becomes the count for this
    machine when the config is made (config.json records the count that ran); other words are
    refused in one line."""
    n = auto_explorers()
    assert resolve({"env": "CartPole-v1", "num_explorers": "auto"}).num_explorers == n
    code, out, err = run_main(
        capsys, "train", "--env", "CartPole-v1", "--num-explorers", "auto", "--print-config"
    )
    assert code == 0 and json.loads(out)["num_explorers"] == n, err
    settings = tmp_path / "settings.yaml"
    settings.write_text("env: CartPole-v1\nnum-explorers: auto\n")
    assert load_config_file(settings)["num_explorers"] == "auto"
    code, out, err = run_main(capsys, "train", "--config", str(settings), "--print-config")
    assert code == 0 and json.loads(out)["num_explorers"] == n, err
    code, out, err = run_main(capsys, "train", "--num-explorers", "many", "--print-config")
    assert code == 2 and "--num-explorers" in err and "'many'" in err
    settings.write_text("num_explorers: many\n")
    with pytest.raises(Exception, match="num_explorers must be an integer"):
        load_config_file(settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_check_without_cuda_says_so_in_one_line_and_exits_2():
    """`make device-check` on a machine without CUDA: one line, exit code 2, nothing started."""
    proc = subprocess.run(
        [sys.executable, str(DEVICE_CHECK)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device-check: no CUDA device here ("), lines


def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """A GPU older than compute capability 8 runs bf16 only emulated: torch's
    `is_bf16_supported()` says yes for it unless asked without emulation, and 'auto' precision
    must not take bf16 there."""
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert not bf16_is_fast(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert bf16_is_fast(torch.device("cuda"))
