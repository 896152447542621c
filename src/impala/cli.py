"""The `impala` command: the one place where argv is read.

    impala train [options]     train (default: the seed's short corridor, single machine)
    impala bench [options]     random-policy ceiling vs training throughput
    impala eval RUN_DIR        play whole episodes with a trained policy
    impala plot RUN_DIR ...    draw runs' return curves into an image (default RUN_DIR/plot.png)

Every seed prototype flag keeps its short and long name. Long options are spelt in full (no
prefixes); an unknown one is named with the closest real ones. Bad input ends with one line
naming the problem and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from impala import __version__
from impala import config as config_mod
from impala.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    ConfigError,
    RunFailed,
    exit_code_for_signal,
)
from impala.shutdown import Interrupted, StopSignals

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


# names other RL libraries give to options of ours that difflib does not find from them (in
# their hyphen spelling; only names that mean one option of ours)
_FOREIGN_NAMES: dict[str, str] = {
    "--lr": "--learning-rate",
    "--num-envs": "--envs-per-explorer",
    "--n-envs": "--envs-per-explorer",
    "--num-workers": "--num-explorers",
    "--num-actors": "--num-explorers",
    "--discount": "--gamma",
    "--discounting": "--gamma",
    "--ent-coef": "--entropy-cost",
    "--vf-coef": "--baseline-cost",
    "--max-grad-norm": "--grad-clip",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors. Long options are never abbreviated: a prefix
    such as --learning-rat would silently set the option it starts, and --lr would take
    --lr-schedule. An option this parser does not have is refused first, by name, with the
    closest options it has."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # also for the commands' parsers (parser_class)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Before argparse parses: an unknown option's value would otherwise be taken as a
        # positional, or its absence reported as a missing argument, hiding the typo. A parser
        # with commands leaves the check to the command's parser (it sees the command's options).
        if not any(action.nargs == argparse.PARSER for action in self._actions):
            unknown = _unknown_option(self, list(sys.argv[1:] if args is None else args))
            if unknown is not None:
                close = _closest_options(self, unknown)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                self.error(f"unknown option '{unknown}'{hint}")
        return super().parse_known_args(args, namespace)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [name for action in parser._actions for name in action.option_strings]


def _unknown_option(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first word of `argv` that argparse would read as an option (a leading '-', not a
    number, no space, before '--') and that is none of `parser`'s, without its '=VALUE'."""
    known = set(_option_strings(parser))
    for word in argv:
        if word == "--":  # what follows is positional
            return None
        if len(word) < 2 or word[0] not in parser.prefix_chars or " " in word:
            continue
        try:
            float(word)  # a negative number: a value (or argparse's own error)
            continue
        except ValueError:
            pass
        name = word.split("=", 1)[0]
        if name in known:
            continue
        if word[1] not in parser.prefix_chars and word[:2] in known:  # -s500: -s with its value
            continue
        return name
    return None


def _closest_options(parser: argparse.ArgumentParser, unknown: str) -> list[str]:
    """Up to 3 of `parser`'s options that `unknown` may have meant: the one another library's
    name stands for, else the nearest spellings (as for environment ids)."""
    # -h/--help is never what a misspelt option meant
    options = [name for name in _option_strings(parser) if name not in ("-h", "--help")]
    foreign = _FOREIGN_NAMES.get(unknown.replace("_", "-"))
    if foreign in options:
        return [foreign]
    return difflib.get_close_matches(unknown, options, n=3)


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "inf", "off"):
        return None
    return float(text)


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    return int(text)


def _int_or_auto(text: str) -> int | str:
    """A count or 'auto' (`config.AUTO_COUNTS`: the machine's, when the config is made)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    """`--env-kwargs '{"size": 5}'`: a JSON object (argparse reports a ValueError in one line)."""
    from impala.refs import parse_kwargs

    try:
        return parse_kwargs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in config_mod.CHOICES:
            kwargs["choices"] = config_mod.CHOICES[name]
        elif name in config_mod.AUTO_COUNTS:
            kwargs["type"] = _int_or_auto
        elif field.type in ("int", int):
            kwargs["type"] = int
        elif field.type in ("float", float):
            kwargs["type"] = float
        elif field.type == "int | None":
            kwargs["type"] = _optional_int
        elif field.type == "float | None":
            kwargs["type"] = _optional_float
        elif field.type == "dict[str, Any]":
            kwargs["type"], kwargs["metavar"] = _json_object, "JSON"
        if default not in (None, False, dataclasses.MISSING):
            kwargs["help"] += f" (default: {default})"
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help texts
        parser.add_argument(*flags, **kwargs)


def _add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings (defaults < the environment's preset < yours) as JSON, "
        "with what their 'auto' values resolve to for the environment on this machine under "
        '"resolved" (network, obs-norm, device, precision), and exit',
    )


def _add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read settings from FILE: TOML (.toml), YAML (.yaml, .yml) or JSON (.json), keys "
        "named as the options (learning_rate or learning-rate). They go over the environment's "
        "preset and under the options given here. A run's config.json repeats that run (in a new "
        "folder: its run_dir is not reused)",
    )


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
        "--auth-token-file",
        default=None,
        help="file holding the job's Ray authentication token (default: one that learner 0 "
        "makes; see the README)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for peers that are not up yet (default: 120)",
    )
    _add_config_options(parser)
    _add_config_file(parser)
    _add_resume_options(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="impala",
        description="IMPALA (Espeholt et al. 2018) in PyTorch. Exit codes: 0 done, 1 failed "
        "at run time, 2 bad input, 130 stopped by SIGINT, 143 stopped by SIGTERM.",
        epilog="The seed prototype's job form runs one task of a job started by hand, e.g. "
        "'impala -l localhost:22222 -e localhost:22223 -j learner -t 0' (see "
        "'impala -l x:1 -e y:2 -h' for its options).",
    )
    parser.add_argument("--version", action="version", version=f"impala {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train an agent",
        description="Train an agent. Defaults "
        "depend on the environment (see impala.config.PRESETS).",
    )
    _add_config_options(train)
    _add_print_config(train)
    _add_config_file(train)
    _add_resume_options(train)
    bench = sub.add_parser(
        "bench", help="measure the random-policy ceiling and training throughput"
    )
    _add_config_options(bench)
    _add_print_config(bench)
    _add_config_file(bench)
    bench.add_argument("--seconds", type=float, default=20.0, help="measured seconds of each phase")
    bench.add_argument("--warmup", type=float, default=5.0, help="training seconds not measured")
    bench.add_argument(
        "--ceiling-seconds",
        type=float,
        default=None,
        help="seconds of the random-policy phase (default: --seconds)",
    )
    evaluate = sub.add_parser(
        "eval",
        help="play whole episodes with a trained run's policy and print their returns",
        description="Play whole episodes with a trained policy and print the mean, spread, min "
        "and max of their unclipped returns, and which weights played. The policy comes from a "
        "checkpoint file, or from a run folder: its newest checkpoint that loads, else its "
        "model.pt and config.json. Weights load on the CPU, wherever they were trained.",
    )
    evaluate.add_argument(
        "run_dir",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run folder or a checkpoint file (RUN_DIR/checkpoints/ckpt-<steps>.pt)",
    )
    evaluate.add_argument("--episodes", type=int, default=10, help="episodes (default: 10)")
    evaluate.add_argument(
        "--greedy", action="store_true", help="the most probable action, not a sampled one"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="environment and sampling seed")
    evaluate.add_argument(
        "--video",
        metavar="FILE",
        default=None,
        help="record the first episode played (environment 0) to FILE, a .mp4, .mkv, .mov, "
        ".avi or .webm video, from the environment's own pictures at its frame rate (an Atari "
        "game at its own speed: 15 steps of 4 frames a second): one frame at the start and one "
        "per step; the statistics still cover --episodes episodes",
    )
    plot = sub.add_parser(
        "plot",
        help="draw the return curves of runs against env steps and wall time",
        description="Draw the mean return of the last 100 episodes of runs (their config.json "
        "and metrics.jsonl) against env steps and against wall time. Runs whose settings are "
        "the same but for the seed and logging settings are drawn as one curve, the mean over "
        "the seeds, with the min-max spread shaded.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    plot.add_argument(
        "-o",
        "--output",
        default=None,
        help="image file to write; its suffix names the format (default: RUN_DIR/plot.png for "
        "one run folder, plot.png here for several)",
    )
    plot.add_argument(
        "--x",
        choices=("steps", "time", "both"),
        default="both",
        help="x axis: env steps, wall time, or both side by side (default: both)",
    )
    plot.add_argument("--title", default=None, help="title above the figure")
    return parser


JOB_FLAGS = ("-l", "--learner-hosts", "-e", "--explorer-hosts", "-j", "--job-name")


def _is_job_form(argv: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in JOB_FLAGS for arg in argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The `impala` command. Exit codes: 0 done, 1 failed at run time, 2 bad input, 130/143
    stopped by SIGINT/SIGTERM (after the same clean-up and save as a normal end)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Handlers first, before the heavy imports: as PID 1 in a container a SIGTERM that finds no
    # handler is dropped by the kernel.
    with StopSignals() as signals:
        if argv[:1] == ["--version"]:
            print(f"impala {__version__}")
            return 0
        if _is_job_form(argv):
            return _run_job(argv, signals)
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            print(
                f"impala: error: no command before '{argv[0]}': did you mean "
                f"'impala train {' '.join(argv)}'? (commands: train, bench, eval, plot; the seed's "
                "job form needs -l and -e)",
                file=sys.stderr,
            )
            return 2
        parser = build_parser()
        args = vars(parser.parse_args(argv))
        command = args.pop("command")
        if command is None:
            parser.print_help()
            return 2
        return _guarded(f"impala {command}", lambda: _run_command(command, args, signals))


def _run_command(command: str, args: dict[str, Any], signals: StopSignals) -> int:
    if command == "plot":
        from pathlib import Path

        from impala.plot import plot

        plot(
            [Path(p) for p in args["run_dirs"]],
            Path(args["output"]) if args["output"] is not None else None,
            x=args["x"],
            title=args["title"],
        )
        return 0
    if command == "eval":
        from pathlib import Path

        from impala.evaluation import evaluate

        evaluate(
            Path(args["run_dir"]),
            episodes=args["episodes"],
            greedy=args["greedy"],
            seed=args["seed"],
            video=Path(args["video"]) if args["video"] is not None else None,
        )
        return 0
    print_config = args.pop("print_config", False)
    resume, override = args.pop("resume", None), args.pop("override", False)
    options = {k: args.pop(k) for k in ("seconds", "warmup", "ceiling_seconds") if k in args}
    for name, value in options.items():
        if value is not None and (value < 0 or (value == 0 and name != "warmup")):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be positive, got {value!r}")
    args, given = _with_config_file(args)
    cfg = config_mod.resolve(args)
    if print_config:
        from impala.training import resolved_settings

        print(cfg.to_json({config_mod.RESOLVED_KEY: resolved_settings(cfg)}))
        return 0
    if resume is None:  # a resumed run's settings are its checkpoint's, not these
        _warn(f"impala {command}", cfg, given)
    if command == "bench":
        from impala.bench import bench

        figures = bench(cfg, signals=signals, **options)
        return exit_code_for_signal(figures["signal"]) if figures.get("signal") else 0
    from impala.training import train

    result = train(cfg, signals=signals, resume=resume, given=set(args), override=override)
    return exit_code_for_signal(result.signal) if result.signal else 0


def _add_resume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        metavar="auto|RUN_DIR|CHECKPOINT",
        default=None,
        help="go on with a run from its newest good checkpoint (or the checkpoint file given): "
        "counters, learning-rate schedule and logs continue. 'auto': resume the run in "
        "--run-dir if it has a checkpoint, else start it there (rerun the same command after a "
        "preemption)",
    )
    parser.add_argument(
        "--override",
        action="store_true",
        help="with --resume: apply settings given here that differ from the checkpoint's "
        "(refused otherwise)",
    )


def _with_config_file(args: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The settings given (the options over their --config file's) and the names of those the
    user chose, for the warnings (see config.with_config_file)."""
    path = args.pop("config_file", None)
    if path is None:
        return args, set(args)
    return config_mod.with_config_file(args, path)


def _warn(prog: str, cfg: config_mod.Config, given: set[str]) -> None:
    for warning in config_mod.inapplicable(cfg, given):
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    note = config_mod.batch_note(cfg)
    if note:  # what was chosen, not a problem: with the run's own output
        print(f"{prog}: note: {note}", flush=True)


def _guarded(prog: str, run: Callable[[], int]) -> int:
    """The one place where errors become the project's one-line messages and exit codes."""
    try:
        return run()
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as exc:  # a signal before the run had anything to save
        print(f"{prog}: stopped by {exc} before training started", file=sys.stderr)
        return exit_code_for_signal(exc.signum)


def _run_job(argv: list[str], signals: StopSignals) -> int:
    args = vars(build_job_parser().parse_args(argv))
    name = f"{args.get('job_name', 'learner')} {args.get('task_index', 0)}"

    def run() -> int:
        from impala.runtime import jobs

        return jobs.run_from_args(args, signals)

    return _guarded(f"impala ({name})", run)


if __name__ == "__main__":
    sys.exit(main())
