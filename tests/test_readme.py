"""The README's examples do what their comments say: every `impala train` line of its Examples
parses, resolves to a valid config and draws no warning (a flag the run would ignore, or one
that defeats itself, as `--max-policy-lag 50` did on the replay buffer, dropping 87% of what the
learner sampled)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from impala import config
from impala.cli import build_parser

README = Path(__file__).parent.parent / "README.md"
# Lines that need something this test does not have: a user's package, a cluster, a run to
# resume, a config file; they are checked elsewhere (test_cli, test_checkpoint, test_config_file).
NEEDS_MORE = ("mypackage", "--ray-address", "--resume", "--config", " -h", "--print-config")


def _examples() -> list[str]:
    text = README.read_text()
    block = text.split("## Examples", 1)[1].split("```", 2)[1]
    lines, joined = [], ""
    for line in block.splitlines():
        joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            lines.append(joined.strip())
            joined = ""
    return [line for line in lines if line.startswith("impala train")]


EXAMPLES = [line for line in _examples() if not any(mark in line for mark in NEEDS_MORE)]


def test_the_readme_has_train_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("line", EXAMPLES)
def test_a_readme_example_resolves_without_warnings(line):
    command = line.split("#", 1)[0]
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts: [--greedy]
    argv = shlex.split(command)[1:]
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    for key in ("print_config", "resume", "override"):
        args.pop(key, None)
    cfg = config.resolve(args)
    assert config.inapplicable(cfg, set(args)) == [], line


def test_a_lag_limit_on_the_replay_buffer_is_warned_about():
    """The README's old example: APPO's lag limit on the fallback's replay buffer, whose
    sequences are ~1,000 updates old by design: it threw away 87% of what the learner sampled
    (1,290 updates of 36 steps instead of 2,500 of 160). One warning line now says so."""
    cfg = config.resolve({"env": "LunarLander-v3", "loss": "appo", "max_policy_lag": 50})
    (warning,) = config.inapplicable(cfg, {"env", "loss", "max_policy_lag"})
    assert warning.startswith("--max-policy-lag 50 with --buffer replay drops most of what")
    assert "about 1,000 updates' worth" in warning and "--buffer fifo" in warning
    deep_enough = config.resolve({"env": "LunarLander-v3", "max_policy_lag": 5000})
    assert config.inapplicable(deep_enough, {"env", "max_policy_lag"}) == []
