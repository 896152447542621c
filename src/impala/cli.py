"""The `impala` command: the one place where argv is read.

    impala train [options]     train (default: the seed's short corridor, single machine)
    impala bench [options]     random-policy ceiling vs training throughput

Every seed prototype flag keeps its short and long name. Bad input ends with one line naming
the problem and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, NoReturn, Sequence

from impala import config as config_mod
from impala.errors import ConfigError

# field -> extra option strings (short seed flags and seed long names that differ)
_ALIASES: dict[str, tuple[str, ...]] = {
    "steps_per_explorer": ("-s",),
    "max_steps_per_episode": ("-m",),
    "buffer_size": ("-b",),
    "upload_frequency": ("-f",),
    "gamma": ("-g",),
    "learning_rate": ("-a",),
    "task_index": ("-t",),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "inf", "off"):
        return None
    return float(text)


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    return int(text)


def _field_docs() -> dict[str, str]:
    """Field docstrings of Config, read from its source (they are the help texts)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(config_mod.Config))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    docs = _field_docs()
    for field in dataclasses.fields(config_mod.Config):
        name = field.name
        flags = [*_ALIASES.get(name, ()), "--" + name.replace("_", "-")]
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": docs.get(name, "")}
        default = field.default
        if name in config_mod.CHOICES:
            kwargs["choices"] = config_mod.CHOICES[name]
        elif field.type in ("int", int):
            kwargs["type"] = int
        elif field.type in ("float", float):
            kwargs["type"] = float
        elif field.type == "int | None":
            kwargs["type"] = _optional_int
        elif field.type == "float | None":
            kwargs["type"] = _optional_float
        if default is not None and default is not dataclasses.MISSING:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="impala", description="IMPALA (Espeholt et al. 2018) in PyTorch.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser("train", help="train an agent", description="Train an agent. Defaults "
                           "depend on the environment (see impala.config.PRESETS).")
    _add_config_options(train)
    bench = sub.add_parser("bench", help="measure the random-policy ceiling and training throughput")
    _add_config_options(bench)
    bench.add_argument("--seconds", type=float, default=20.0, help="measured seconds of each phase")
    bench.add_argument("--warmup", type=float, default=5.0, help="training seconds not measured")
    bench.add_argument("--ceiling-seconds", type=float, default=None,
                       help="seconds of the random-policy phase (default: --seconds)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.exit(2, "impala: error: the seed's job command lines (-l/-e/-j/-t) need the "
                    "distributed runtime, which this version does not have yet; use "
                    "'impala train'\n")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command is None:
        parser.print_help()
        return 2
    try:
        if command == "bench":
            from impala.bench import bench

            options = {k: args.pop(k) for k in ("seconds", "warmup", "ceiling_seconds")}
            bench(config_mod.resolve(args), **options)
        else:
            from impala.train import train

            train(config_mod.resolve(args))
    except ConfigError as exc:
        print(f"impala {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"impala {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
