"""The KubeRay recipe (deploy/kubernetes/rayjob.yaml and its Dockerfile), checked without a
Kubernetes cluster: what the manifest asks of KubeRay and of the image, and its entrypoint run as
a Ray job's driver runs it (RAY_ADDRESS and the token in its environment) against a Ray head with
token authentication.

(kubectl validates a custom resource only against a cluster's API server, which there is none of
here; the manifest was checked against KubeRay 1.6.0's RayJob schema when written.)"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ray_temp_dirs, wait_until

from impala import cli, config
from impala.errors import ConfigError
from impala.runtime.ray_support import cluster_address

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "rayjob.yaml"
DOCKERFILE = ROOT / "deploy" / "kubernetes" / "Dockerfile"
GUIDE = ROOT / "docs" / "guides" / "clusters.md"
PROGRAM = [sys.executable, "-m", "impala.cli"]


def _documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayJob"], kinds
    return {d["kind"]: d for d in docs}


def _job() -> dict:
    job = _documents()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    return job


def _groups(job: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and of every worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    workers = [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    assert workers, "no worker group: no explorer would run"
    return [("head", cluster["headGroupSpec"]), *workers]


def _entrypoint(job: dict) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["impala", "train"], argv
    return argv


def _option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} not in {argv}"
    return argv[argv.index(flag) + 1]


def _bytes(quantity: str | int) -> int:
    """A Kubernetes quantity ('2Gi', '16G', '1000000000') in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6}
    units.update(G=10**9, T=10**12)
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity)).groups()
    return int(number) * units.get(unit or "", 1)


def _walk(node, path=()):
    """Every (path, key, value) of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, i))


# --- the manifest -----------------------------------------------------------------------------


def test_the_entrypoint_trains_on_the_jobs_ray_cluster():
    """`impala train --runtime ray --ray-address auto` (the driver's RAY_ADDRESS), parsed and
    resolved by the real parser without a warning; no shell expansion, which the submitter's own
    shell would make before the driver's (KubeRay pastes the entrypoint into a bash line)."""
    job = _job()
    argv = _entrypoint(job)
    assert "$" not in job["spec"]["entrypoint"] and "`" not in job["spec"]["entrypoint"]
    assert _option(argv, "--runtime") == "ray" and _option(argv, "--ray-address") == "auto"
    args = vars(cli.build_parser().parse_args(argv[1:]))
    args.pop("command")
    for key in ("print_config", "resume", "override"):
        args.pop(key, None)
    cfg = config.resolve(args)
    assert config.inapplicable(cfg, set(args)) == []
    assert job["spec"]["submissionMode"] == "K8sJobMode"


def test_token_authentication_is_on_and_the_token_comes_from_a_secret():
    job = _job()
    auth = job["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    # No token in the manifest: a container's RAY_AUTH_TOKEN, if it set one, would come from a
    # Secret (KubeRay sets it so from authOptions).
    for _path, key, value in _walk(job):
        if key == "env":
            for var in value:
                assert var["name"] != "RAY_AUTH_TOKEN" or "value" not in var, var
    assert "Secret" not in _documents()
    # The Secret the guide and the manifest's own comment tell the user to make.
    make = f"kubectl create secret generic {auth['secretName']} --from-literal=auth_token="
    assert make in MANIFEST.read_text() and make in GUIDE.read_text()


def test_every_pod_has_a_memory_backed_dev_shm_larger_than_rays_object_store():
    for name, group in _groups(_job()):
        pod = group["template"]["spec"]
        memory = {
            v["name"]: v["emptyDir"]
            for v in pod["volumes"]
            if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/dev/shm") in memory, f"{name}: /dev/shm is not memory-backed"
            shm = _bytes(memory[mounts["/dev/shm"]]["sizeLimit"])
            # Ray puts its object store in /dev/shm only if it fits (else, slower, in /tmp).
            store = _bytes(group["rayStartParams"]["object-store-memory"])
            assert store < shm, name
            # the volume's pages count against the container's memory limit
            assert shm < _bytes(container["resources"]["limits"]["memory"]), name


def test_resources_fit_the_explorers_and_keep_the_head_for_the_learner():
    job = _job()
    groups = dict(_groups(job))
    assert groups.pop("head")["rayStartParams"]["num-cpus"] == "0"  # no explorer actor there
    cpus = 0
    for group in groups.values():
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], "a guaranteed pod: no CPU stolen"
        cpus += group["replicas"] * int(resources["limits"]["cpu"])
    # each explorer actor takes one CPU: more explorers than CPUs would wait for ever
    assert int(_option(_entrypoint(job), "--num-explorers")) <= cpus


def test_no_host_network_and_the_run_folder_outlives_the_cluster():
    docs = _documents()
    job = docs["RayJob"]
    for _path, key, value in _walk(job):
        assert not (key in ("hostNetwork", "hostPID", "hostIPC", "privileged") and value), key
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in head["volumes"]
        if "persistentVolumeClaim" in v
    }
    (container,) = head["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    run_dir = _option(_entrypoint(job), "--run-dir")
    # the driver (the learner) runs on the head and writes its run folder on the claim
    assert any(
        claims.get(v) == docs["PersistentVolumeClaim"]["metadata"]["name"]
        and run_dir.startswith(mounts[v] + "/")
        for v in mounts
    ), (run_dir, mounts, claims)


def test_the_image_is_the_dockerfiles_with_the_pinned_ray_and_the_cpu_torch_build():
    job = _job()
    images = {c["image"] for _n, g in _groups(job) for c in g["template"]["spec"]["containers"]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert images == {f"impala-rl:{project['version']}-cpu"}
    (image,) = images
    dockerfile = DOCKERFILE.read_text()
    build = f"docker build -f deploy/kubernetes/Dockerfile -t {image} ."
    assert build in dockerfile and build in GUIDE.read_text()
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    ray_version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert ray_version == pins["ray"]
    assert re.search(
        rf"^ARG BASE=rayproject/ray:{re.escape(ray_version)}-py3\d+-cpu$", dockerfile, re.M
    )
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu\n" in dockerfile
    assert f"torch=={pins['torch']}" in dockerfile
    assert "-c /home/ray/impala/constraints.txt" in dockerfile


# --- `--ray-address auto`, as a Ray job's driver uses it ---------------------------------------


def test_cluster_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert cluster_address("auto") == "10.1.2.3:6379"
    assert cluster_address(" head:6379 ") == "head:6379"
    for bad in ("", "head", "head:", ":6379", "head:70000", "http://head:8265"):
        with pytest.raises(ConfigError, match="is not HOST:PORT"):
            cluster_address(bad)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a dashboard's, not the GCS
    with pytest.raises(ConfigError, match=r"from RAY_ADDRESS\) is not HOST:PORT"):
        cluster_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="RAY_ADDRESS, which is not set"):
        cluster_address("auto")


@pytest.mark.parametrize("address", ["auto", ""])
def test_a_ray_address_that_names_no_cluster_is_one_line(tmp_path, address):
    """Rather than a fresh local Ray (every explorer on the driver's machine) or a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [*PROGRAM, "train", "--env", "CartPole-v1", "--runtime", "ray", "--ray-address", address,
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ray-address" in lines[0], lines


@pytest.mark.timeout(300)
def test_the_entrypoint_runs_as_a_ray_jobs_driver(tmp_path):
    """The manifest's entrypoint (CartPole and a small budget in place of Pong's) in the
    environment KubeRay and Ray's job supervisor give the driver: RAY_ADDRESS, RAY_AUTH_MODE and
    RAY_AUTH_TOKEN, against a head started beforehand that requires that token."""
    pytest.importorskip("ray")
    from impala.runtime.ray_support import RayNode, environment, free_port, ray_environment

    token = secrets.token_hex(32)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    dirs_before = ray_temp_dirs()
    with environment(ray_environment(loopback=True, token_file=str(token_file))):
        head = RayNode.head("127.0.0.1", port, num_cpus=3)
    try:
        argv = _entrypoint(_job())
        replace = {"--env": "CartPole-v1", "--num-explorers": "2", "--run-dir": str(tmp_path / "r")}
        argv = [replace.get(argv[i - 1], word) if i else word for i, word in enumerate(argv)]
        argv += ["--total-steps", "20000"]
        assert argv[0] == "impala"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_ADDRESS": f"127.0.0.1:{port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
        }
        proc = subprocess.run(
            [*PROGRAM, *argv[1:]], capture_output=True, text=True, timeout=240, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "done (step budget): 20," in proc.stdout, proc.stdout[-2000:]
        assert (tmp_path / "r" / "model.pt").exists()
        assert head.failed() is None  # the cluster outlives its job, as KubeRay's does
    finally:
        head.stop()
    wait_until(lambda: ray_temp_dirs() <= dirs_before, 60, "the head's temp dir to go")
