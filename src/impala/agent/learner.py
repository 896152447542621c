"""The learner role: takes batches from the global buffer, updates pi, publishes new weights."""

from __future__ import annotations

import copy
from collections import deque
from typing import Callable

import torch
from torch import nn

from impala import corrections, losses, vtrace
from impala.agent.buffer import SequenceReplay, num_sequences, select_sequences
from impala.agent.params import ParameterStore
from impala.config import Config
from impala.errors import ConfigError
from impala.nets.conv import ImageTorso
from impala.nets.heads import check_value_outputs, task_values
from impala.nets.obsnorm import ObsNorm
from impala.nets.popart import PopArt
from impala.optim import RMSpropTF


def resolve_device(name: str) -> torch.device:
    """The learner's device for `--device` (ConfigError, one line, for cuda without CUDA)."""
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


def uses_bf16(precision: str, model: nn.Module, device: torch.device | None = None) -> bool:
    """bf16 autocast for `--precision bf16`, and for 'auto' on convolutional networks where the
    device computes bf16 fast: a GPU, or a CPU with oneDNN's bf16 kernels (AVX-512 and up;
    measured on such 2-core machines with channels-last: shallow 281 -> 220 ms, deep 5.8 -> 2.6
    s per update). On an AVX2-only CPU bf16 is emulated: a MinAtar update took 88 ms in bf16
    against 14 ms in fp32, so 'auto' keeps fp32 there."""
    if precision == "auto":
        conv = isinstance(getattr(model, "torso", None), ImageTorso)
        return conv and bf16_is_fast(device or torch.device("cpu"))
    return precision == "bf16"


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` has native bf16 arithmetic for convolutions and matrix products."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
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


class FlatGradients:
    """The gradients of a model's trained parameters as views of one flat buffer, so that zeroing
    them and clipping their global norm are one operation each instead of a loop over the
    parameters (zero_grad and clip_grad_norm_ took 9% of a CartPole update's time).

    Autograd adds into an existing gradient in place, so after `zero()` a backward pass fills the
    buffer. A gradient that something replaced (a hook that assigns `p.grad`) is copied back into
    the buffer before the norm is taken. Every trained parameter gets a gradient at each update
    (zero where the loss does not reach it), where zero_grad(set_to_none=True) would have left
    such a parameter without one and the optimizer would have skipped it; every parameter of this
    project's networks is reached by every update's loss.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        total = sum(p.numel() for p in params)
        self.flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        chunks = torch.split(self.flat, [p.numel() for p in params])
        self.views = [v.view_as(p) for v, p in zip(chunks, params, strict=True)]
        self.zero()

    @classmethod
    def of(cls, params) -> FlatGradients | None:
        """Flat gradients of the parameters that take gradient, or None if they are not all of
        one dtype and device (or there are none)."""
        trained = [p for p in params if p.requires_grad]
        if not trained or len({(p.dtype, p.device) for p in trained}) > 1:
            return None
        return cls(trained)

    def zero(self) -> None:
        """Zeroes every gradient (and attaches any that was detached from the buffer)."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:
                p.grad = view
        self.flat.zero_()

    def clip_norm(self, max_norm: float) -> torch.Tensor:
        """As `nn.utils.clip_grad_norm_`: scales the gradients so that their global L2 norm is at
        most `max_norm` and returns the norm before scaling."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:  # replaced since `zero` (e.g. by a gradient hook)
                view.copy_(p.grad if p.grad is not None else torch.zeros_like(view))
                p.grad = view
        norm = torch.linalg.vector_norm(self.flat)
        if max_norm != float("inf"):
            self.flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer` with the config's settings.

    Fused (one kernel for all parameters) where PyTorch has it, else the multi-tensor version:
    on small networks the per-parameter loop of the default costs as much as the gradient
    (Adam on the CartPole MLP: 79 us fused, 225 us multi-tensor, 334 us default).
    """
    params = list(params)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params,
            lr=cfg.learning_rate,
            alpha=cfg.rmsprop_alpha,
            eps=cfg.optimizer_eps,
            momentum=cfg.rmsprop_momentum,
            foreach=True,
        )
    if cfg.optimizer == "rmsprop-tf":
        return RMSpropTF(
            params,
            lr=cfg.learning_rate,
            decay=cfg.rmsprop_alpha,
            eps=cfg.optimizer_eps,
            momentum=cfg.rmsprop_momentum,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.optimizer_eps, fused=True)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.learning_rate, fused=True)
    return torch.optim.SGD(params, lr=cfg.learning_rate, fused=True)


def scheduled(value: float, schedule: str, progress: float) -> float:
    """`value` at the run's `progress` in [0, 1]: as it is ('constant'), or decayed linearly to 0
    ('linear'; --lr-schedule, --entropy-schedule)."""
    return value * max(0.0, 1.0 - progress) if schedule == "linear" else value


class Learner:
    """Updates pi (`model`) from batches and publishes each new version to `store`.

    `update(batch, progress)` takes a batch laid out as in `impala.agent.buffer` and the run's
    progress in [0, 1] (for the linear learning-rate decay) and returns scalar metrics.

    The model lives on `cfg.device`; a batch is moved there once per update (from pinned memory
    to a GPU), and its uint8 frames become floats only there, inside the network.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        store: ParameterStore,
        grad_sync: Callable[[nn.Module], None] | None = None,
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
        self.updates = 0
        # PopArt's value head, if the network has one: its statistics move after each update.
        self.popart = next((m for m in self.model.modules() if isinstance(m, PopArt)), None)
        self._targets: torch.Tensor | None = None
        # Running statistics of the observations, if the network standardises its inputs.
        self.obs_norm = next((m for m in self.model.modules() if isinstance(m, ObsNorm)), None)
        # APPO: the target network pi_target (the surrogate's reference and V-trace's target
        # policy), refreshed from pi every cfg.appo_target_interval updates, and the circular
        # buffer of recent batches that passes after a batch's first draw from.
        self.target: nn.Module | None = None
        self._reuse: deque[dict[str, torch.Tensor]] = deque(maxlen=cfg.appo_buffer)
        self._reuse_rng = torch.Generator().manual_seed(cfg.seed)
        if cfg.algo == "vtrace" and cfg.loss == "appo":
            self.target = copy.deepcopy(self.model).requires_grad_(False)
        # The paper's replay experiment: a share of every batch from past sequences.
        self.replay: SequenceReplay | None = None
        if cfg.replay_fraction > 0:
            generator = torch.Generator().manual_seed(cfg.seed + 1)
            self.replay = SequenceReplay(cfg.replay_size, cfg.replay_fraction, generator)
        self.stale_sequences = 0  # dropped by --max-policy-lag so far
        self.grads = FlatGradients.of(self.model.parameters())

    @property
    def version(self) -> int:
        return self.store.version

    def state(self) -> dict:
        """What a checkpoint keeps of the learner: weights, optimizer state, counters (and
        APPO's target network and circular buffer)."""
        state = {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "updates": self.updates,
            "policy_version": self.store.version,
        }
        if self.target is not None:
            state["appo"] = {
                "target": _to_cpu(self.target.state_dict()),
                "reuse": [_to_cpu(batch) for batch in self._reuse],
                "rng": self._reuse_rng.get_state(),
            }
        if self.replay is not None:
            state["replay"] = self.replay.state()
        state["stale_sequences"] = self.stale_sequences
        return state

    def restore(self, state: dict) -> None:
        """Takes the learner back to a checkpoint's `state` and publishes its weights under the
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
        self.stale_sequences = int(state.get("stale_sequences", 0))
        if self.replay is not None and "replay" in state:
            self.replay.restore(state["replay"])
        if self.target is not None:
            appo = state.get("appo")
            if appo is None:  # a checkpoint of a run without APPO (--override)
                self.target.load_state_dict(self.model.state_dict())
            else:
                self.target.load_state_dict(appo["target"])
                self._reuse.clear()
                self._reuse.extend(self._to_device(b) for b in appo["reuse"])
                self._reuse_rng.set_state(appo["rng"])
        flat = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        self.store.assign(int(state["policy_version"]), flat.to(self.store.flat.device))

    def _set_learning_rate(self, progress: float) -> float:
        lr = scheduled(self.cfg.learning_rate, self.cfg.lr_schedule, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward(
        self, batch: dict[str, torch.Tensor], model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy parameters `[T+1, B, P]` (logits for discrete actions) and values `[T+1, B]`
        of pi (or `model`) for a V-trace batch, in float32 (a multi-task network's values are
        those of each sequence's task)."""
        model = self.model if model is None else model
        obs = batch["obs"]  # [T+1, B, *obs]
        T1, B = obs.shape[:2]
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
                logits, values = model(obs.flatten(0, 1))
        values = values.float().reshape(T1, B, -1)  # [T+1, B, K]: one per task
        return logits.float().view(T1, B, -1), task_values(values, batch.get("task"))

    def learn(
        self, batch: dict[str, torch.Tensor], progress: float = 0.0
    ) -> list[dict[str, float]]:
        """Learns from a batch received: one update, and with APPO's --appo-passes more, each on a
        batch drawn at random from the circular buffer of the last --appo-buffer batches (this
        one included). The metrics of each update, in order. A FIFO batch wider than
        --batch-size (one explorer's unroll of more envs) is learned from in minibatches of that
        many sequences, each as above.

        Before that, with --max-policy-lag the sequences of too old a policy are dropped (no update
        if none is left), and with --replay-fraction the batch is joined by sequences drawn from
        the replay of earlier ones. The lag limit applies to sequences as they arrive: replayed
        sequences (old by design) and APPO's later passes over batches that passed it are kept."""
        if self.cfg.max_policy_lag is not None:
            batch = self._drop_stale(batch)
            if batch is None:
                return []
        size = self.cfg.batch_size
        if self.cfg.buffer == "fifo" and self.cfg.algo == "vtrace" and num_sequences(batch) > size:
            # --batch-size under --envs-per-explorer: an explorer's unroll in minibatches, one
            # update each (in order: V-trace corrects the later ones' extra lag)
            return [
                metrics
                for start in range(0, num_sequences(batch), size)
                for metrics in self._learn_batch(
                    select_sequences(batch, torch.arange(start, start + size)), progress
                )
            ]
        return self._learn_batch(batch, progress)

    def _learn_batch(
        self, batch: dict[str, torch.Tensor], progress: float
    ) -> list[dict[str, float]]:
        if self.replay is not None:
            batch = self.replay.mix(batch)
        if self.target is None or self.cfg.appo_passes == 1:
            return [self.update(batch, progress)]
        batch = self._to_device(batch)
        self._reuse.append(batch)
        metrics = [self.update(batch, progress)]
        for _ in range(self.cfg.appo_passes - 1):
            pick = int(torch.randint(len(self._reuse), (), generator=self._reuse_rng))
            metrics.append(self.update(self._reuse[pick], progress))
        return metrics

    def _drop_stale(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """`batch` without the sequences whose oldest step was acted by a policy more than
        --max-policy-lag versions behind the learner's; None if none is left."""
        oldest = batch["policy_version"].min(0).values  # [B]
        fresh = (self.store.version - oldest) <= self.cfg.max_policy_lag
        dropped = int((~fresh).sum())
        if dropped == 0:
            return batch
        self.stale_sequences += dropped
        if dropped == num_sequences(batch):
            return None
        return select_sequences(batch, torch.nonzero(fresh).squeeze(1))

    def update(self, batch: dict[str, torch.Tensor], progress: float = 0.0) -> dict[str, float]:
        """One update of pi from `batch`; its metrics."""
        batch = self._to_device(batch)
        lr = self._set_learning_rate(progress)
        if self.obs_norm is not None:
            self.obs_norm.update(batch["obs"])  # published with the weights below
        if self.cfg.algo == "reinforce":
            terms, logits = self._reinforce_loss(batch)
        else:
            entropy_cost = scheduled(self.cfg.entropy_cost, self.cfg.entropy_schedule, progress)
            terms, logits = self._vtrace_loss(batch, entropy_cost)
        if self.grads is not None:
            self.grads.zero()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.grad_sync is not None:
            self.grad_sync(self.model)
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        if self.grads is not None:
            grad_norm = self.grads.clip_norm(clip)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        if self.popart is not None and self._targets is not None:
            self.popart.update(self._targets, batch.get("task"))  # outputs preserved; published
        self.updates += 1
        if self.target is not None and appo_target_due(
            self.updates, self.cfg.appo_target_interval, self.cfg.appo_target_growth
        ):
            self.target.load_state_dict(self.model.state_dict())
        behaviour_version = batch["policy_version"].double().mean().item()
        policy_lag = self.store.version - behaviour_version
        self.store.publish(self.model)
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics.update(
            grad_norm=float(grad_norm),
            learning_rate=lr,
            policy_lag=policy_lag,
            batch_steps=int(batch["policy_version"].numel()),
        )
        metrics.update(self._policy_metrics(logits.detach()))
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

    def _vtrace_loss(self, batch: dict[str, torch.Tensor], entropy_cost: float):
        logits, values = self._forward(batch)
        reference = None  # APPO: pi_target's logits, V-trace's target policy and the clip's
        if self.target is not None:
            with torch.no_grad():
                reference = self._forward(batch, self.target)[0][:-1]
        # Truncated episodes: discount is 0 there and the explorer recorded V_mu of the last
        # observation, so the target is r + gamma * V(x_last), never the next episode's value.
        rewards = batch["reward"] + self.cfg.gamma * batch["truncation_value"]
        actions, spec = batch["action"], self.action_spec
        with torch.no_grad():  # log pi/mu of the actions taken (the joint policy's)
            target = logits[:-1] if reference is None else reference
            log_rhos = losses.log_probs(target, actions, spec)
            log_rhos -= losses.log_probs(batch["behaviour_logits"], actions, spec)
        returns = corrections.off_policy_returns(
            self.cfg.correction,
            log_rhos=log_rhos,
            discounts=batch["discount"],
            rewards=rewards,
            values=values[:-1],
            bootstrap_value=values[-1],
            clip_rho_threshold=self.cfg.clip_rho_threshold,
            clip_c_threshold=self.cfg.clip_c_threshold,
            clip_pg_rho_threshold=self.cfg.clip_pg_rho_threshold,
            lambda_=self.cfg.vtrace_lambda,
        )
        vs, advantages, values = returns.vs, returns.pg_advantages, values[:-1]
        if self.popart is not None:
            # PopArt: the baseline loss on normalised values and targets, the advantages scaled
            # by 1/sigma; V-trace itself ran on unnormalised values (see impala.nets.popart).
            self._targets = vs.detach()
            mu, sigma = self.popart.mu.detach(), self.popart.sigma  # [K]: each sequence's task's
            if self.popart.num_tasks > 1:
                mu, sigma = mu[batch["task"].long()], sigma[batch["task"].long()]
            vs, values, advantages = (vs - mu) / sigma, (values - mu) / sigma, advantages / sigma
        costs = dict(
            baseline_cost=self.cfg.baseline_cost,
            entropy_cost=entropy_cost,
            reduction=self.cfg.loss_reduction,
            action_spec=spec,
        )
        targets = vtrace.VTraceReturns(vs=vs, pg_advantages=advantages)
        if reference is None:
            epsilon = corrections.EPSILON if self.cfg.correction == "epsilon" else None
            terms = losses.actor_critic_loss(
                logits[:-1], values, actions, targets, log_epsilon=epsilon, **costs
            )
        else:
            terms = losses.appo_loss(
                logits[:-1], reference, values, actions, targets, clip=self.cfg.appo_clip, **costs
            )
        out = {
            "loss": terms.total,
            "policy_loss": terms.policy,
            "baseline_loss": terms.baseline,
            "entropy_loss": terms.entropy,
            "mean_rho": log_rhos.exp().mean(),
        }
        if reference is not None:
            with torch.no_grad():  # the share of steps whose ratio pi/pi_target left the range
                log_ratio = losses.log_probs(logits[:-1], actions, spec)
                log_ratio -= losses.log_probs(reference, actions, spec)
                outside = (log_ratio.exp() - 1).abs() > self.cfg.appo_clip
                out["clip_fraction"] = outside.float().mean()
        return out, logits[:-1]

    def _reinforce_loss(self, batch: dict[str, torch.Tensor]):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, values = self.model(batch["obs"])
        logits, values = logits.float(), values.float()
        terms = losses.reinforce_loss(
            logits, values, batch["action"], batch["mc_return"], action_spec=self.action_spec
        )
        out = {"loss": terms.total, "policy_loss": terms.policy, "baseline_loss": terms.baseline}
        return out, logits


def _to_cpu(value):
    """A copy of a (nested) state dict with its tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
