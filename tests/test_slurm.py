"""The Slurm recipes of deploy/slurm/, submitted with `sbatch` to a real single-node Slurm
(slurmctld, slurmd and munged from the distribution's slurm-wlm, started and stopped by
`slurm_node`, in a folder and a network namespace of their own) as a user submits them.

Each job must complete, print what its tasks print, leave its run folder and the token (mode
0600, in the job's folder, mode 0700), and leave no process and no /dev/shm entry behind."""

from __future__ import annotations

import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import shm_entries, wait_until

pytest.importorskip("ray")

import slurm_node  # noqa: E402

REASON = slurm_node.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

ROOT = Path(__file__).resolve().parent.parent
JOB_SCRIPT = ROOT / "deploy" / "slurm" / "impala-job.sbatch"
RAY_SCRIPT = ROOT / "deploy" / "slurm" / "ray-cluster.sbatch"
# impala as this test's interpreter runs it (the job's tasks inherit PYTHONPATH from sbatch).
IMPALA = f"{sys.executable} -m impala.cli"


@pytest.fixture(scope="module")
def slurm():
    with slurm_node.SingleNodeSlurm() as cluster:
        yield cluster
    assert cluster.left_behind == [], "processes left in the Slurm's namespace"


@pytest.fixture
def leaves_nothing(slurm):
    """After the test: no process of the job in the Slurm's namespace (Slurm's own step daemons
    may take a moment to go) and no new /dev/shm entry."""
    shm = shm_entries()
    yield
    try:
        wait_until(lambda: slurm.strays() == [], 20, "the job's processes to go")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {slurm.strays()}") from None
    assert shm_entries() <= shm, "the job left /dev/shm entries behind"


def _run(
    slurm, tmp_path: Path, script: Path, *args: str, options=(), meanwhile=None, **env: str
) -> tuple[dict, str]:
    """Submits `sbatch OPTIONS SCRIPT ARGS` from `tmp_path` and waits for it, calling
    `meanwhile()` while it is queued or runs; (its scontrol fields, its output)."""
    job_id = slurm.submit(
        script, *args, options=options, cwd=tmp_path, env={"IMPALA": IMPALA, **env}
    )
    fields = slurm.wait(job_id, timeout=240, meanwhile=meanwhile)
    return fields, (tmp_path / f"slurm-{job_id}.out").read_text()


def _assert_private_token(job_dir: Path) -> None:
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    token = job_dir / "ray-auth-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()), "a 32-byte random token, in hex"


@pytest.mark.timeout(400)  # the job's wait (240 s) and the teardown's (20 + 60 s)
def test_job_form_recipe_runs_one_learner_and_two_explorers(slurm, leaves_nothing, tmp_path):
    """`sbatch --ntasks=3 impala-job.sbatch -s 20000`: task 0 the learner, tasks 1 and 2 the
    explorers, on the seed's corridor; each explorer makes its 20,000 steps."""
    job_dir = tmp_path / "job"
    fields, out = _run(
        slurm,
        tmp_path,
        JOB_SCRIPT,
        "-s",
        "20000",
        options=("--ntasks=3",),
        IMPALA_JOB_DIR=str(job_dir),
    )
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), out[
        -3000:
    ] + slurm.log("slurmd.log")
    lines = out.splitlines()
    assert (
        "impala-job: learners localhost:22222; explorers localhost:22223,localhost:22224; "
        f"folder {job_dir}"
    ) in lines
    # srun --label: each line starts with its task's number.
    assert "1: explorer 0 done: 20,000 steps" in out and "2: explorer 1 done: 20,000 steps" in out
    assert any(re.fullmatch(r"0: task 0 step \d+ loss \S+ avg-right-prob=0\.\d+", x) for x in lines)
    assert "0: learner 0 done (step budget): 40,000 steps" in out, out[-2000:]
    assert f"model and logs in {job_dir / 'learner-0'}" in out
    _assert_private_token(job_dir)
    assert (job_dir / "ray-auth-token").read_text() not in out
    model = torch.load(job_dir / "learner-0" / "model.pt", weights_only=True)
    assert model and all(torch.isfinite(v).all() for v in model.values())


def test_job_form_recipe_refuses_a_job_without_explorers(slurm, leaves_nothing, tmp_path):
    job_dir = tmp_path / "job"
    fields, out = _run(
        slurm,
        tmp_path,
        JOB_SCRIPT,
        options=("--ntasks=2",),
        IMPALA_LEARNERS="2",
        IMPALA_JOB_DIR=str(job_dir),
    )
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "2:0"), out
    assert out.strip().splitlines() == [
        "impala-job: IMPALA_LEARNERS=2 must be 1 to 1 (this job has 2 tasks and needs an explorer)"
    ]
    assert not job_dir.exists()  # refused before anything was made


@pytest.mark.timeout(400)  # the job's wait (240 s) and the teardown's (20 + 60 s)
def test_ray_cluster_recipe_trains_on_the_jobs_ray_cluster(slurm, leaves_nothing, tmp_path):
    """`sbatch ray-cluster.sbatch --env CartPole-v1 ...`: a Ray head started with token
    authentication by srun, `impala train --runtime ray` on it, the head stopped at the end."""
    job_dir = tmp_path / "job"
    # Ray's temp folder: short (its sockets' paths must fit 107 bytes) and removed afterwards.
    ray_tmp = tempfile.mkdtemp(prefix="impala-ray-tmp-")
    auth: set[tuple[str | None, str | None]] = set()

    def see_gcs_auth():
        """The auth settings the running head's GCS server was started with."""
        for line in slurm.strays():
            pid, _, command = line.partition(" ")
            if "gcs_server" in command:
                auth.add(_auth_settings(pid))

    try:
        fields, out = _run(
            slurm,
            tmp_path,
            RAY_SCRIPT,
            *("--env", "CartPole-v1", "--total-steps", "20000", "--num-explorers", "2"),
            meanwhile=see_gcs_auth,
            IMPALA_JOB_DIR=str(job_dir),
            RAY=str(Path(sys.executable).parent / "ray"),
            RAY_TMPDIR=ray_tmp,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    nodes_log = job_dir / "ray-nodes.log"
    log = nodes_log.read_text() if nodes_log.exists() else ""
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), out + log
    lines = out.splitlines()
    assert (
        f"impala-ray: Ray head at 127.0.0.1:6379 on localhost; 1 node(s); folder {job_dir}"
    ) in lines
    assert "Ray runtime started" in log
    assert re.search(r"done \(step budget\): 20,\d{3} steps", out), out[-2000:]
    assert f"model and logs in {job_dir / 'run'}" in out
    assert (job_dir / "run" / "model.pt").exists()
    _assert_private_token(job_dir)
    # The head ran with Ray's token authentication, the token read from the job's folder.
    assert auth == {("token", str(job_dir / "ray-auth-token"))}, auth


def _auth_settings(pid: str) -> tuple[str | None, str | None]:
    """(RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH) in process `pid`'s environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return (None, None)
    values = dict(entry.decode().partition("=")[::2] for entry in environ if b"=" in entry)
    return values.get("RAY_AUTH_MODE"), values.get("RAY_AUTH_TOKEN_PATH")
