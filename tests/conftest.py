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
