"""Dense policy-value networks: the seed prototype's network and an MLP for vector observations."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from impala.distributions import ActionSpec, as_spec
from impala.nets.heads import init_policy_head, policy_head, value_head, values
from impala.nets.obsnorm import EPS, ObsNorm
from impala.nets.popart import PopArt


class SeedNet(nn.Module):
    """The seed prototype's network: two dense layers with no non-linearity between them.

    1 input (the corridor's constant observation), `num_hidden` units, 3 outputs: the logits of
    left and right, and the state value.
    """

    is_recurrent = False

    def __init__(self, num_hidden: int = 10, obs_dim: int = 1, num_actions: int = 2) -> None:
        super().__init__()
        self.action_spec = ActionSpec.discrete(num_actions)
        self.num_actions = num_actions
        self.hidden = nn.Linear(obs_dim, num_hidden)
        self.out = nn.Linear(num_hidden, num_actions + 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, obs_dim]` -> logits `[N, A]`, values `[N]`."""
        out = self.out(self.hidden(obs.float()))
        return out[:, : self.num_actions], out[:, self.num_actions]

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, obs_dim]` -> logits `[N, A]` (what acting needs)."""
        return self.forward(obs)[0]


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) computed as 2 sigmoid(2x) - 1, with tanh's own backward from the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = _sigmoid_tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad_y, y)


def _sigmoid_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x * 2).mul_(2).sub_(1)


_SIGMOID_FORM: bool | None = None  # this process's choice, made at its first CPU tanh


def sigmoid_form_is_faster() -> bool:
    """Whether this CPU computes tanh faster as 2 sigmoid(2x) - 1 than with torch.tanh,
    measured once per process, on one thread (the learner's default), on 256 x 64 numbers: the
    better of 7 tries of each, alternated, so a busy machine slows both alike; about 10 ms. The
    two differ by far more than the margin asked (1.5x) on the machines measured, in opposite
    directions: for 672 x 64 numbers on a 2-core AMD EPYC torch.tanh took 113 us against 33 us
    for the sigmoid form (2026-12-02), on a 2-core Intel Xeon 14.5 us against 40 us
    (2026-12-05; torch 2.13 both)."""
    global _SIGMOID_FORM
    if _SIGMOID_FORM is None:
        x = torch.linspace(-4.0, 4.0, 256 * 64).view(256, 64)
        best = {"tanh": math.inf, "sigmoid": math.inf}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(7):
                for name, fn in (("tanh", torch.tanh), ("sigmoid", _sigmoid_tanh)):
                    start = time.perf_counter()
                    for _ in range(10):
                        fn(x)
                    best[name] = min(best[name], time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
        _SIGMOID_FORM = best["sigmoid"] * 1.5 < best["tanh"]
    return _SIGMOID_FORM


class Tanh(nn.Module):
    """tanh, on the CPU computed as 2 sigmoid(2x) - 1 where that is faster (within 2e-7 of
    torch.tanh: float32 rounding; see `sigmoid_form_is_faster`): on some CPUs PyTorch's tanh
    kernel is several times slower than its sigmoid, and the tanh layers were then the largest
    single cost of a CartPole update. The backward is tanh's own, 1 - y^2 from the output. On
    other devices, and CPUs where it is fast, torch.tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not sigmoid_form_is_faster():
            return torch.tanh(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidTanh.apply(x)
        return _sigmoid_tanh(x)


def _tower(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers)


def _inputs(obs_norm: ObsNorm | None, obs: torch.Tensor, encoder: nn.Module | None = None):
    """The network's float inputs: `obs` encoded as one vector by `encoder` if there is one
    (`impala.nets.encoders.FlatEncoder`: the parts of a Dict or Tuple, one-hot discrete values),
    else `obs` itself, standardised if there is an `obs_norm`."""
    if encoder is not None:
        return encoder(obs)
    return obs.float() if obs_norm is None else obs_norm(obs)


def _orthogonal_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
            nn.init.zeros_(layer.bias)


class MLPTorso(nn.Module):
    """`num_layers` layers of `num_hidden` tanh units: the torso under an LSTM core (and the
    vector parts' encoder of `impala.nets.encoders.MultiInputTorso`). `encoder`: a module that
    makes the observation one float vector of `obs_dim` first (`FlatEncoder`)."""

    def __init__(
        self,
        obs_dim: int,
        *,
        num_hidden: int = 64,
        num_layers: int = 2,
        obs_norm: bool = False,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.obs_norm = ObsNorm(obs_dim) if obs_norm and encoder is None else None
        self.tower = _tower([obs_dim] + [num_hidden] * num_layers, Tanh)
        self.num_features = num_hidden
        _orthogonal_init(self)

    def forward(self, obs) -> torch.Tensor:
        """obs `[N, obs_dim]` (or what `encoder` takes) -> features `[N, num_hidden]`."""
        return self.tower(_inputs(self.obs_norm, obs, self.encoder))


class MLPNet(nn.Module):
    """An MLP policy-value network for flat vector observations, for any action space of
    `impala.distributions` (`action`: an ActionSpec, or an int for that many discrete actions).

    By default the policy and the value have separate towers (`num_layers` layers of
    `num_hidden` tanh units each), so the value loss, whose scale grows with the returns, does not
    disturb the policy's features. `shared=True` gives one torso with two heads.
    Orthogonal initialisation, with a small policy head so that the first policy is near uniform
    (a Gaussian's means near 0).
    `obs_norm=True` standardises the inputs first (`impala.nets.obsnorm`). `encoder`: a module
    that makes the observation one float vector of `obs_dim` first (`FlatEncoder`: the parts of
    a Dict or Tuple, one-hot discrete values; it standardises its vector parts itself).
    """

    is_recurrent = False

    def __init__(
        self,
        obs_dim: int,
        action: int | ActionSpec,
        *,
        num_hidden: int = 64,
        num_layers: int = 2,
        shared: bool = False,
        popart_beta: float | None = None,
        obs_norm: bool = False,
        num_tasks: int = 1,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        sizes = [obs_dim] + [num_hidden] * num_layers
        self.action_spec = as_spec(action)
        self.shared = shared
        self.encoder = encoder
        self.obs_norm = ObsNorm(obs_dim) if obs_norm and encoder is None else None
        self.policy_torso = _tower(sizes, Tanh)
        self.value_torso = None if shared else _tower(sizes, Tanh)
        self.policy_head = policy_head(sizes[-1], self.action_spec)
        self.value_head = value_head(sizes[-1], popart_beta, num_tasks)
        _orthogonal_init(self)
        init_policy_head(self.policy_head)
        linear = self.value_head.linear if popart_beta is not None else self.value_head
        nn.init.orthogonal_(linear.weight, gain=1.0)

    def forward(self, obs) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, obs_dim]` (or what `encoder` takes) -> policy parameters `[N, P]` (logits for
        discrete actions), values `[N]`."""
        obs = _inputs(self.obs_norm, obs, self.encoder)
        policy_features = self.policy_torso(obs)
        value_features = policy_features if self.value_torso is None else self.value_torso(obs)
        return self.policy_head(policy_features), values(self.value_head, value_features)

    def policy_logits(self, obs) -> torch.Tensor:
        """obs `[N, obs_dim]` -> policy parameters `[N, P]`, without the value tower (acting needs
        none)."""
        return self.policy_head(self.policy_torso(_inputs(self.obs_norm, obs, self.encoder)))

    def numpy_net(self) -> NumpyMLP | None:
        """This network's forward pass in numpy (`NumpyMLP`), or None where that does not apply
        (weights off the CPU or not float32, a Gaussian policy head, an `encoder`)."""
        if self.encoder is not None:
            return None
        head = self.value_head.linear if isinstance(self.value_head, PopArt) else self.value_head
        if not isinstance(self.policy_head, nn.Linear) or not isinstance(head, nn.Linear):
            return None
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in self.parameters()):
            return None
        return NumpyMLP(self)


class NumpyMLP:
    """An `MLPNet`'s forward pass in numpy, over views of its parameters: obs `[N, obs_dim]` ->
    `policy_logits` float32 `[N, P]`, `values` float32 `[N]` (`[N, K]` for K tasks).

    The views follow the weights as long as they are copied in place (the parameter store and
    `load_state_dict` do). Acting on a few dozen environments, torch's per-operation overhead is
    most of the cost of so small a network (CartPole's, 32 environments: 38 us per step in torch,
    15 us in numpy)."""

    def __init__(self, net: MLPNet) -> None:
        def arrays(linear: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
            return linear.weight.detach().numpy().T, linear.bias.detach().numpy()

        def tower(layers: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
            return [arrays(m) for m in layers if isinstance(m, nn.Linear)]

        self.norm = net.obs_norm
        if self.norm is not None:
            self.mean, self.var = self.norm.mean.detach().numpy(), self.norm.var.detach().numpy()
        self.policy_tower = tower(net.policy_torso)
        self.value_tower = None if net.value_torso is None else tower(net.value_torso)
        self.policy_head = arrays(net.policy_head)
        self.popart = net.value_head if isinstance(net.value_head, PopArt) else None
        linear = self.popart.linear if self.popart is not None else net.value_head
        self.value_head = arrays(linear)

    def _inputs(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        if self.norm is None:
            return x
        scaled = (x - self.mean) / np.sqrt(self.var + np.float32(EPS))
        return np.clip(scaled, -self.norm.clip, self.norm.clip)

    @staticmethod
    def _tower(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
        for weight_t, bias in layers:
            x = np.tanh(x @ weight_t + bias)
        return x

    def policy_logits(self, obs: np.ndarray) -> np.ndarray:
        weight_t, bias = self.policy_head
        return self._tower(self.policy_tower, self._inputs(obs)) @ weight_t + bias

    def values(self, obs: np.ndarray) -> np.ndarray:
        tower = self.policy_tower if self.value_tower is None else self.value_tower
        weight_t, bias = self.value_head
        out = self._tower(tower, self._inputs(obs)) @ weight_t + bias
        if self.popart is not None:  # unnormalised, as PopArt's forward
            with torch.no_grad():
                sigma, mu = self.popart.sigma.numpy(), self.popart.mu.detach().numpy()
            out = out * sigma + mu
        return out[:, 0] if out.shape[1] == 1 else out
