"""Observation spaces as parts: what each part is, how it is stored and what a network receives.

Every Gymnasium observation space a policy here takes is described as a tuple of **parts**
(`ObsSpec`), each one array with a name, a shape, a dtype and a kind:

| space                          | kind       | the network receives, per observation          |
|--------------------------------|------------|------------------------------------------------|
| `Box` of rank 3, `[C, H, W]`   | `image`    | `[C, H, W]` in the Box's dtype (uint8 frames)  |
| `Box` of rank 3, `[H, W, C]`   | `image`    | `[C, H, W]`: Gymnasium's pixels, transposed    |
| `Box` of any other rank        | `vector`   | the Box's shape and dtype                      |
| `Discrete(n, start)`           | `discrete` | `[]` int64, the value itself (one-hot encoded  |
|                                |            | by the built-in networks)                      |
| `MultiDiscrete(nvec, start)`   | `discrete` | `nvec.shape` int64 (one-hot per entry)         |
| `MultiBinary(n)`               | `binary`   | `n` (its shape) int8                           |
| `Dict`, `Tuple` (nested too)   | one part per leaf space, as above                           |

**Images**: a rank-3 `Box` whose spatial sides are at least `MIN_IMAGE_SIDE`. Its channel axis
is the last one if that is smaller than the first (`[H, W, C]`: CarRacing's `96x96x3`,
`AddRenderObservation`'s pixels), else the first (`[C, H, W]`: Atari's `4x84x84` stacked frames,
MinAtar's planes, as before). Networks always receive images channels-first, `[C, H, W]`, as
PyTorch's convolutions take them (as Stable-Baselines3's `VecTransposeImage` does), laid out
channels-last in memory: `[H, W, C]` pixels are transposed by a view, never copied.

**Names**: a lone space's single part has the name `""`. The parts of a `Dict` are named by its
keys, those of a `Tuple` by their index (`"0"`, `"1"`, ...), nested parts by the names on the way
joined with `"."` (`{"robot": Dict(pos=..., image=...)}` gives `"robot.pos"` and
`"robot.image"`), in the space's own order.

**What a network receives** (`impala.nets.contract`): for a lone space a tensor `[N, *shape]`,
for a `Dict` or `Tuple` a `dict[str, Tensor]` keyed by part name, each `[N, *shape]`, whatever
the nesting; N is the batch (`[T, B, ...]` for a recurrent network's unroll). Each part keeps its
dtype (uint8 frames stay uint8 until the network's first layer). `ObsSpec.network_space` is this
as a Gymnasium space (a `Dict` keyed by part name for structured spaces).

**Storage** (unrolls, shared-memory slots, replay buffers, messages between processes,
checkpoints): one field per part, `"obs"` for a lone space, `"obs/<name>"` for a part of a
structured one, in the part's own dtype. Parts of rank 3 are stored frames-last, `[H, W, C]`:
images in the layout the convolutions compute in, written by the explorer with a plain copy and
read back by the learner as `[C, H, W]` views (`impala.agent.buffer`).

Other spaces (`Text`, `Graph`, `Sequence`, `OneOf`, ...) get one line (`describe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import gymnasium as gym
import numpy as np
import torch

from impala.errors import ConfigError

OBS = "obs"  # the field of a lone space's observations; structured parts are "obs/<name>"
PART_PREFIX = OBS + "/"
IMAGE_RANK = 3
MIN_IMAGE_SIDE = 3  # smaller rank-3 Boxes are vectors: no 3x3 convolution fits them
KINDS = ("image", "vector", "discrete", "binary")

NetObs = Union[np.ndarray, dict[str, np.ndarray]]  # noqa: UP007 - a runtime alias
"""Observations as an explorer hands them to its network: an array or a dict of them by part."""
TensorObs = Union[torch.Tensor, dict[str, torch.Tensor]]  # noqa: UP007 - a runtime alias
"""Observations as a network receives them: a tensor or a dict of tensors by part name."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One array of an observation (see the module doc).

    `shape` is one observation's as the network receives it (images `[C, H, W]`), `dtype` the
    space's; `key` the storage field. Discrete parts have `sizes` (values per entry, flattened)
    and `starts` (each entry's smallest value); images a `scale` that brings their values to
    about [0, 1] (1/255 for 0..255 frames) and `channels_last` (the environment gives them
    `[H, W, C]`).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype
    key: str
    sizes: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    scale: float = 1.0
    channels_last: bool = False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """One observation's shape in storage: rank 3 frames-last `[H, W, C]`."""
        if len(self.shape) != IMAGE_RANK:
            return self.shape
        channels, height, width = self.shape
        return (height, width, channels)

    @property
    def flat_size(self) -> int:
        """The width of this part encoded as one float vector: the one-hot width of a discrete
        part, else its number of entries."""
        if self.kind == "discrete":
            return int(sum(self.sizes))
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    def describe(self) -> str:
        what = f"{self.kind} {list(self.shape)} {self.dtype}"
        return f"'{self.name}': {what}" if self.name else what


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    """An observation space as parts (see the module doc); `space` is the environment's own."""

    parts: tuple[Part, ...]
    structured: bool
    """A `Dict` or `Tuple`: networks receive a dict by part name (even of one part)."""
    space: gym.Space = dataclasses.field(compare=False, repr=False)

    @property
    def keys(self) -> tuple[str, ...]:
        """The storage fields, in order."""
        return tuple(p.key for p in self.parts)

    @property
    def images(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.is_image)

    @property
    def others(self) -> tuple[Part, ...]:
        """The parts that are not images: encoded as one float vector by the built-in nets."""
        return tuple(p for p in self.parts if not p.is_image)

    @property
    def vectors(self) -> tuple[Part, ...]:
        """The Box parts that are not images: what `--obs-norm` standardises."""
        return tuple(p for p in self.parts if p.kind == "vector")

    @property
    def single(self) -> Part | None:
        """The part of a lone space (None for a structured one)."""
        return None if self.structured else self.parts[0]

    def describe(self) -> str:
        if not self.structured:
            return self.parts[0].describe()
        return "{" + ", ".join(p.describe() for p in self.parts) + "}"

    def network_space(self) -> gym.Space:
        """The space of what a network receives: images `[C, H, W]`; for a structured space a
        flat `Dict` keyed by part name."""
        leaves = dict(zip((p.name for p in self.parts), _leaves(self.space), strict=True))
        spaces = {p.name: _network_leaf(p, leaves[p.name]) for p in self.parts}
        return gym.spaces.Dict(spaces) if self.structured else spaces[""]

    # --- from the environments to the network and the storage -----------------------------------
    def to_network(self, obs: Any) -> NetObs:
        """A batch of observations `[E, ...]` as a vector environment returns it (an array, or a
        dict / tuple of them, nested as the space) -> as the network takes it: an array, or a
        dict by part name; `[H, W, C]` images become `[C, H, W]` views, `[C, H, W]` ones are
        copied to the channels-last layout (once, for both the network, which computes in that
        layout, and the unroll, which stores frames-last: neither reorders them again)."""
        if not self.structured:  # the common case, at every step: no walk through the space
            return _network_array(self.parts[0], obs)
        leaves = _flatten(self.space, obs)
        return {p.name: _network_array(p, a) for p, a in zip(self.parts, leaves, strict=True)}

    def stored(self, obs: NetObs) -> dict[str, np.ndarray]:
        """Observations as the network takes them (`to_network`, with any leading dims) -> the
        storage fields: rank-3 parts frames-last (views; a plain copy to write)."""
        if not self.structured:
            part = self.parts[0]
            return {part.key: _frames_last(obs) if len(part.shape) == IMAGE_RANK else obs}
        return {
            p.key: _frames_last(obs[p.name]) if len(p.shape) == IMAGE_RANK else obs[p.name]
            for p in self.parts
        }

    def batch_of(self, observations: Sequence[Any]) -> Any:
        """Single observations of the environment (e.g. `infos["final_obs"][i]`) as one batch
        `[n, ...]` in the environment's structure (then `to_network`)."""
        if isinstance(self.space, gym.spaces.Box):
            return np.stack(observations)
        out = gym.vector.utils.create_empty_array(self.space, n=len(observations))
        return gym.vector.utils.concatenate(self.space, observations, out)


def describe(space: gym.Space, env_id: str = "the environment") -> ObsSpec:
    """The parts of `space` (see the module doc). ConfigError, one line, for a space (or a part
    of one) that no network here takes: Text, Graph, Sequence, OneOf, or a Dict whose keys
    clash once nested names are joined."""
    structured = isinstance(space, gym.spaces.Dict | gym.spaces.Tuple)
    parts = []
    for name, leaf in _named_leaves(space, env_id):
        key = PART_PREFIX + name if structured else OBS
        parts.append(_part(name, key, leaf, env_id))
    names = [p.name for p in parts]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(
            f"'{env_id}' has observation parts named alike once nested names are joined with "
            f"'.': {', '.join(repr(n) for n in clash)}"
        )
    if structured and not parts:
        raise ConfigError(f"'{env_id}' has an empty {type(space).__name__} observation space")
    return ObsSpec(tuple(parts), structured, space)


def _named_leaves(space: gym.Space, env_id: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(space, gym.spaces.Dict):
        for key, sub in space.spaces.items():
            yield from _named_leaves(sub, env_id, _join(prefix, str(key)))
    elif isinstance(space, gym.spaces.Tuple):
        for i, sub in enumerate(space.spaces):
            yield from _named_leaves(sub, env_id, _join(prefix, str(i)))
    elif isinstance(space, gym.spaces.Box | gym.spaces.Discrete | gym.spaces.MultiDiscrete):
        yield prefix, space
    elif isinstance(space, gym.spaces.MultiBinary):
        yield prefix, space
    else:
        where = f" (part '{prefix}')" if prefix else ""
        raise ConfigError(
            f"'{env_id}' has a {type(space).__name__} observation space{where}, which no "
            "network here takes (supported: Box, Discrete, MultiDiscrete, MultiBinary, and Dict "
            "and Tuple of them; Text, Graph, Sequence and OneOf are not: wrap the environment "
            "to encode them as one of those)"
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _leaves(space: gym.Space) -> Iterator[gym.Space]:
    if isinstance(space, gym.spaces.Dict):
        for sub in space.spaces.values():
            yield from _leaves(sub)
    elif isinstance(space, gym.spaces.Tuple):
        for sub in space.spaces:
            yield from _leaves(sub)
    else:
        yield space


def _flatten(space: gym.Space, obs: Any) -> Iterator[Any]:
    """The leaf arrays of `obs` (batched or not) in the order of `_leaves(space)`."""
    if isinstance(space, gym.spaces.Dict):
        for key, sub in space.spaces.items():
            yield from _flatten(sub, obs[key])
    elif isinstance(space, gym.spaces.Tuple):
        for i, sub in enumerate(space.spaces):
            yield from _flatten(sub, obs[i])
    else:
        yield obs


def leaves_of(space: gym.Space, obs: Any) -> Iterator[tuple[gym.Space, Any]]:
    """`(leaf space, leaf of obs)` pairs of a `Dict`/`Tuple` observation (batched or not), in
    the order of its parts."""
    return zip(_leaves(space), _flatten(space, obs), strict=True)


def image_layout(shape: tuple[int, ...]) -> bool | None:
    """For a rank-3 shape: True if it reads as an image `[H, W, C]` (the last axis smaller than
    the first), False for `[C, H, W]`; None if it is not an image (another rank, or a spatial
    side under MIN_IMAGE_SIDE)."""
    if len(shape) != IMAGE_RANK:
        return None
    channels_last = shape[2] < shape[0]
    height, width = shape[:2] if channels_last else shape[1:]
    if min(height, width) < MIN_IMAGE_SIDE:
        return None
    return channels_last


def _part(name: str, key: str, space: gym.Space, env_id: str) -> Part:
    dtype = np.dtype(space.dtype)
    if isinstance(space, gym.spaces.Discrete):
        return Part(name, "discrete", (), dtype, key, (int(space.n),), (int(space.start),))
    if isinstance(space, gym.spaces.MultiDiscrete):
        sizes = tuple(int(n) for n in np.ravel(space.nvec))
        starts = tuple(int(s) for s in np.ravel(space.start))
        return Part(name, "discrete", tuple(space.shape), dtype, key, sizes, starts)
    if isinstance(space, gym.spaces.MultiBinary):
        return Part(name, "binary", tuple(space.shape), dtype, key)
    shape = tuple(int(n) for n in space.shape)
    channels_last = image_layout(shape)
    if channels_last is None:
        return Part(name, "vector", shape, dtype, key)
    if channels_last:
        shape = (shape[2], shape[0], shape[1])
    return Part(name, "image", shape, dtype, key, scale=_scale(space), channels_last=channels_last)


def _scale(space: gym.spaces.Box) -> float:
    """What brings an image's values to about [0, 1]: 1/high for bounded frames above 1 (1/255
    for uint8 pixels), else 1 (MinAtar's 0/1 planes, unbounded floats)."""
    high = float(np.max(space.high))
    return 1.0 / high if np.isfinite(high) and high > 1.0 else 1.0


def _network_leaf(part: Part, space: gym.Space) -> gym.Space:
    if not part.channels_last:
        return space
    low, high = (
        np.moveaxis(np.broadcast_to(b, space.shape), -1, 0) for b in (space.low, space.high)
    )
    return gym.spaces.Box(low, high, part.shape, space.dtype)


def _network_array(part: Part, array: Any) -> np.ndarray:
    array = np.asarray(array)
    if part.kind != "image":
        return array
    if part.channels_last:
        return _frames_first(array)  # a view, channels-last in memory
    frames = torch.from_numpy(np.ascontiguousarray(array))
    return (
        frames.contiguous(memory_format=torch.channels_last).numpy() if frames.dim() == 4 else array
    )


# Explicit axes: np.moveaxis's argument handling costs more than the transposed copy's write
# (32 Atari frames: 10 us of 45).
def _frames_last(obs: np.ndarray) -> np.ndarray:
    """`[..., C, H, W]` -> `[..., H, W, C]` (a view)."""
    n = obs.ndim
    return obs.transpose(*range(n - 3), n - 2, n - 1, n - 3)


def _frames_first(obs: np.ndarray) -> np.ndarray:
    """`[..., H, W, C]` -> `[..., C, H, W]` (a view)."""
    n = obs.ndim
    return obs.transpose(*range(n - 3), n - 1, n - 3, n - 2)


# --- batches and tensors -------------------------------------------------------------------------
def obs_keys(fields: Mapping[str, Any] | Sequence[str]) -> list[str]:
    """The observation fields among `fields` (a batch's or a storage's), in order."""
    return [k for k in fields if k == OBS or k.startswith(PART_PREFIX)]


def from_batch(batch: Mapping[str, torch.Tensor]) -> TensorObs:
    """A learner batch's observations as the network takes them: `batch["obs"]` for a lone
    space, else a dict by part name of its `obs/<name>` fields."""
    if OBS in batch:
        return batch[OBS]
    return {k[len(PART_PREFIX) :]: batch[k] for k in obs_keys(batch)}


def as_tensors(obs: NetObs) -> TensorObs:
    """Explorer observations (arrays) as tensors sharing their memory."""
    return map_obs(torch.from_numpy, obs)


def map_obs(fn: Callable[[Any], Any], obs: Any) -> Any:
    """`fn` applied to the array (or to each array of the dict) `obs`."""
    if isinstance(obs, dict):
        return {k: fn(v) for k, v in obs.items()}
    return fn(obs)


def lead_shape(obs: TensorObs | NetObs, dims: int) -> tuple[int, ...]:
    """The `dims` leading (batch) sizes of `obs`, e.g. `(T, B)`."""
    first = next(iter(obs.values())) if isinstance(obs, dict) else obs
    return tuple(first.shape[:dims])


def part_of(obs: TensorObs, name: str | None) -> torch.Tensor:
    """The part `name` of `obs` (the whole of a lone space's for None or "")."""
    if isinstance(obs, dict):
        return obs[name]
    return obs


def equal(a: Any, b: Any) -> bool:
    """Whether two observations (arrays or tensors, or dicts of them) hold the same values."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(equal(a[k], b[k]) for k in a)
        )
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))
