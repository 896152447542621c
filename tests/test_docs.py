"""The documentation's snippets do what they say (docs/contributing-docs.md tells writers the same).

Every fenced code block of docs/**/*.md is read, with the marker comment on the line before it:

- no marker: every `impala ...` line of a shell block (`bash`, `console`, `sh` or no language;
  a leading `$ ` is dropped, a trailing `\\` continues the line, `#` starts a comment) is parsed
  by the real parser, and every `impala train`/`impala bench` line that needs no file of its own
  (no `--resume`, `--config`) resolves to a config without a warning;
- `<!-- test: run -->`: the block is also run, in order with the page's other run blocks, in one
  fresh folder per page (the current directory, on `sys.path` and `PYTHONPATH`): its `impala`
  lines in this process through `impala.cli.main` (exit code 0 wanted), a Python block with
  `exec`;
- `<!-- test: file PATH -->`: the block is written to PATH in the page's folder first;
- `<!-- test: skip REASON -->`: the block is not checked (shell variables, other hosts, a
  reader's own package).

Budgets are made tiny in run blocks so that the whole file takes well under a minute:
`impala train` runs on `--runtime serial` (unless it names a runtime, or resumes a named run),
`--total-steps N` and `-s N` become N // 1000 (at least 640), a line without a budget that does
not resume a named run gets `--total-steps 1280`, `impala eval` plays at most 3 episodes, and in
Python blocks every `total_steps=N` becomes N // 1000 (at least 640). `impala bench` and
other programs are not run.

The command-line reference page is generated (docs/hooks/cli_reference.py): the tests below
check that it names every option of every command with its help text, and that mkdocs.yml's nav
and the pages agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from impala import cli, config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SHELL = {"", "bash", "console", "sh", "shell"}
TINY_STEPS = 1280
MIN_STEPS = 640
MAX_EVAL_EPISODES = 3
SCALE = 1000


@dataclasses.dataclass
class Block:
    """One fenced code block of a page, with the marker comment before it (if any)."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None  # "run", "file" or "skip"
    argument: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def read_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of `page` in order, indentation removed (blocks inside admonitions
    and lists are indented)."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        marker, argument = _marker(lines, start)
        text = "\n".join(body) + "\n"
        blocks.append(Block(page, start + 1, lang.lower(), text, marker, argument))
        i += 1
    return blocks


def _marker(lines: list[str], fence: int) -> tuple[str | None, str]:
    """The `<!-- test: KIND ARGUMENT -->` comment ending on the last non-blank line before the
    fence at index `fence`."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return None, ""
    k = j
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    comment = " ".join(line.strip() for line in lines[k : j + 1])
    found = re.match(r"<!--\s*test:\s*(\w+)\s*(.*?)\s*-->$", comment)
    if not found:
        return None, ""
    kind, argument = found.groups()
    assert kind in ("run", "file", "skip"), f"{lines[k]!r}: unknown marker 'test: {kind}'"
    assert kind == "run" or argument, f"{lines[k]!r}: 'test: {kind}' needs an argument"
    return kind, argument


def impala_lines(block: Block) -> list[str]:
    """The `impala ...` command lines of a shell block, continuation lines joined, prompts and
    comments removed."""
    if block.lang not in SHELL:
        return []
    commands, joined = [], ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if not joined and block.lang == "console" and not line.startswith("$ "):
            continue  # a console block's output
        line = line[2:] if line.startswith("$ ") and not joined else line
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        if not joined.lstrip().startswith("impala"):
            joined = ""
            continue
        words = shlex.split(joined, comments=True)
        if words[:1] == ["impala"]:
            commands.append(" ".join(shlex.quote(word) for word in words))
        joined = ""
    return commands


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(DOCS)) for p in paths]


PAGES = pages()
RUN_PAGES = [p for p in PAGES if any(b.marker == "run" for b in read_blocks(p))]


# --- every command shown parses and resolves ----------------------------------------------


def check_command(line: str) -> None:
    """Parses `line` (`impala ...`) with the real parser; an `impala train`/`bench` line that
    needs no file of its own must resolve to a config without a warning."""
    argv = shlex.split(line)[1:]
    if not argv or argv[0] in ("--version", "-h", "--help") or "-h" in argv or "--help" in argv:
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if cli._is_job_form(argv):
                cli.build_job_parser().parse_args(argv)
                return
            args = vars(cli.build_parser().parse_args(argv))
    except SystemExit:
        pytest.fail(f"{line!r} does not parse: {stderr.getvalue().strip()}")
    command = args.pop("command")
    if command not in ("train", "bench") or {"resume", "config_file"} & {
        k for k, v in args.items() if v is not None
    }:
        return
    for key in ("print_config", "resume", "override", "seconds", "warmup", "ceiling_seconds"):
        args.pop(key, None)
    cfg = config.resolve(args)
    assert config.inapplicable(cfg, set(args)) == [], line


def test_the_docs_have_pages_and_commands():
    assert len(PAGES) >= 20
    commands = [
        c for p in PAGES for b in read_blocks(p) if b.marker != "skip" for c in impala_lines(b)
    ]
    assert len(commands) >= 40
    assert len(RUN_PAGES) >= 6


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_command_shown_parses_and_resolves(page):
    for block in read_blocks(page):
        if block.marker == "skip":
            continue
        for line in impala_lines(block):
            try:
                check_command(line)
            except (AssertionError, pytest.fail.Exception) as exc:
                raise AssertionError(f"{block.where}: {exc}") from None


def test_a_wrong_flag_in_the_docs_is_caught():
    """The checker itself: a misspelt flag, a wrong choice and a self-defeating setting fail."""
    for unparsable in (
        "impala train --env CartPole-v1 --learning-rat 0.1",
        "impala train --runtime threads",
        "impala eval",
        "impala -l localhost:1 -e localhost:2 -j chief",
    ):
        with pytest.raises(pytest.fail.Exception, match="does not parse"):
            check_command(unparsable)
    with pytest.raises(AssertionError):  # the FIFO buffer does not read -b: a warning
        check_command("impala train --env CartPole-v1 --buffer-size 100")
    check_command("impala train --env CartPole-v1 --resume runs/nowhere")  # parsed only


def test_markers_and_commands_are_read_as_documented(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- test: run -->\n```bash\n$ impala train --env A \\\n    --seed 1   # c\n"
        "pip install x\n```\n\n<!-- test: skip needs\na host -->\n    ```\n    impala -l $L\n"
        "    ```\n\n```console\n$ impala eval r\nreturn 5\n```\n"
    )
    run, skip, console = read_blocks(page)
    assert (run.marker, run.line, skip.marker, skip.argument) == ("run", 4, "skip", "needs a host")
    assert impala_lines(run) == ["impala train --env A --seed 1"]
    assert skip.text == "impala -l $L\n" and console.marker is None
    assert impala_lines(console) == ["impala eval r"]


# --- the marked snippets run --------------------------------------------------------------


def tiny(line: str, number: int = 0) -> list[str]:
    """The argv of a run block's `impala` line with its budgets made tiny (see the module
    docstring); a training line without a run folder gets `runs/docs-<number>`: in one process
    the default folder (`runs/<env>-<time>-<pid>`) of two runs started within a second is the
    same."""
    argv = shlex.split(line)[1:]
    if not argv:
        return argv
    command = argv[0]
    if command == "eval":
        out, i = [], 0
        while i < len(argv):
            if argv[i] == "--episodes":
                out += ["--episodes", str(min(int(argv[i + 1]), MAX_EVAL_EPISODES))]
                i += 2
            else:
                out.append(argv[i])
                i += 1
        if "--episodes" not in out:
            out += ["--episodes", str(MAX_EVAL_EPISODES)]
        return out
    if command != "train":
        return argv
    resumes_a_run = "--resume" in argv and argv[argv.index("--resume") + 1] != "auto"
    assert "ray" not in argv, f"{line!r}: Ray does not run in a docs test (use an unmarked block)"
    out, i, budget = [], 0, False
    while i < len(argv):
        if argv[i] in ("--total-steps", "-s"):
            out += [argv[i], str(max(MIN_STEPS, int(argv[i + 1].replace("_", "")) // SCALE))]
            budget = True
            i += 2
        else:
            out.append(argv[i])
            i += 1
    if not budget and not resumes_a_run:
        out += ["--total-steps", str(TINY_STEPS)]
    if "--runtime" not in argv and not resumes_a_run:
        out += ["--runtime", "serial"]
    if "--run-dir" not in argv and "--resume" not in argv and "--print-config" not in argv:
        out += ["--run-dir", f"runs/docs-{number}"]
    return out


def tiny_python(text: str) -> str:
    return re.sub(
        r"\btotal_steps\s*=\s*([\d_]+)",
        lambda m: f"total_steps={max(MIN_STEPS, int(m.group(1).replace('_', '')) // SCALE)}",
        text,
    )


def test_budgets_are_made_tiny():
    def words(text: str) -> list[str]:
        return text.split()

    assert tiny("impala train --env CartPole-v1", 3) == words(
        "train --env CartPole-v1 --total-steps 1280 --runtime serial --run-dir runs/docs-3"
    )
    assert tiny("impala train --resume runs/cp --total-steps 4000000") == words(
        "train --resume runs/cp --total-steps 4000"
    )
    assert tiny("impala train --resume runs/cp") == words("train --resume runs/cp")
    assert tiny("impala train -s 1000000 --run-dir d --resume auto") == words(
        "train -s 1000 --run-dir d --resume auto --runtime serial"
    )
    assert tiny("impala eval r --episodes 20 --video v.mp4") == words(
        "eval r --episodes 3 --video v.mp4"
    )
    assert tiny("impala eval r") == words("eval r --episodes 3")
    assert tiny_python("impala.Config(total_steps=2_000_000, seed=1)") == (
        "impala.Config(total_steps=2000, seed=1)"
    )


@pytest.fixture
def page_folder(tmp_path, monkeypatch):
    """A fresh folder, the current one, importable by this process and by spawned ones."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + (os.pathsep + path if path else ""))
    return tmp_path


def run_page(page: Path, folder: Path, capsys) -> None:
    """Writes the `file` blocks of `page` into `folder` (the current directory), then runs its
    `run` blocks in order (see the module docstring)."""
    ran = 0
    for block in read_blocks(page):
        if block.marker == "file":
            target = folder / block.argument
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text)
    for block in read_blocks(page):
        if block.marker != "run":
            continue
        if block.lang == "python":
            code = compile(tiny_python(block.text), block.where, "exec")
            exec(code, {"__name__": "__docs__"})
            ran += 1
            continue
        assert block.lang in SHELL, f"{block.where}: cannot run a '{block.lang}' block"
        for line in impala_lines(block):
            if shlex.split(line)[1:2] == ["bench"]:
                continue
            ran += 1
            argv = tiny(line, ran)
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code or 0
            out = capsys.readouterr()
            assert code == 0, f"{block.where}: impala {' '.join(argv)} -> {code}\n{out.err[-2000:]}"
    assert ran, f"{page}: its run blocks have nothing to run"


@pytest.mark.parametrize("page", RUN_PAGES, ids=_ids(RUN_PAGES))
def test_the_marked_snippets_run(page, page_folder, capsys):
    run_page(page, page_folder, capsys)


# --- the generated command-line reference --------------------------------------------------


def _cli_reference():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", DOCS / "hooks" / "cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_names_every_option_of_every_command():
    reference = _cli_reference()
    page = reference.render()
    parser = cli.build_parser()
    commands = reference._subparsers(parser)
    assert set(commands) >= {"train", "bench", "eval", "plot"}
    for name, sub in [*commands.items(), ("job form", cli.build_job_parser())]:
        assert (f"## impala {name}" if name != "job form" else "## The job form") in page
        for action in reference._documented(sub):
            for flag in action.option_strings:
                assert f"`{flag}`" in page, f"{name}: {flag} is missing"
    # every setting once, with its help text (Config's field docstring) and its default
    docs = cli._field_docs()
    train = page.split("## impala train", 1)[1].split("\n## ", 1)[0]
    for field in dataclasses.fields(config.Config):
        flag = "--" + field.name.replace("_", "-")
        rows = [
            row
            for row in train.splitlines()
            if row.startswith(f"| `{flag}`") or f", `{flag}`" in row.split(" | ")[0]
        ]
        assert len(rows) == 1, f"{flag}: {len(rows)} rows"
        assert docs.get(field.name), f"Config.{field.name} has no docstring (its help text)"
        words = " ".join(docs[field.name].split()[:6])
        words = words.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        assert words in rows[0], flag
    assert "| `--gamma`" not in page  # -g comes first: the row reads "`-g`, `--gamma`"
    assert "| `-g`, `--gamma` | float | `0.99` |" in page


def test_the_cli_reference_groups_the_settings_as_config_does():
    reference = _cli_reference()
    sections = reference.config_sections()
    assert sections["env"] == "Task" and sections["runtime"] == "Explorers"
    assert sections["buffer"] == "Buffer" and sections["gamma"] == "Learning"
    assert sections["seed"] == "Run"
    assert set(sections) == {f.name for f in dataclasses.fields(config.Config)}
    page = reference.render()
    train = page.split("## impala train", 1)[1].split("\n## ", 1)[0]
    headings = re.findall(r"^### (.+)$", train, flags=re.M)
    parser = reference._subparsers(cli.build_parser())["train"]
    settings = [a for a in reference._documented(parser) if a.dest in sections]
    # an argparse group of the command line wins over Config's section
    expected = [reference._group_of(parser, a) or sections[a.dest] for a in settings]
    assert headings == list(dict.fromkeys(expected)), headings
    if all(reference._group_of(parser, a) is None for a in settings):  # today's command line
        assert headings == ["Task", "Explorers", "Buffer", "Learning", "Run"], headings


# --- the site's structure ------------------------------------------------------------------


def _nav_pages(nav) -> list[str]:
    found = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found += _nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_the_nav_and_the_pages_agree():
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(site["nav"])
    written = {str(p.relative_to(DOCS)) for p in PAGES}
    generated = {_cli_reference().PAGE}
    assert set(nav) == written | generated
    assert len(nav) == len(set(nav))
