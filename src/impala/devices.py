"""What the machine has for a run (its GPU, its cores), where the learner's tensors live and
how they get there.

`resolve_device` turns `--device` into a torch device (ConfigError, one line, for CUDA where there
is none). `to_device` moves a batch there once: a host tensor bound for a GPU is first copied
into pinned (page-locked) memory, from which the copy to the GPU is asynchronous
(`non_blocking`), so the host returns to its work while the transfer runs; a tensor already on
the device is left as it is (no second copy, and never `pin_memory()` of a device tensor, which
CUDA refuses). On the CPU nothing moves.

`auto_explorers` is what `--num-explorers auto` stands for: an explorer per core this process may
run on, but one (the learner's), and at least 2 (the presets' count, measured on 2 cores).
"""

from __future__ import annotations

import os

import torch

from impala.errors import ConfigError

Batch = dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """The learner's device for `--device` 'cpu', 'cuda' or 'auto' (CUDA where torch sees a
    GPU, else the CPU); ConfigError, one line, for 'cuda' without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch is built without CUDA"
            if torch.version.cuda is None
            else "no GPU is visible"
        )
        raise ConfigError(f"--device cuda: no CUDA device here ({why}); use --device cpu or auto")
    return torch.device(name)


def pins_memory(device: torch.device) -> bool:
    """Whether host tensors bound for `device` go through pinned memory (a CUDA device on a
    machine where torch can pin: it needs the CUDA driver)."""
    return device.type == "cuda" and torch.cuda.is_available()


def is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ('cuda' without an index: any GPU; the learner has one)."""
    where = tensor.device
    return where.type == device.type and (device.index is None or where.index == device.index)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """`batch` with every tensor on `device`: host tensors copied once (through pinned memory,
    asynchronously, to a GPU), tensors already there as they are. The CPU: `batch` itself."""
    if device.type == "cpu" and all(v.device.type == "cpu" for v in batch.values()):
        return batch
    pinned = pins_memory(device)
    return {k: _moved(v, device, pinned) for k, v in batch.items()}


def _moved(tensor: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    if is_on(tensor, device):
        return tensor
    if pinned and tensor.device.type == "cpu":
        # is_pinned: a runtime may hand over tensors that are pinned already (no second copy)
        source = tensor if tensor.is_pinned() else tensor.pin_memory()
        return source.to(device, non_blocking=True)
    return tensor.to(device)


def gpu_utilization(device: torch.device) -> float | None:
    """The percentage of the last sample period (NVML's, about 1/6 to 1 s) in which a kernel ran
    on `device`'s GPU; None where that does not apply or cannot be read: a CPU device, no CUDA,
    or no NVML bindings (`pip install nvidia-ml-py`, which `torch.cuda.utilization` needs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - ModuleNotFoundError (pynvml), NVML's own errors, ...
        return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s cpuset,
    not the machine's count when that is larger)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_explorers(cores: int | None = None) -> int:
    """Explorers for `--num-explorers auto` on `cores` cores (default: `usable_cores()`): one per
    core but the learner's, at least 2."""
    return max(2, (usable_cores() if cores is None else cores) - 1)
