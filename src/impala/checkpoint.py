"""Checkpoints: what a run needs to go on where it stopped, written so that no kill leaves one
half-written, and read without running code from the file.

A checkpoint is one file, `RUN_DIR/checkpoints/ckpt-<env steps>.pt`, written by `torch.save` to a
temporary name, flushed to disk and renamed (a run killed mid-write leaves a `.tmp` file that is
never read). It is a dict of plain values and tensors, so `torch.load(weights_only=True)` reads it
(torch's restricted unpickler: no code from the file runs):

    format, version      "impala-checkpoint", FORMAT_VERSION
    config               the run's Config as a dict (what config.json holds)
    record               config.json's extra entries (the Atari protocol)
    model, optimizer     state dicts
    counters             steps, updates, episodes, policy_version, learner_updates, seconds
    returns              the recent episode returns (the reported window)
    rng                  torch's, numpy's and Python's global generator states
    metrics_offset       the length of metrics.jsonl when the checkpoint was made
    source               the runtime's own state (the serial runtime: explorers, buffer), or {}

The last `keep` checkpoints are kept. Reading one that is truncated or damaged is a ConfigError
(one line); `latest` skips such files and takes the newest good one.
"""

from __future__ import annotations

import os
import random
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impala.errors import ConfigError

FORMAT = "impala-checkpoint"
FORMAT_VERSION = 1
FOLDER = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def path_for(run_dir: Path, steps: int) -> Path:
    return folder(run_dir) / f"ckpt-{steps:012d}.pt"


def listed(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (by env steps)."""
    found = []
    for path in folder(run_dir).glob("ckpt-*.pt"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def save(state: dict[str, Any], run_dir: Path, keep: int) -> Path:
    """Writes `state` as the run's newest checkpoint (atomically) and removes all but the
    newest `keep`. Returns its path."""
    path = path_for(run_dir, int(state["counters"]["steps"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    for old in listed(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents, on CPU (a GPU run's checkpoint loads on a CPU-only machine).
    ConfigError, one line, for a missing, truncated, damaged or foreign file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint at '{path}'") from None
    except Exception as exc:  # torch raises several types for a damaged file
        foreign = _not_from_torch(path)
        if foreign is not None:
            raise ConfigError(
                f"'{path}' is not a checkpoint ({foreign}): give a run folder or one of its "
                f"{FOLDER}/ckpt-<steps>.pt files"
            ) from None
        why = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ConfigError(f"checkpoint '{path}' is damaged or truncated ({why})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"'{path}' is not an impala checkpoint")
    if state.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint '{path}' has format version {state.get('version')}; this impala reads "
            f"version {FORMAT_VERSION}"
        )
    for key in ("config", "model", "counters"):
        if key not in state:
            raise ConfigError(f"checkpoint '{path}' lacks its '{key}'")
    return state


def _not_from_torch(path: Path) -> str | None:
    """Why the file at `path` cannot be one `torch.save` wrote (then it was never a checkpoint,
    rather than a damaged one), or None if it may be: torch writes a zip archive holding a
    `data.pkl` (a truncated one has lost the archive's directory at its end, so its start is
    what tells), or before torch 1.6 a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head[:2] == b"\x80\x02":  # the legacy format: a pickle, protocol 2
        return None
    if head != b"PK\x03\x04":
        return "not a file PyTorch wrote"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive, not one PyTorch wrote"
    except (zipfile.BadZipFile, OSError):
        return None  # a torch file cut short: damaged
    return None


def latest(run_dir: Path, warn=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that loads, or None if it has none. Damaged ones are
    skipped with a warning line (through `warn`, default stderr)."""
    for path in reversed(listed(run_dir)):
        try:
            return path, load(path)
        except ConfigError as exc:
            message = f"impala: warning: {exc}; trying an older one"
            if warn is not None:
                warn(message)
            else:
                print(message, file=sys.stderr, flush=True)
    return None


def find(target: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `target` names: a checkpoint file, or a run folder (its newest good
    checkpoint). ConfigError, one line, if there is none."""
    target = Path(target)
    if target.is_file():
        return target, load(target)
    if not target.is_dir():
        raise ConfigError(f"'{target}' is neither a run folder nor a checkpoint file")
    found = latest(target)
    if found is None:
        raise ConfigError(f"run folder '{target}' holds no checkpoint ({FOLDER}/ is empty)")
    return found


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run folder a checkpoint file belongs to (RUN_DIR/checkpoints/ckpt-N.pt)."""
    return Path(checkpoint_path).resolve().parent.parent


# --- random generators ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global generators' states, as plain values and tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def numpy_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as plain values (its bit generator's dict, ints as strings so
    128-bit values survive any reader)."""
    return _stringify(rng.bit_generator.state)


def set_numpy_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = _unstringify(state)


def _stringify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stringify(v) for k, v in value.items()}
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return {"int": str(value)}
    return value


def _unstringify(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"int"}:
            return int(value["int"])
        return {k: _unstringify(v) for k, v in value.items()}
    return value
