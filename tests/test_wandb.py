"""`--wandb`: Weights & Biases as a tracker, in W&B's offline mode (nothing leaves the machine):
the scalars TensorBoard gets, under the same tags and against env steps, in a W&B run named and
tagged as asked, its files in RUN_DIR/wandb; a resumed run goes on in the same W&B run; without
the package, one line with the install command."""

import json
import sys
from pathlib import Path

import pytest
from conftest import project_children, run_main

from impala.metrics import _tag

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32768  # the LevelDB log's block size, which W&B's .wandb files use
HEADER = 7  # ":W&B", a 2-byte magic and a version byte


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, every file of its own under tmp_path (settings, cache, artifacts)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        folder = tmp_path / name.lower()
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (.wandb): a LevelDB-style log of protobuf records
    in 32 KiB blocks, each record chunked with a 7-byte header (CRC, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, chunks = HEADER, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a whole record
            chunks.append(chunk)
        elif kind == 2:  # first, middle and last pieces of one
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def logged(run_dir: Path) -> tuple[list, list[dict]]:
    """Every W&B run record and every history row (key -> value) of the run's W&B files."""
    runs, rows = [], []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})  # W&B's own
    return runs, rows


def expected_rows(run_dir: Path) -> list[dict]:
    """What TensorBoard gets from metrics.jsonl: every number under its tag, at its env steps."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        row = {
            _tag(k): v
            for k, v in record.items()
            if k != "steps" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        rows.append({"env_steps": record["steps"], **row})
    return rows


TRAIN = ["train", "--env", "CartPole-v1", "--runtime", "serial", "--envs-per-explorer", "4"]
TRAIN += ["--batch-size", "8", "--log-interval", "0"]


def test_wandb_offline_logs_the_tensorboard_scalars(offline, capsys):
    run_dir = offline / "run"
    code, _, err = run_main(
        capsys,
        *TRAIN,
        *("--total-steps", "2000", "--run-dir", str(run_dir)),
        *("--wandb", "--wandb-project", "tests", "--wandb-tags", "a, b"),
    )
    assert code == 0, err
    runs, rows = logged(run_dir)
    assert [(r.project, r.display_name, list(r.tags)) for r in runs] == [
        ("tests", "run", ["a", "b"])
    ]
    assert runs[0].run_id == (run_dir / "wandb" / "impala-run-id").read_text().strip()
    assert rows == expected_rows(run_dir) and len(rows) >= 3
    assert project_children() == []  # W&B's service process is stopped with the run

    # Resumed: the same W&B run goes on, with the records after the checkpoint.
    code, _, err = run_main(capsys, *TRAIN, "--total-steps", "4000", "--resume", str(run_dir))
    assert code == 0, err
    runs, rows = logged(run_dir)
    assert {r.run_id for r in runs} == {runs[0].run_id} and len(runs) == 2
    assert rows[-1] == expected_rows(run_dir)[-1] and rows[-1]["env_steps"] >= 4000


def test_a_resumed_run_sends_wandb_each_env_step_once(offline):
    """A run killed after its last checkpoint relearns, once resumed, the env steps it had logged
    since; W&B keeps all it was sent, so the tracker sends only what is past its last record."""
    from impala.config import Config
    from impala.wandb_tracker import WandbTracker

    cfg, run_dir = Config(env="CartPole-v1", wandb=True), offline / "run"
    first = WandbTracker(cfg, run_dir, resumed=False)
    for steps in (100, 200, 300):
        first.log({"return": steps / 100}, steps)
    first.close()  # as the kill left it: the checkpoint was at 100 steps
    again = WandbTracker(cfg, run_dir, resumed=True)
    for steps in (200, 300, 400):
        again.log({"return": -steps / 100}, steps)
    again.close()
    runs, rows = logged(run_dir)
    assert len({r.run_id for r in runs}) == 1 and len(runs) == 2
    assert [(r["env_steps"], r["return"]) for r in rows] == [
        (100, 1.0),
        (200, 2.0),
        (300, 3.0),
        (400, -4.0),
    ]


def test_without_the_package_wandb_is_one_line_with_the_install_command(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    code, out, err = run_main(capsys, *TRAIN, "--run-dir", str(tmp_path / "r"), "--wandb")
    assert code == 2 and out == ""
    assert err == (
        "impala train: error: --wandb needs the wandb package: pip install 'impala-rl[wandb]'\n"
    )
    assert not (tmp_path / "r").exists()


def test_wandb_settings_without_wandb_are_warned_about(tmp_path, capsys):
    code, _, err = run_main(
        capsys, *TRAIN, "--wandb-project", "x", "--total-steps", "100", "--run-dir", str(tmp_path)
    )
    assert code == 0 and "--wandb-project has no effect with --wandb False" in err
    assert not (tmp_path / "wandb").exists()


def test_a_wandb_run_of_the_callers_own_stays_theirs(offline):
    """Python: a script's own W&B run, active around `impala.train(..., wandb=True)`, is neither
    finished nor its service stopped; the training has a W&B run of its own."""
    import io

    import impala

    mine = wandb.init(project="mine", dir=str(offline), reinit="create_new")
    try:
        cfg = impala.Config(
            env="CartPole-v1",
            runtime="serial",
            total_steps=1000,
            envs_per_explorer=4,
            batch_size=8,
            run_dir=str(offline / "run"),
            wandb=True,
        )
        impala.train(cfg, out=io.StringIO())
        mine.log({"after": 1.0})  # still theirs, still working
    finally:
        mine.finish()
        wandb.teardown()
    runs, _ = logged(offline / "run")
    assert [r.project for r in runs] == ["impala"] and runs[0].run_id != mine.id
