"""A stand-in CUDA device for machines without one: the code under test believes it has a GPU,
its tensors stay in host memory, and what CUDA refuses is refused here too.

`with StandInCuda() as gpu:` makes, for the code inside it,
- `torch.cuda.is_available()` true (and `is_bf16_supported()` false: a GPU without bf16, so that
  'auto' precision stays fp32, as autocast is not emulated);
- `x.to("cuda")`, `x.cuda()`, `module.to("cuda")`, factory calls with `device="cuda"` give
  *device tensors*: instances of `DeviceTensor`, a wrapper subclass whose `.device` reads
  `cuda:0` (so `device.type` branches take their GPU side) and whose data is an ordinary CPU
  tensor inside it; every ATen operation on them (autograd's backward and the optimizers' fused
  and foreach kernels included) runs on that inner tensor and wraps its results again;
- `x.pin_memory()` of a host tensor a pinned copy (`is_pinned()` true), as on a CUDA machine.

What it refuses, each with CUDA's own message where CUDA has one:
- `.pin_memory()` of a device tensor ("cannot pin 'torch.cuda.FloatTensor' only dense CPU
  tensors can be pinned": the crash of the APPO passes that moved a batch twice);
- an operation that mixes device tensors with host tensors ("Expected all tensors to be on the
  same device", the missing `.to()`), except where CUDA takes host tensors: host scalars
  (0-dim), the source or destination of a copy, advanced indexing's indices;
- `.numpy()` (and `numpy.asarray`) of a device tensor ("can't convert cuda:0 device type tensor
  to numpy");
- stricter than CUDA, a *non-blocking* copy from the device into pageable host memory: CUDA
  starts it and returns, so the host may read the memory before the copy lands.

It counts host-to-device copies (`gpu.copies`, `gpu.pinned_copies`, `gpu.pins`) so that a test
can say a batch crossed exactly once.

Why this and not PyTorch's `meta` device or its FakeTensor: both carry no values, and the
learner reads values on every update (the loss's finiteness check, `.item()` of the metrics,
PopArt's statistics), so neither could run an update to its end; a subclass that only tagged
tensors at the Python level would miss what autograd and the optimizers compute in C++. A
`TorchDispatchMode` below autograd sees every ATen operation (backward passes and fused
optimizer kernels included) and runs those on device tensors on their inner CPU tensors. The
wrapper cannot claim the `cuda` device type itself (autograd asks a CPU-only build for a CUDA
device guard, and aborts the process), so its real device is `meta` (which has a guard, and
fails loudly if a tensor escapes the wrapping; the dispatch mode also turns the `meta` scalars
autograd makes into device tensors), and the Python-visible `.device` is rewritten to `cuda:0`
by a `TorchFunctionMode`, which also turns host-to-device moves and factory calls into
wrappers before torch would try to initialise CUDA.

Limits: no asynchrony (every copy is done when it returns), streams, autocast on the device,
memory limits or several GPUs; and the body of a torch function implemented in Python (some of
`torch.nn.functional`) runs with the function mode paused, so a `.device` read inside one sees
`meta`, the wrappers' real device, which the dispatch mode takes for the stand-in GPU (tensors
made or copied there become device tensors), and a `pin_memory()` or `.numpy()` inside one is
not refused.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)

# ATen operations CUDA runs with host tensors among their inputs: copies across devices, and
# advanced indexing, which takes its indices from either side.
_MIXED_OK = {
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten.index_put.default,
    torch.ops.aten._index_put_impl_.default,
}


class DeviceTensor(torch.Tensor):
    """A tensor "on the stand-in GPU": its data is `inner`, a CPU tensor of the same shape,
    strides and dtype; `.device` reads `cuda:0` inside `StandInCuda`."""

    inner: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> DeviceTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.size(),
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device="meta",
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"DeviceTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        raise RuntimeError(f"a stand-in device tensor used outside StandInCuda (in {func})")


class _DeviceDispatch(TorchDispatchMode):
    """Runs every ATen operation that touches the stand-in GPU on the device tensors' inner CPU
    tensors and wraps the results: operations on device tensors, and operations that create
    tensors on the wrappers' real device, `meta` (autograd makes its scalars with the options
    of the tensors it differentiates)."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device = kwargs.get("device")
        device = torch.device(device) if device is not None else None
        creates = device is not None and device.type == "meta"
        if not creates and not any(isinstance(t, DeviceTensor) for t in tensors):
            return func(*args, **kwargs)
        _refuse_mixed(func, tensors)
        to_host = device is not None and device.type == "cpu"
        if device is not None:
            kwargs["device"] = torch.device("cpu")
        plain_inputs = {id(t) for t in tensors if _is_host(t)}
        by_inner = {id(t.inner): t for t in tensors if isinstance(t, DeviceTensor)}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

        def rewrap(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) in by_inner:  # an in-place op's own output
                return by_inner[id(x)]
            if to_host or id(x) in plain_inputs:
                return x
            return DeviceTensor(x)

        return tree_map(rewrap, out)


def _unwrap(x: Any) -> Any:
    return x.inner if isinstance(x, DeviceTensor) else x


def _is_host(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor)


def _refuse_mixed(func, tensors: list[torch.Tensor]) -> None:
    """CUDA's refusal of an operation on device and host tensors together (host scalars and the
    operations of `_MIXED_OK` aside)."""
    if func in _MIXED_OK or not any(isinstance(t, DeviceTensor) for t in tensors):
        return
    host = [t for t in tensors if _is_host(t) and t.dim() > 0]
    if host:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"cuda:0 and cpu! (in {func}, a host tensor of shape {list(host[0].shape)})"
        )


def _type_name(t: torch.Tensor) -> str:
    return f"torch.cuda.{t.type().split('.')[-1]}" if t.dtype.is_floating_point else "tensor"


class StandInCuda(TorchFunctionMode):
    """The stand-in GPU for the code run inside `with StandInCuda() as gpu:` (see the module's
    docstring). `copies`: host-to-device copies made; `pinned_copies`: those from pinned
    memory; `pins`: `pin_memory()` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0
        self.pinned_copies = 0
        self.pins = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> StandInCuda:
        self._saved = {
            "is_available": torch.cuda.is_available,
            "is_bf16_supported": torch.cuda.is_bf16_supported,
        }
        torch.cuda.is_available = lambda: True
        torch.cuda.is_bf16_supported = lambda *a, **k: False
        self._dispatch = _DeviceDispatch()
        self._dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
            self._dispatch.__exit__(*exc)
        finally:
            torch.cuda.is_available = self._saved["is_available"]
            torch.cuda.is_bf16_supported = self._saved["is_bf16_supported"]

    # --- the mode ------------------------------------------------------------------------------
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        owner = getattr(func, "__self__", None)
        if isinstance(owner, types.GetSetDescriptorType) and isinstance(args[0], DeviceTensor):
            getters = {"device": CUDA, "is_cuda": True, "is_cpu": False, "is_meta": False}
            if owner.__name__ in getters:
                return getters[owner.__name__]
        name = getattr(func, "__name__", "")
        if func is torch.Tensor.to:
            return self._to(args[0], *args[1:], **kwargs)
        if func is torch.Tensor.cuda:
            return self._to(args[0], CUDA, non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.cpu:
            return self._to(args[0], "cpu")
        if func is torch.Tensor.get_device and isinstance(args[0], DeviceTensor):
            return 0
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):
            return args[0].inner.tolist()  # a copy to the host, as CUDA's
        if func is torch.Tensor.pin_memory:
            return self._pin(args[0])
        if func is torch.Tensor.is_pinned:
            return _pinned(args[0])
        if name == "__reduce_ex__" and isinstance(args[0], DeviceTensor):
            raise RuntimeError(
                "stand-in CUDA: torch.save of a device tensor writes a file that loads only where "
                "CUDA is (or with map_location); save .cpu() copies"
            )
        if name in ("numpy", "__array__") and isinstance(args[0], DeviceTensor):
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                "tensor to host memory first."
            )
        if _on_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            out = func(*args, **kwargs)
            return tree_map(lambda x: _to_device(x) if _is_host(x) else x, out)
        return func(*args, **kwargs)

    def _pin(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DeviceTensor):
            raise RuntimeError(
                f"cannot pin '{_type_name(tensor.inner)}' only dense CPU tensors can be pinned"
            )
        self.pins += 1
        pinned = tensor.clone()
        pinned._standin_pinned = True  # an attribute: tensors compare by value, not identity
        return pinned

    def _to(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        copy = bool(kwargs.pop("copy", False))
        if args and isinstance(args[0], torch.Tensor):  # .to(other): its device and dtype
            other = args[0]
            device = CUDA if isinstance(other, DeviceTensor) else other.device
            dtype, non_blocking = other.dtype, bool(args[1]) if len(args) > 1 else False
            non_blocking = kwargs.get("non_blocking", non_blocking)
            memory_format = torch.preserve_format
        else:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            memory_format = memory_format or torch.preserve_format
        dtype = dtype or tensor.dtype
        on_device = isinstance(tensor, DeviceTensor)
        if device is None or (device.type == "cuda") == on_device:
            if device is not None and device.type not in ("cuda", "cpu"):
                return tensor.to(device, dtype, non_blocking, copy, memory_format=memory_format)
            return tensor.to(dtype=dtype, copy=copy, memory_format=memory_format)
        if device.type == "cuda":  # host to device: a copy (differentiable, as CUDA's)
            self.copies += 1
            self.pinned_copies += _pinned(tensor)
            target = DeviceTensor(
                torch.empty_like(tensor.detach(), dtype=dtype, memory_format=memory_format)
            )
            target.copy_(tensor)
            return target
        if device.type == "cpu":  # device to host
            if non_blocking:
                raise RuntimeError(
                    "stand-in CUDA: a non-blocking copy from the device into pageable host "
                    "memory may be read before it lands; copy with non_blocking=False"
                )
            return tensor.inner.to(dtype=dtype, memory_format=memory_format, copy=True)
        raise RuntimeError(f"stand-in CUDA: no copies from cuda:0 to {device}")


def _pinned(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, "_standin_pinned", False))


def _on_cuda(device: Any) -> bool:
    if device is None or isinstance(device, int):
        return False
    try:
        return torch.device(device).type == "cuda"
    except (TypeError, RuntimeError):
        return False


def _to_device(x: torch.Tensor) -> DeviceTensor:
    """A host tensor just made by a factory call as a device tensor (no copy counted)."""
    return DeviceTensor(x.detach()).requires_grad_(x.requires_grad)


def on_device(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives on the stand-in GPU."""
    return isinstance(tensor, DeviceTensor)
