"""`impala plot`: learning curves of runs, read from their folders' config.json and metrics.jsonl.

Draws the mean return of the last 100 episodes (metrics.jsonl's "return_mean") against env steps
and against wall time, two panels side by side (or one of them: `x="steps"` or `x="time"`), every
run given overlaid. Runs whose config.json are the same but for the seed, the run folder and the
logging and run-control settings (`IGNORED_KEYS`) form a group: it is drawn as the mean over its
runs, with the min-max spread between them shaded, both taken on a common grid of x values
(linear interpolation) over the range that every run of the group covers. A group of one run is
its own curve over its whole range. Legend labels are the env id and the settings that differ
between the groups of that env, with "(n seeds)" for groups of several runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

import numpy as np

from impala.errors import ConfigError

# Settings that do not change what a run learns: runs differing only in these are seeds of one
# configuration.
IGNORED_KEYS = frozenset(
    {
        "seed",
        "run_dir",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "tensorboard",
        "wandb",
        "wandb_project",
        "wandb_name",
        "wandb_tags",
        "progress",
        "max_seconds",
        "print_steps",
        "task_index",
        "learner_threads",
        "explorer_nice",
        "device",
    }
)
X_CHOICES = ("steps", "time", "both")
GRID_POINTS = 200
DEFAULT_NAME = "plot.png"  # without -o: in the run folder, or the current one for several runs
Y_LABEL = "mean return (last 100 episodes)"
SPREAD_LABEL = "shaded: min-max over seeds"
PROG = "impala plot"
LABEL_WIDTH = 55  # characters of a legend line (a column is one panel wide)

# Short names of settings in legend labels (others appear under their own names).
SHORT_NAMES = {
    "learning_rate": "lr",
    "entropy_cost": "entropy",
    "baseline_cost": "baseline",
    "num_explorers": "explorers",
    "envs_per_explorer": "envs",
    "unroll_length": "unroll",
    "batch_size": "batch",
    "learn_batch_size": "learn_batch",
    "replay_ratio": "replay",
    "total_steps": "steps",
    "steps_per_explorer": "steps/explorer",
    "max_steps_per_episode": "max_ep_steps",
}
_MISSING = object()  # a setting absent from an (older) config.json


@dataclasses.dataclass
class Run:
    """One run folder's settings and its return curve (records without a return left out)."""

    path: Path
    config: dict[str, Any]
    steps: np.ndarray
    seconds: np.ndarray
    returns: np.ndarray


@dataclasses.dataclass
class Group:
    """Runs with the same settings but for `IGNORED_KEYS` (seeds of one configuration)."""

    settings: dict[str, Any]
    runs: list[Run]
    label: str = ""


def plot(
    run_dirs: list[Path],
    output: Path | None = None,
    *,
    x: str = "both",
    title: str | None = None,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Draws the runs' return curves into `output` (any format matplotlib writes, by its suffix;
    default `default_output(run_dirs)`) and prints one summary line that says where. Returns the
    figures: the output, runs drawn, skipped run folders, and the groups with their labels and
    run folders. Bad input is a ConfigError (one line)."""
    out = out if out is not None else sys.stdout
    if x not in X_CHOICES:
        raise ConfigError(f"--x must be one of {', '.join(X_CHOICES)}, got {x!r}")
    if not run_dirs:
        raise ConfigError("no run folder given")
    chosen = output is not None
    if chosen:  # checked before any run is read
        output = Path(output)
        _check_output(output)
    runs, skipped = [], []
    for path in _unique(run_dirs):
        run = load_run(path)
        if len(run.returns) == 0:
            print(f"{PROG}: warning: '{path}' has no return records yet; skipped", file=sys.stderr)
            skipped.append(str(path))
        else:
            runs.append(run)
    if not runs:
        raise ConfigError(f"no run has return records yet ({', '.join(skipped)}): nothing to plot")
    if not chosen:  # the run folders are known to exist now
        output = default_output(run_dirs)
        _check_output(output)
    groups = group_runs(runs)
    _draw(groups, output, x=x, title=title)
    n_runs, n_groups = len(runs), len(groups)
    print(
        f"plot: {n_runs} {_plural(n_runs, 'run')} ({n_groups} {_plural(n_groups, 'group')}) "
        f"-> {output}{'' if chosen else ' (the default; -o FILE to choose)'}",
        file=out,
        flush=True,
    )
    return {
        "output": str(output),
        "runs": n_runs,
        "skipped": skipped,
        "groups": [
            {"label": g.label, "runs": len(g.runs), "run_dirs": [str(r.path) for r in g.runs]}
            for g in groups
        ],
    }


def default_output(run_dirs: list[Path]) -> Path:
    """Where `impala plot` draws without `-o`: RUN_DIR/plot.png for one run folder, plot.png in
    the current folder for several."""
    unique = {Path(p).resolve() for p in run_dirs}
    return Path(run_dirs[0]) / DEFAULT_NAME if len(unique) == 1 else Path(DEFAULT_NAME)


# --- reading runs ------------------------------------------------------------------------------
def load_run(path: Path) -> Run:
    """A run folder's config.json and the return records of its metrics.jsonl (ConfigError, one
    line, if it is no run folder or they cannot be read)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a run folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        hint = f"; it holds run folders: give them, e.g. {path / '*'}" if _holds_runs(path) else ""
        raise ConfigError(f"'{path}' is not a run folder (it holds no config.json{hint})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read '{config_path}': {_one_line(exc)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{config_path}' is not a run's config (not a JSON object)")
    steps, seconds, returns = _return_curve(read_metrics(path / "metrics.jsonl"))
    return Run(path, config, steps, seconds, returns)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A truncated last line (a run killed mid-write) is left
    out; other lines that are no JSON record are left out with a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"'{path.parent}' holds no metrics.jsonl") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read '{path}': {_one_line(exc)}") from None
    lines = text.split("\n")
    complete = len(lines) - 1  # the text after the last newline is a line being written
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number <= complete:
            bad.append(number)
    if bad and not records:
        raise ConfigError(f"'{path}' is not a metrics log (no line is a JSON record)")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(
            f"{PROG}: warning: '{path}': {len(bad)} {_plural(len(bad), 'line')} that "
            f"{'is' if len(bad) == 1 else 'are'} no JSON record left out (line {shown})",
            file=sys.stderr,
        )
    return records


def _return_curve(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, seconds, return) of the records that have all three, in order of steps. Where the
    steps go back (a run resumed from a checkpoint that appended to its log), the later records
    replace the earlier ones they overlap; where the time goes back, it is continued."""
    points: list[tuple[float, float, float]] = []
    time_offset, last_time = 0.0, -math.inf
    for record in records:
        values = [record.get(key) for key in ("steps", "time", "return_mean")]
        if not all(_is_number(v) for v in values):
            continue
        steps, seconds, ret = (float(v) for v in values)
        if seconds + time_offset < last_time:
            time_offset = last_time - seconds
        last_time = seconds = seconds + time_offset
        while points and points[-1][0] >= steps:
            points.pop()
        points.append((steps, seconds, ret))
    array = np.array(points, dtype=float).reshape(-1, 3)
    return array[:, 0], array[:, 1], array[:, 2]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- grouping and labels -----------------------------------------------------------------------
def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by their settings less `IGNORED_KEYS`, in the order first given; each group
    labelled."""
    groups: dict[str, Group] = {}
    for run in runs:
        settings = {k: v for k, v in run.config.items() if k not in IGNORED_KEYS}
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, Group(settings, [])).runs.append(run)
    result = list(groups.values())
    _label(result)
    return result


def _label(groups: list[Group]) -> None:
    """The env id, the settings that differ between the groups of that env, and "(n seeds)"."""
    by_env: dict[str, list[Group]] = {}
    for group in groups:
        by_env.setdefault(str(group.settings.get("env", "?")), []).append(group)
    for env, same_env in by_env.items():
        keys = sorted({k for g in same_env for k in g.settings} - {"env"})
        differing = [
            k
            for k in keys
            if len({json.dumps(g.settings.get(k, _MISSING), default=str) for g in same_env}) > 1
        ]
        for group in same_env:
            parts = [env]
            for k in differing:
                value = group.settings.get(k, _MISSING)
                text = "n/a" if value is _MISSING else _format_value(value)
                parts.append(f"{SHORT_NAMES.get(k, k)}={text}")
            n = len(group.runs)
            if n > 1:
                parts.append(f"({n} seeds)")
            group.label = " ".join(parts)


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


# --- drawing -----------------------------------------------------------------------------------
def mean_curve(
    xs: list[np.ndarray], ys: list[np.ndarray], points: int = GRID_POINTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(grid, mean, min, max) of curves (x increasing) interpolated on a common grid over the
    range they all cover; None if that range is empty."""
    low = max(float(x[0]) for x in xs)
    high = min(float(x[-1]) for x in xs)
    if not high > low:
        return None
    grid = np.linspace(low, high, points)
    values = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys, strict=True)])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds > 3 * 3600:
        return "h", 3600.0
    if seconds > 3 * 60:
        return "min", 60.0
    return "s", 1.0


def _draw(groups: list[Group], output: Path, *, x: str, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import EngFormatter

    axes_wanted = ["steps", "time"] if x == "both" else [x]
    unit, scale = _time_unit(max(float(r.seconds[-1]) for g in groups for r in g.runs))
    fig = Figure(figsize=(6.0 * len(axes_wanted), 4.8), layout="constrained")
    axes = fig.subplots(1, len(axes_wanted), squeeze=False)[0]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    any_spread = False
    for ax, axis in zip(axes, axes_wanted, strict=True):
        for index, group in enumerate(groups):
            color = colors[index % len(colors)]
            xs = [r.steps if axis == "steps" else r.seconds / scale for r in group.runs]
            ys = [r.returns for r in group.runs]
            curve = mean_curve(xs, ys) if len(group.runs) > 1 else None
            if curve is not None:
                grid, mean, low, high = curve
                ax.plot(grid, mean, color=color, label=group.label)
                ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
                any_spread = True
            else:  # one run, or runs that share no range: each drawn as it is
                if len(group.runs) > 1:
                    print(
                        f"{PROG}: warning: the runs of '{group.label}' share no range of "
                        f"{axis}; drawn one by one",
                        file=sys.stderr,
                    )
                for i, (rx, ry) in enumerate(zip(xs, ys, strict=True)):
                    marker = "o" if len(rx) == 1 else None
                    label = group.label if i == 0 else None
                    ax.plot(rx, ry, color=color, marker=marker, label=label)
        if axis == "steps":
            ax.set_xlabel("env steps")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        else:
            ax.set_xlabel(f"wall time ({unit})")
        ax.set_ylabel(Y_LABEL)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if any_spread:
        handles.append(Patch(color="0.5", alpha=0.3, linewidth=0))
        labels.append(SPREAD_LABEL)
    labels = [textwrap.fill(label, LABEL_WIDTH, subsequent_indent="  ") for label in labels]
    columns = min(len(labels), len(axes_wanted))  # as many as the figure is panels wide
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False)
    if title:
        fig.suptitle(title)
    try:
        fig.savefig(output, dpi=100)
    except OSError as exc:
        raise ConfigError(f"cannot write '{output}': {_one_line(exc)}") from None


# --- helpers -----------------------------------------------------------------------------------
def _check_output(output: Path) -> None:
    """ConfigError, one line, for an output whose folder does not exist or whose suffix names no
    format matplotlib writes (checked before any run is read)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = output.suffix.lower().lstrip(".")
    if not suffix:
        raise ConfigError(f"output '{output}' has no suffix to name its format (e.g. .png)")
    if suffix not in formats:
        raise ConfigError(
            f"output '{output}': matplotlib cannot write '.{suffix}' files "
            f"(it writes {', '.join('.' + f for f in sorted(formats))})"
        )
    folder = output.parent
    if not folder.is_dir():
        raise ConfigError(f"output folder '{folder}' does not exist")
    if output.is_dir():
        raise ConfigError(f"output '{output}' is a folder")


def _holds_runs(folder: Path) -> bool:
    try:
        return any((sub / "config.json").is_file() for sub in folder.iterdir())
    except OSError:
        return False


def _unique(paths: list[Path]) -> list[Path]:
    seen: set[Path] = set()
    result = []
    for path in map(Path, paths):
        key = path.resolve()
        if key in seen:
            print(f"{PROG}: warning: '{path}' given twice; drawn once", file=sys.stderr)
            continue
        seen.add(key)
        result.append(path)
    return result


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())
