"""Dense policy-value networks: the seed prototype's network and an MLP for vector observations."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from impala.distributions import ActionSpec, as_spec
from impala.nets.heads import init_policy_head, policy_head, value_head, values
from impala.nets.obsnorm import EPS, ObsNorm


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


class Tanh(nn.Module):
    """tanh, computed on the CPU as 2 sigmoid(2x) - 1 (within 2e-7 of torch.tanh: float32
    rounding). PyTorch's CPU tanh kernel is several times slower than its sigmoid on these
    machines (a 672 x 64 batch, one thread: 113 us against 33 us for the whole sigmoid form, on
    AVX2 and AVX-512 alike), and the tanh layers were the largest single cost of a CartPole
    update. The backward is tanh's own, 1 - y^2 from the output. On other devices, torch.tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return torch.tanh(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidTanh.apply(x)
        return _sigmoid_tanh(x)


def _tower(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers)


def _inputs(obs_norm: ObsNorm | None, obs: torch.Tensor) -> torch.Tensor:
    """The network's float inputs: `obs` standardised if there is an `obs_norm`."""
    return obs.float() if obs_norm is None else obs_norm(obs)


def _orthogonal_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
            nn.init.zeros_(layer.bias)


class MLPTorso(nn.Module):
    """`num_layers` layers of `num_hidden` tanh units: the torso under an LSTM core."""

    def __init__(
        self, obs_dim: int, *, num_hidden: int = 64, num_layers: int = 2, obs_norm: bool = False
    ) -> None:
        super().__init__()
        self.obs_norm = ObsNorm(obs_dim) if obs_norm else None
        self.tower = _tower([obs_dim] + [num_hidden] * num_layers, Tanh)
        self.num_features = num_hidden
        _orthogonal_init(self)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, obs_dim]` -> features `[N, num_hidden]`."""
        return self.tower(_inputs(self.obs_norm, obs))


class MLPNet(nn.Module):
    """An MLP policy-value network for flat vector observations, for any action space of
    `impala.distributions` (`action`: an ActionSpec, or an int for that many discrete actions).

    By default the policy and the value have separate towers (`num_layers` layers of
    `num_hidden` tanh units each), so the value loss, whose scale grows with the returns, does not
    disturb the policy's features. `shared=True` gives one torso with two heads.
    Orthogonal initialisation, with a small policy head so that the first policy is near uniform
    (a Gaussian's means near 0).
    `obs_norm=True` standardises the inputs first (`impala.nets.obsnorm`).
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
    ) -> None:
        super().__init__()
        sizes = [obs_dim] + [num_hidden] * num_layers
        self.action_spec = as_spec(action)
        self.shared = shared
        self.obs_norm = ObsNorm(obs_dim) if obs_norm else None
        self.policy_torso = _tower(sizes, Tanh)
        self.value_torso = None if shared else _tower(sizes, Tanh)
        self.policy_head = policy_head(sizes[-1], self.action_spec)
        self.value_head = value_head(sizes[-1], popart_beta, num_tasks)
        _orthogonal_init(self)
        init_policy_head(self.policy_head)
        linear = self.value_head.linear if popart_beta is not None else self.value_head
        nn.init.orthogonal_(linear.weight, gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs `[N, obs_dim]` -> policy parameters `[N, P]` (logits for discrete actions),
        values `[N]`."""
        obs = _inputs(self.obs_norm, obs)
        policy_features = self.policy_torso(obs)
        value_features = policy_features if self.value_torso is None else self.value_torso(obs)
        return self.policy_head(policy_features), values(self.value_head, value_features)

    def policy_logits(self, obs: torch.Tensor) -> torch.Tensor:
        """obs `[N, obs_dim]` -> policy parameters `[N, P]`, without the value tower (acting needs
        none)."""
        return self.policy_head(self.policy_torso(_inputs(self.obs_norm, obs)))

    def numpy_policy(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """`policy_logits` in numpy, over views of this network's parameters: obs `[N, obs_dim]`
        -> float32 `[N, P]`. The views follow the weights as long as they are copied in place
        (the parameter store and `load_state_dict` do). Acting on a few dozen environments,
        torch's per-operation overhead is most of the cost of so small a network (CartPole's,
        32 environments: 38 us per step in torch, 15 us in numpy). None where it does not apply
        (weights off the CPU or not float32, a Gaussian policy head)."""
        params = list(self.parameters())
        if not isinstance(self.policy_head, nn.Linear) or any(
            p.device.type != "cpu" or p.dtype != torch.float32 for p in params
        ):
            return None

        def arrays(linear: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
            return linear.weight.detach().numpy().T, linear.bias.detach().numpy()

        layers = [arrays(m) for m in self.policy_torso if isinstance(m, nn.Linear)]
        head_w, head_b = arrays(self.policy_head)
        norm = self.obs_norm
        if norm is not None:
            mean, var = norm.mean.detach().numpy(), norm.var.detach().numpy()

        def policy(obs: np.ndarray) -> np.ndarray:
            x = np.asarray(obs, dtype=np.float32)
            if norm is not None:
                x = np.clip((x - mean) / np.sqrt(var + np.float32(EPS)), -norm.clip, norm.clip)
            for weight_t, bias in layers:
                x = np.tanh(x @ weight_t + bias)
            return x @ head_w + head_b

        return policy
