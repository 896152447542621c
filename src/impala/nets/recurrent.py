"""The LSTM core (Espeholt et al. 2018, Fig. 3): torso -> LSTM -> policy and value heads.

As in the paper, the LSTM's input at time t is the torso's features of `x_t` with the one-hot
action `a_{t-1}` and the reward `r_{t-1}` clipped to [-1, 1] that led to `x_t` (for other action
spaces the action's features of `impala.distributions.action_features`). The state is
carried from step to step and from one unroll to the next, and reset to zeros before the first
observation of an episode (`first[t]`), inside an unroll too. An explorer records the state at
the start of each unroll, so the learner replays the unroll from exactly that state.

Shapes: time-major, `obs [T, B, ...]` (or a dict of such, by part), `prev_action [T, B,
*action_shape]`, `prev_reward [T, B]`, `first [T, B]` (bool), state `(h [B, H], c [B, H])`.
"""

from __future__ import annotations

import torch
from torch import nn

from impala.distributions import ActionSpec, action_features, as_spec
from impala.envs import spaces
from impala.nets.heads import Heads

State = tuple[torch.Tensor, torch.Tensor]


class RecurrentNet(nn.Module):
    """`torso` (obs `[N, ...]` -> `[N, F]`), an LSTM of `core_size` units, two linear heads."""

    is_recurrent = True

    def __init__(
        self,
        torso: nn.Module,
        action: int | ActionSpec,
        core_size: int = 256,
        popart_beta: float | None = None,
        num_tasks: int = 1,
    ) -> None:
        super().__init__()
        self.torso = torso
        self.action_spec = as_spec(action)
        self.core_size = core_size
        self.core = nn.LSTMCell(torso.num_features + self.action_spec.feature_size + 1, core_size)
        self.heads = Heads(core_size, self.action_spec, popart_beta, num_tasks)

    def initial_state(self, batch_size: int) -> State:
        """Zeros `(h [B, H], c [B, H])`."""
        device = self.core.weight_ih.device
        zeros = torch.zeros(batch_size, self.core_size, device=device)
        return zeros, zeros.clone()

    def unroll(
        self,
        obs: torch.Tensor,
        prev_action: torch.Tensor,
        prev_reward: torch.Tensor,
        first: torch.Tensor,
        state: State,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """-> policy parameters `[T, B, P]` (logits for discrete actions), values `[T, B]`, the
        state after the last step."""
        T, B = spaces.lead_shape(obs, 2)
        features = self.torso(spaces.map_obs(lambda part: part.flatten(0, 1), obs)).view(T, B, -1)
        inputs = torch.cat(
            [
                features,
                action_features(self.action_spec, prev_action, features.dtype),
                prev_reward.to(features.dtype).clamp(-1.0, 1.0).unsqueeze(-1),
            ],
            dim=-1,
        )
        keep = (~first.bool()).to(features.dtype).unsqueeze(-1)  # [T, B, 1]: 0 resets
        h, c = state
        outputs = []
        for t in range(T):
            h, c = self.core(inputs[t], (h * keep[t], c * keep[t]))
            outputs.append(h)
        logits, values = self.heads(torch.stack(outputs).flatten(0, 1))
        return logits.view(T, B, -1), values.view(T, B, *values.shape[1:]), (h, c)
