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
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    docs = _field_docs()
    for field in dataclasses.fields(config_mod.Config):
        name = field.name
        flags = [*_ALIASES.get(name, ()), "--" + name.replace("_", "-")]
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": docs.get(name, ""),
        }
        default = field.default
        if field.type in ("bool", bool):
            kwargs["action"] = "store_true"
        elif name in config_mod.CHOICES:
            kwargs["choices"] = config_mod.CHOICES[name]
        elif field.type in ("int", int):
            kwargs["type"] = int
        elif field.type in ("float", float):
            kwargs["type"] = float
        elif field.type == "int | None":
            kwargs["type"] = _optional_int
        elif field.type == "float | None":
            kwargs["type"] = _optional_float
        if default not in (None, False, dataclasses.MISSING):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(*flags, **kwargs)


def build_job_parser() -> argparse.ArgumentParser:
    """The seed prototype's form: one task of a job of learners and explorers."""
    parser = _Parser(
        prog="impala",
        description="Run one task of a distributed job (the seed prototype's command line): "
        "start one process per address, in any order, e.g. "
        "'impala -l localhost:22222 -e localhost:22223 -j learner -t 0' and the same with "
        "'-j explorer'. Learner task 0 hosts the Ray head at its address.",
    )
    parser.add_argument(
        "-l", "--learner-hosts", required=True, help="host:port of every learner task"
    )
    parser.add_argument(
        "-e", "--explorer-hosts", required=True, help="host:port of every explorer task"
    )
    parser.add_argument(
        "-j",
        "--job-name",
        default="learner",
        choices=("learner", "explorer"),
        help="this task's job (default: learner)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for peers that are not up yet (default: 120)",
    )
    _add_config_options(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="impala",
        description="IMPALA (Espeholt et al. 2018) in PyTorch.",
        epilog="The seed prototype's job form runs one task of a job started by hand, e.g. "
        "'impala -l localhost:22222 -e localhost:22223 -j learner -t 0' (see "
        "'impala -l x:1 -e y:2 -h' for its options).",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train an agent",
        description="Train an agent. Defaults "
        "depend on the environment (see impala.config.PRESETS).",
    )
    _add_config_options(train)
    bench = sub.add_parser(
        "bench", help="measure the random-policy ceiling and training throughput"
    )
    _add_config_options(bench)
    bench.add_argument("--seconds", type=float, default=20.0, help="measured seconds of each phase")
    bench.add_argument("--warmup", type=float, default=5.0, help="training seconds not measured")
    bench.add_argument(
        "--ceiling-seconds",
        type=float,
        default=None,
        help="seconds of the random-policy phase (default: --seconds)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return _run_job(vars(build_job_parser().parse_args(argv)))
    parser = build_parser()
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


def _run_job(args: dict[str, Any]) -> int:
    from impala.runtime import jobs

    name = f"{args.get('job_name', 'learner')} {args.get('task_index', 0)}"
    try:
        spec = jobs.make_spec(
            args.pop("learner_hosts"),
            args.pop("explorer_hosts"),
            args.pop("job_name"),
            args.get("task_index", 0),
        )
        peer_timeout = args.pop("peer_timeout")
        if peer_timeout <= 0:
            raise ConfigError(f"--peer-timeout must be positive, got {peer_timeout!r}")
        args["num_explorers"] = len(spec.explorers)  # the host list says how many there are
        cfg = config_mod.resolve(args)
        from impala.envs import probe_env
        from impala.train import make_run_dir

        env = probe_env(cfg.env, max_episode_steps=cfg.max_steps_per_episode)
        run_dir = None
        if spec.job == "learner":
            run_dir = make_run_dir(cfg)
            (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        return jobs.run_task(cfg, spec, env, peer_timeout=peer_timeout, run_dir=run_dir)
    except ConfigError as exc:
        print(f"impala ({name}): error: {exc}", file=sys.stderr)
        return 2
    except jobs.JobFailed as exc:
        print(f"impala: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"impala ({name}): interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
