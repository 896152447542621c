"""Weights & Biases as an optional tracker (`--wandb`): the scalars TensorBoard gets, under the
same tags and against env steps, in a W&B run named after the run folder.

The package is an extra (`pip install 'impala-rl[wandb]'`) imported only when `--wandb` is on.
Everything W&B writes locally goes in RUN_DIR/wandb/; `WANDB_MODE=offline` keeps it there (upload
it later with `wandb sync`). A resumed run goes on in the same W&B run (its id is kept in
RUN_DIR/wandb/impala-run-id), against the same env-step axis. What the run logged between its
last checkpoint and its stop is learned again after the resume; W&B keeps everything it was sent
(TensorBoard's writer purges its first copy instead), so the tracker sends only records past the
last env step it sent before (kept in RUN_DIR/wandb/impala-last-step): each env step once, the
curve never going back.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
from pathlib import Path
from typing import Any

from impala.config import Config
from impala.errors import ConfigError

INSTALL = "pip install 'impala-rl[wandb]'"
RUN_ID_FILE = "impala-run-id"
LAST_STEP_FILE = "impala-last-step"
STEP_METRIC = "env_steps"


def require_wandb() -> Any:
    """The wandb module, or ConfigError with the install line."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"--wandb needs the wandb package: {INSTALL}") from None
    return wandb


class WandbTracker:
    """One W&B run for one impala run: `log` sends a record's scalars, `close` finishes it."""

    def __init__(self, cfg: Config, run_dir: Path, *, resumed: bool) -> None:
        wandb = require_wandb()
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(4)  # 8 characters, as W&B's own ids
            id_file.write_text(run_id + "\n")
        self._last_step_file = folder / LAST_STEP_FILE
        self._last_step = _read_step(self._last_step_file) if resumed else None
        tags = [t.strip() for t in (cfg.wandb_tags or "").split(",") if t.strip()]
        # Whether W&B is set up in this process already (a run of the caller's own): then its
        # service process is theirs to stop, else it is ours (see `close`).
        self._owns_service = _wandb_set_up() is False
        self._run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_name or Path(run_dir).name,
            tags=tags or None,
            config=dataclasses.asdict(cfg),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            reinit="create_new",  # a W&B run of the caller's own stays theirs (wandb 0.19.10+)
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        # Every scalar against env steps (the x axis of TensorBoard's curves and of the plots).
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, scalars: dict[str, float], steps: int) -> None:
        """Sends `scalars` (TensorBoard's tags -> values) at `steps` env steps, unless the W&B
        run has a record at or past `steps` already (a resumed run relearning them)."""
        if self._last_step is not None and steps <= self._last_step:
            return
        self._run.log({STEP_METRIC: steps, **scalars})
        self._last_step = steps
        self._last_step_file.write_text(f"{steps}\n")

    def close(self) -> None:
        """Finishes the W&B run (its files are complete in RUN_DIR/wandb/ afterwards) and stops
        W&B's service process if this run started it (a caller's own W&B runs keep theirs)."""
        run, self._run = self._run, None
        if run is None:
            return
        import wandb

        try:
            run.finish()
            if self._owns_service:
                wandb.teardown()
        except Exception as exc:  # noqa: BLE001 - the run's own files are saved already
            print(f"impala: warning: W&B did not finish cleanly: {exc}", file=sys.stderr)


def _read_step(path: Path) -> int | None:
    """The env step kept in `path`, or None when there is none (a run from before it was kept,
    or a file cut short by a kill: then nothing is skipped, as before)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wandb_set_up() -> bool | None:
    """Whether the W&B library is set up in this process (it starts a service process then, and
    keeps it until `wandb.teardown()` or the interpreter's exit); None where this wandb does
    not say (its internals moved): its service is then left to its own exit hook."""
    try:
        from wandb.sdk import wandb_setup
    except ImportError:
        return None
    if not hasattr(wandb_setup, "_singleton"):
        return None
    return wandb_setup._singleton is not None
