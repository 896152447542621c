import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def project_children() -> list:
    """Live child processes, less multiprocessing's resource tracker (the standard library starts
    it once per interpreter and it ends with the interpreter)."""
    import psutil

    kids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(proc.cmdline()):
                kids.append(proc)
        except psutil.NoSuchProcess:
            pass
    return kids
