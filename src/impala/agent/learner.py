"""The learner role: takes batches from the global buffer, updates pi, publishes new weights.

`Learner.learn(batch, steps)` runs a batch received through the batch pipeline
(`impala.agent.pipeline`: policy-lag filter, minibatch split, replay mixing, APPO's passes) and
makes one update per batch it yields. `Learner.update` is the paper's step: forward pass,
targets and loss (`impala.agent.objectives`, one function per algorithm), a gradient step, then
the normalisers' statistics (PopArt) and publication of the new weights. A loss or gradient that
is not finite ends the run there (`NonFiniteUpdate`), before the step, so the model it leaves is
that of the last finite update.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from impala.agent import objectives, schedules
from impala.agent.buffer import SequenceReplay
from impala.agent.params import ParameterStore
from impala.agent.pipeline import (
    ExtraPasses,
    MinibatchSplit,
    Pipeline,
    PolicyLagFilter,
    ReplayMixing,
)
from impala.config import Config
from impala.devices import resolve_device, to_device
from impala.envs import spaces
from impala.errors import ConfigError, RunFailed
from impala.nets.conv import ImageTorso
from impala.nets.encoders import MultiInputTorso
from impala.nets.heads import check_value_outputs, constrain_parameters, task_values
from impala.nets.obsnorm import ObsNorm
from impala.nets.popart import PopArt
from impala.optim import FlatGradients, make_optimizer


def uses_bf16(precision: str, model: nn.Module, device: torch.device | None = None) -> bool:
    """bf16 autocast for `--precision bf16`, and for 'auto' on convolutional networks where the
    device computes bf16 fast: a GPU, or a CPU with oneDNN's bf16 kernels (AVX-512 and up;
    measured on such 2-core machines with channels-last: shallow 281 -> 220 ms, deep 5.8 -> 2.6
    s per update). On an AVX2-only CPU bf16 is emulated: a MinAtar update took 88 ms in bf16
    against 14 ms in fp32, so 'auto' keeps fp32 there. A Dict or Tuple observation's network
    with image parts (`impala.nets.encoders.MultiInputTorso`) counts as convolutional."""
    if precision == "auto":
        torso = getattr(model, "torso", None)
        conv = isinstance(torso, ImageTorso) or (
            isinstance(torso, MultiInputTorso) and len(torso.images) > 0
        )
        return conv and bf16_is_fast(device or torch.device("cpu"))
    return precision == "bf16"


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` has native bf16 arithmetic for convolutions and matrix products."""
    if device.type == "cuda":  # compute capability 8 and up; torch's default also counts
        return torch.cuda.is_bf16_supported(including_emulation=False)  # emulation (slow)
    try:  # oneDNN's own check of the CPU (AVX-512 BW/VL/DQ, AVX-512 BF16 or AMX)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def appo_target_interval(updates: int, interval: int, growth: float) -> int:
    """APPO's target-refresh interval after `updates` updates: `interval`, or with `growth` > 0
    the largest power of two not above growth * updates (at least 1), capped at `interval`. A
    target refreshed often while the policy is young lets it move quickly (sparse rewards' first
    successes), a target held longer later bounds its drift (a trust region that tightens as
    learning goes on). A function of the update count alone, so a resumed run refreshes where an
    uninterrupted one would."""
    if growth <= 0:
        return interval
    grown = max(1.0, growth * updates)
    return min(interval, 1 << (int(grown).bit_length() - 1))


def appo_target_due(updates: int, interval: int, growth: float) -> bool:
    """Whether the target is refreshed after update number `updates` (counted from 1)."""
    return updates % appo_target_interval(updates, interval, growth) == 0


class NonFiniteUpdate(RunFailed):
    """An update whose loss or gradient is not finite (NaN or infinite): the run ends there."""


class Learner:
    """Updates pi (`model`) from batches and publishes each new version to `store`.

    `learn(batch, steps)` takes a batch laid out as in `impala.agent.buffer` and the run's env
    steps so far (for the learning-rate and entropy schedules, `impala.agent.schedules`, which end
    at `total_steps`, default the config's budget) and returns the metrics of each update made.

    The model lives on `cfg.device`; a batch is moved there once (from pinned memory to a GPU:
    by APPO's passes, which keep it there for the later passes, else by `update`), and its uint8
    frames become floats only there, inside the network.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        store: ParameterStore,
        grad_sync: Callable[[nn.Module], None] | None = None,
        *,
        total_steps: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.action_spec = model.action_spec  # what the policy's output means (distributions)
        self.bf16 = uses_bf16(cfg.precision, model, self.device)
        self.store = store
        # Synchronous multi-learner training: the runtime's hook averages the gradients of all
        # learners (a collective) so that every learner applies the same update.
        self.grad_sync = grad_sync
        self.optimizer = make_optimizer(cfg, model.parameters())
        self.grads = FlatGradients.of(self.model.parameters())
        self.updates = 0
        self.total_steps = cfg.steps_total if total_steps is None else total_steps
        self.lr_schedule = schedules.fresh(cfg.lr_schedule, cfg.learning_rate, self.total_steps)
        self.entropy_schedule = schedules.fresh(
            cfg.entropy_schedule, cfg.entropy_cost, self.total_steps
        )
        # Normalisers, if the network has them: running statistics of the observations (moved
        # before each update, from its batch: one per vector part of a Dict or Tuple) and
        # PopArt's value head (moved after it, from the V-trace targets, with the head's
        # outputs preserved).
        self.obs_norms = [m for m in self.model.modules() if isinstance(m, ObsNorm)]
        self.obs_norm = self.obs_norms[0] if self.obs_norms else None
        self.popart = next((m for m in self.model.modules() if isinstance(m, PopArt)), None)
        self.value_targets: torch.Tensor | None = None  # the last update's, for PopArt
        # APPO: the target network pi_target (the surrogate's reference and V-trace's target
        # policy), refreshed from pi every cfg.appo_target_interval updates.
        self.target: nn.Module | None = None
        if cfg.algo == "vtrace" and cfg.loss == "appo":
            self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.lag_filter: PolicyLagFilter | None = None
        self.replay: SequenceReplay | None = None
        self.passes: ExtraPasses | None = None
        self.pipeline = Pipeline(self._stages())

    def _stages(self) -> list:
        """The batch pipeline's stages this run has, in their order (impala.agent.pipeline)."""
        cfg, stages = self.cfg, []
        if cfg.max_policy_lag is not None:
            self.lag_filter = PolicyLagFilter(cfg.max_policy_lag, lambda: self.store.version)
            stages.append(self.lag_filter)
        if cfg.buffer == "fifo" and cfg.algo == "vtrace":
            # --batch-size under --envs-per-explorer: an explorer's unroll in minibatches
            stages.append(MinibatchSplit(cfg.batch_size))
        if cfg.replay_fraction > 0:
            generator = torch.Generator().manual_seed(cfg.seed + 1)
            self.replay = SequenceReplay(cfg.replay_size, cfg.replay_fraction, generator)
            stages.append(ReplayMixing(self.replay))
        if self.target is not None:
            self.passes = ExtraPasses(cfg.appo_passes, cfg.appo_buffer, cfg.seed, self._to_device)
            if cfg.appo_passes > 1:
                stages.append(self.passes)
        return stages

    @property
    def version(self) -> int:
        return self.store.version

    @property
    def stale_sequences(self) -> int:
        """Sequences dropped by --max-policy-lag so far."""
        return self.lag_filter.dropped if self.lag_filter is not None else 0

    def state(self) -> dict:
        """What a checkpoint keeps of the learner: weights, optimizer state, counters, the
        schedules (and APPO's target network and circular buffer, the replay)."""
        state = {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "updates": self.updates,
            "policy_version": self.store.version,
            "schedules": {
                "learning_rate": schedules.to_state(self.lr_schedule),
                "entropy_cost": schedules.to_state(self.entropy_schedule),
            },
        }
        if self.target is not None:
            state["appo"] = {
                "target": _to_cpu(self.target.state_dict()),
                "reuse": [_to_cpu(batch) for batch in self.passes.recent],
                "rng": self.passes.rng.get_state(),
            }
        if self.replay is not None:
            state["replay"] = self.replay.state()
        state["stale_sequences"] = self.stale_sequences
        return state

    def restore(self, state: dict) -> None:
        """Takes the learner back to a checkpoint's `state` (not its schedules: a resumed run
        decides those, see `impala.agent.schedules.resumed`) and publishes its weights under the
        checkpoint's policy version. ConfigError, one line, for weights that do not fit."""
        check_value_outputs(state["model"], self.model, "the checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"the checkpoint's weights do not fit this network: {str(exc).splitlines()[0]}"
            ) from None
        self.updates = int(state["updates"])
        if self.lag_filter is not None:
            self.lag_filter.dropped = int(state.get("stale_sequences", 0))
        if self.replay is not None and "replay" in state:
            self.replay.restore(state["replay"])
        if self.target is not None:
            appo = state.get("appo")
            if appo is None:  # a checkpoint of a run without APPO (--override)
                self.target.load_state_dict(self.model.state_dict())
            else:
                self.target.load_state_dict(appo["target"])
                self.passes.recent.clear()
                self.passes.recent.extend(self._to_device(b) for b in appo["reuse"])
                self.passes.rng.set_state(appo["rng"])
        flat = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        self.store.assign(int(state["policy_version"]), flat.to(self.store.flat.device))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` on the learner's device: copied there once (see `impala.devices.to_device`);
        a batch already there, as APPO's passes hand it over, is left as it is."""
        return to_device(batch, self.device)

    # --- learning --------------------------------------------------------------------------------
    def learn(self, batch: dict[str, torch.Tensor], steps: int = 0) -> list[dict[str, float]]:
        """Learns from a batch received: one update per batch the pipeline makes of it (none if
        the lag limit drops every sequence), at the run's `steps` env steps so far. The metrics
        of each update, in order."""
        return [self.update(b, steps) for b in self.pipeline(batch)]

    def update(self, batch: dict[str, torch.Tensor], steps: int = 0) -> dict[str, float]:
        """One update of pi from `batch` at the run's `steps` env steps (the paper's step);
        its metrics."""
        batch = self._to_device(batch)
        lr = self._set_learning_rate(steps)
        entropy_cost = self.entropy_schedule(steps)
        obs = spaces.from_batch(batch)
        for norm in self.obs_norms:  # published with the weights below
            norm.update(spaces.part_of(obs, norm.part))
        out = self._loss(batch, entropy_cost)
        grad_norm = self._step(out)
        self.value_targets = out.value_targets
        if self.popart is not None and out.value_targets is not None:
            self.popart.update(out.value_targets, batch.get("task"))  # outputs preserved
        self.updates += 1
        if self.target is not None and appo_target_due(
            self.updates, self.cfg.appo_target_interval, self.cfg.appo_target_growth
        ):
            self.target.load_state_dict(self.model.state_dict())
        behaviour_version = batch["policy_version"].double().mean().item()
        policy_lag = self.store.version - behaviour_version
        self.store.publish(self.model)
        return self._metrics(out, batch, grad_norm, lr, policy_lag, entropy_cost)

    def _set_learning_rate(self, steps: int) -> float:
        lr = self.lr_schedule(steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _loss(self, batch: dict[str, torch.Tensor], entropy_cost: float) -> objectives.LossOut:
        """The algorithm's loss for `batch` (see impala.agent.objectives)."""
        cfg, spec = self.cfg, self.action_spec
        if cfg.algo == "reinforce":
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits, values = self.model(spaces.from_batch(batch))
            return objectives.reinforce_loss(logits.float(), values.float(), batch, spec=spec)
        logits, values = self._forward(batch)
        common = dict(cfg=cfg, spec=spec, entropy_cost=entropy_cost, popart=self.popart)
        if self.target is None:
            return objectives.impala_loss(logits, values, batch, **common)
        with torch.no_grad():
            reference = self._forward(batch, self.target)[0][:-1]
        return objectives.appo_loss(logits, values, reference, batch, **common)

    def _forward(
        self, batch: dict[str, torch.Tensor], model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy parameters `[T+1, B, P]` (logits for discrete actions) and values `[T+1, B]`
        of pi (or `model`) for a V-trace batch, in float32 (a multi-task network's values are
        those of each sequence's task)."""
        model = self.model if model is None else model
        obs = spaces.from_batch(batch)  # [T+1, B, *obs], or a dict of such by part
        T1, B = spaces.lead_shape(obs, 2)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if model.is_recurrent:
                logits, values, _ = model.unroll(
                    obs,
                    batch["prev_action"],
                    batch["prev_reward"],
                    batch["first"],
                    (batch["core_h"], batch["core_c"]),
                )
            else:
                logits, values = model(spaces.map_obs(lambda part: part.flatten(0, 1), obs))
        values = values.float().reshape(T1, B, -1)  # [T+1, B, K]: one per task
        return logits.float().view(T1, B, -1), task_values(values, batch.get("task"))

    def _step(self, out: objectives.LossOut) -> torch.Tensor:
        """A gradient step on `out.total` (gradients averaged over synchronous learners, their
        global norm clipped); NonFiniteUpdate, before the step, if the loss or the gradient is
        not finite. Returns the gradient's norm before clipping."""
        if self.grads is not None:
            self.grads.zero()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.model)
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        if self.grads is not None:
            grad_norm = self.grads.clip_norm(clip)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not (math.isfinite(float(out.total.detach())) and math.isfinite(float(grad_norm))):
            raise NonFiniteUpdate(self._non_finite(out, grad_norm))
        self.optimizer.step()
        constrain_parameters(self.model)  # bounds kept by projection: gradients stay alive
        return grad_norm

    def _non_finite(self, out: objectives.LossOut, grad_norm: torch.Tensor) -> str:
        """The line that ends a run whose update went non-finite: which update, and what."""
        bad = [
            f"{name} {float(value.detach()):g}"
            for name, value in out.terms.items()
            if name != "loss" and not math.isfinite(float(value.detach()))
        ]
        loss = float(out.total.detach())
        if not math.isfinite(loss):
            what = f"the loss is {loss:g}" + (f" ({', '.join(bad)})" if bad else "")
        else:
            params = [
                name
                for name, p in self.model.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            where = f" (in {', '.join(params[:3])}{', ...' if len(params) > 3 else ''})"
            what = f"the gradient's norm is {float(grad_norm):g}" + (where if params else "")
        return (
            f"update {self.updates + 1} went non-finite: {what}; the run stops here, its model "
            f"that of update {self.updates}, the last finite one (a lower --learning-rate, a "
            "--grad-clip or --value-norm popart may help)"
        )

    def _metrics(self, out, batch, grad_norm, lr, policy_lag, entropy_cost) -> dict[str, float]:
        metrics = {k: float(v.detach()) for k, v in out.terms.items()}
        metrics.update(
            grad_norm=float(grad_norm),
            learning_rate=lr,
            policy_lag=policy_lag,
            batch_steps=int(batch["policy_version"].numel()),
        )
        metrics.update(self._policy_metrics(out.policy_params.detach()))
        if self.popart is not None:
            mu, sigma = self.popart.mu.tolist(), self.popart.sigma.tolist()
            if len(mu) == 1:
                metrics.update(popart_mu=mu[0], popart_sigma=sigma[0])
            for k, (m, s) in enumerate(zip(mu, sigma, strict=True)) if len(mu) > 1 else ():
                metrics.update({f"popart_mu_task{k}": m, f"popart_sigma_task{k}": s})
        if self.cfg.max_policy_lag is not None:
            metrics.update(stale_sequences=self.stale_sequences)
        if self.cfg.algo == "vtrace" and self.cfg.entropy_schedule != "constant":
            metrics.update(entropy_cost=entropy_cost)
        return metrics

    def _policy_metrics(self, params: torch.Tensor) -> dict[str, float]:
        """The batch's mean probability of each action (discrete actions: `prob_action{a}`) or
        the policy's mean standard deviation (a Box: `policy_std`, in normalised units)."""
        spec = self.action_spec
        if spec.kind == "box":
            log_std = params.reshape(-1, spec.params_size)[:, spec.dim :]
            return {"policy_std": float(log_std.exp().mean())}
        if spec.kind != "discrete":
            return {}
        probs = torch.softmax(params, -1).reshape(-1, params.shape[-1]).mean(0)
        return {f"prob_action{a}": float(p) for a, p in enumerate(probs)}


def _to_cpu(value):
    """A copy of a (nested) state dict with its tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
