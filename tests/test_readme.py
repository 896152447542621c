"""The README, the project's front page, does what it says: every `impala` command in it parses,
every `impala train` line resolves to a valid config and draws no warning (a flag the run would
ignore, or one that defeats itself, as `--max-policy-lag 50` did on the replay buffer, dropping
87% of what the learner sampled), its marked block runs (with a tiny budget, as the docs'
snippets do: see tests/test_docs.py), its links lead somewhere, and it stays a front page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from test_docs import check_command, impala_lines, page_folder, read_blocks, run_page

from impala import config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = read_blocks(README)

__all__ = ["page_folder"]  # the fixture test_the_readme_runs uses


def _examples() -> list[str]:
    """The `impala train` lines of the README's Examples section."""
    section = README.read_text().split("## Examples", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in BLOCKS if block.text in section for line in impala_lines(block)]
    return [line for line in lines if shlex.split(line)[1:2] == ["train"]]


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:3] == ["Install", "Train and evaluate", "Examples"], headings
    assert "Results" in headings and "Documentation" in headings
    assert text.count("![") == 1  # one figure


def test_the_readme_has_a_dozen_train_examples():
    assert len(_examples()) >= 12


def test_every_readme_command_parses_and_resolves():
    commands = [line for block in BLOCKS for line in impala_lines(block)]
    assert len(commands) >= 18
    for line in commands:
        check_command(line)


def test_the_readme_runs(page_folder, capsys):
    run_page(README, page_folder, capsys)


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    development = README.read_text().split("## Development", 1)[1]
    assert "make test " in development.split("```", 2)[1]


def test_the_readme_links_lead_somewhere():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if not re.match(r"\w+://", t)]
    assert len(local) >= 20
    for target in local:
        assert (ROOT / target).exists(), target


def test_a_lag_limit_on_the_replay_buffer_is_warned_about():
    """An old README example: APPO's lag limit on the fallback's replay buffer, whose sequences
    are ~1,000 updates old by design: it threw away 87% of what the learner sampled (1,290
    updates of 36 steps instead of 2,500 of 160). One warning line now says so."""
    cfg = config.resolve({"env": "LunarLander-v3", "loss": "appo", "max_policy_lag": 50})
    (warning,) = config.inapplicable(cfg, {"env", "loss", "max_policy_lag"})
    assert warning.startswith("--max-policy-lag 50 with --buffer replay drops most of what")
    assert "about 1,000 updates' worth" in warning and "--buffer fifo" in warning
    deep_enough = config.resolve({"env": "LunarLander-v3", "max_policy_lag": 5000})
    assert config.inapplicable(deep_enough, {"env", "max_policy_lag"}) == []
