"""The command-line reference page, generated at build time from the parser `impala.cli` builds.

`impala.cli` builds its options from `impala.config.Config` (each field's docstring is its help
text, its type and default the option's), so this page has one source with `impala train -h`:
nothing here is written by hand. MkDocs runs this file as a hook (`hooks:` in mkdocs.yml) and
`on_files` adds the page as `reference/cli.md`; `render()` is what tests/test_docs.py checks.

Options are grouped as the command line groups them: by an argparse argument group where the
parser has one, else by the section of `Config` the field sits in (the `# --- task ---`
comments of its source), else under the command's own options.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

DEFAULT_GROUPS = {"options", "optional arguments", "positional arguments"}
PAGE = "reference/cli.md"


def config_sections() -> dict[str, str]:
    """Config field -> the title of its section in the class's source (`# --- task ---`)."""
    from impala.config import Config

    names = {field.name for field in dataclasses.fields(Config)}
    sections: dict[str, str] = {}
    current = "Settings"
    for line in inspect.getsource(Config).splitlines():
        header = re.match(r"\s+# -+ ([^-].*?) -+\s*$", line)
        if header:
            current = header.group(1).strip().capitalize()
            continue
        # a field's line; a docstring line such as "    own: package.module:build" is none
        field = re.match(r"    (\w+): ", line)
        if field and field.group(1) in names and field.group(1) not in sections:
            sections[field.group(1)] = current
    return sections


def _config_defaults() -> dict[str, Any]:
    from impala.config import Config

    return {
        field.name: field.default
        for field in dataclasses.fields(Config)
        if field.default is not dataclasses.MISSING
    }


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _group_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str | None:
    for group in parser._action_groups:
        if action in group._group_actions and group.title not in DEFAULT_GROUPS:
            return group.title
    return None


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    return ", ".join(f"`{name}`" for name in action.option_strings)


def _type(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on/off"
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    if action.type is None and action.metavar:  # e.g. auto|RUN_DIR|CHECKPOINT
        return " \\| ".join(f"`{part}`" for part in action.metavar.split("|"))
    kind = getattr(action.type, "__name__", None) or "text"
    kind = {"_optional_int": "int or `none`", "_optional_float": "float or `none`"}.get(kind, kind)
    if kind == "str":
        kind = "text"
    if action.nargs in ("+", "*"):
        kind += ", one or more"
    return kind


def _default(action: argparse.Action, defaults: dict[str, Any]) -> str:
    if action.dest in defaults:  # a Config field: the parser suppresses its default
        value = defaults[action.dest]
    elif action.default in (argparse.SUPPRESS, None) or action.nargs == 0:
        return ""
    else:
        value = action.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "`none`"
    return f"`{value}`"


def _help(action: argparse.Action, defaults: dict[str, Any]) -> str:
    text = (action.help or "").replace("%%", "%")
    if _default(action, defaults) not in ("", "`none`"):  # the default has its own column
        text = re.sub(r" \(default: [^()]*\)$", "", text)
    return _escape(" ".join(text.split()))


def _table(actions: list[argparse.Action], defaults: dict[str, Any]) -> list[str]:
    lines = ["| option | value | default | what it does |", "|---|---|---|---|"]
    for action in actions:
        lines.append(
            f"| {_flags(action)} | {_type(action)} | {_default(action, defaults)} "
            f"| {_help(action, defaults)} |"
        )
    return lines + [""]


def _grouped(
    parser: argparse.ArgumentParser, actions: list[argparse.Action], sections: dict[str, str]
) -> dict[str, list[argparse.Action]]:
    groups: dict[str, list[argparse.Action]] = {}
    for action in actions:
        title = _group_of(parser, action) or sections.get(action.dest) or "Other options"
        groups.setdefault(title, []).append(action)
    return groups


def _documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and action.help != argparse.SUPPRESS
    ]


def _usage(parser: argparse.ArgumentParser, actions: list[argparse.Action], extra: str) -> str:
    """The usage line of `parser` over `actions` only, on one line, `extra` after the prog."""
    formatter = parser._get_formatter()
    formatter.add_usage(None, actions, [], prefix="")
    usage = " ".join(formatter.format_help().split())
    rest = usage[len(parser.prog) :] if usage.startswith(parser.prog) else " " + usage
    return f"{parser.prog} {extra}{rest.strip()}".strip()


def _command(
    name: str,
    parser: argparse.ArgumentParser,
    usage_name: str,
    sections: dict[str, str],
    defaults: dict[str, Any],
    settings: list[str],
    anchor: str,
    also: tuple[str, ...] = (),
) -> list[str]:
    """The section of one command: its description, its usage, then its options. A command that
    takes every setting (the Config fields, `settings`) has them in tables by group, under
    `impala train` (`anchor` "": here); the others list their own options in one table."""
    lines = [f"## {name}", ""]
    description = parser.description or ""
    if description:
        lines += [_escape(" ".join(description.split())), ""]
    actions = _documented(parser)
    takes_settings = bool(settings) and set(settings) <= {a.dest for a in actions}
    own = [a for a in actions if not (takes_settings and a.dest in settings)]
    lines += ["```", _usage(parser, own, "[SETTINGS] " if takes_settings else ""), "```", ""]
    if not takes_settings:
        return lines + _table(own, defaults)
    titles = list(dict.fromkeys(sections.get(dest, "Other settings") for dest in settings))
    where = f"[`impala train`]({anchor})" if anchor else "the tables below"
    lines += [
        f"`SETTINGS` are the settings of a run, in {where}: {', '.join(titles)}. "
        + (f"They are the same for {' and '.join(also)}. " if also and not anchor else "")
        + f"The options of `{usage_name}` itself:",
        "",
    ]
    lines += _table(own, defaults)
    if not anchor:
        by_dest = {a.dest: a for a in actions}
        grouped = _grouped(parser, [by_dest[d] for d in settings], sections)
        for title, group in grouped.items():
            lines += [f"### {title}", ""] + _table(group, defaults)
    return lines


def render() -> str:
    """The Markdown of the command-line reference, from the parsers of `impala.cli`."""
    from impala import cli

    sections = config_sections()
    defaults = _config_defaults()
    parser = cli.build_parser()
    commands = _subparsers(parser)
    out = [
        "# Command-line reference",
        "",
        '<div class="cli-reference" markdown>',
        "",
        "<!-- Generated at build time by docs/hooks/cli_reference.py from the parsers of "
        "impala.cli; edit the help texts in src/impala/config.py (Config's field docstrings) "
        "or src/impala/cli.py, not here. -->",
        "",
        "Generated from the parser the `impala` command builds; the settings' help texts are "
        "the docstrings of the fields of [`impala.config.Config`](api.md), so this page and "
        "`impala train -h` say the same. The defaults shown are `Config`'s own: the "
        "environment's [preset](presets.md) comes over them, and what you give wins "
        "(`impala train --env ID --print-config` shows a run's resolved settings). Every "
        "setting is also a key of a `--config FILE` (TOML, YAML or JSON; `learning_rate` or "
        "`learning-rate`).",
        "",
        " ".join(_escape(parser.description or "").split()),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    helps = {
        a.dest: a.help
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for a in action._choices_actions
    }
    for name in commands:
        out.append(f"| [`impala {name}`](#impala-{name}) | {_escape(helps.get(name) or '')} |")
    out += [
        "| [`impala -l ... -e ... -j ... -t ...`](#the-job-form) | one task of a job started by "
        "hand (the seed's job form) |",
        "| `impala --version` | the version |",
        "",
    ]
    train = commands.get("train")
    settings = (
        [a.dest for a in _documented(train) if a.dest in defaults] if train is not None else []
    )
    job = cli.build_job_parser()
    takers = [
        f"`impala {name}`"
        for name, sub in commands.items()
        if name != "train" and set(settings) <= {a.dest for a in _documented(sub)}
    ]
    if set(settings) <= {a.dest for a in _documented(job)}:
        takers.append("the job form")
    for name, sub in commands.items():
        anchor = "" if name == "train" else "#impala-train"
        out += _command(
            f"impala {name}",
            sub,
            f"impala {name}",
            sections,
            defaults,
            settings,
            anchor,
            tuple(takers),
        )
    out += _command(
        "The job form", job, "impala -l ... -e ...", sections, defaults, settings, "#impala-train"
    )
    out += ["", "</div>"]
    return "\n".join(out).rstrip() + "\n"


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
