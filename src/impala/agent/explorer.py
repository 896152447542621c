"""The explorer role: acts in its environments with a local copy mu of pi and emits unrolls.

An explorer owns `E` environments stepped together (one batched policy call per step) and a copy
of the policy network (mu, the behaviour policy). It refreshes mu from the parameter store at the
start of every unroll (the paper) or whenever an episode starts (the seed prototype), and writes
trajectories into the arrays it is given (a shared-memory slot or a local buffer), with the
behaviour logits and the version of the weights that produced each action. Who runs mu is an
`ActingPolicy`: the explorer's own copy (`ModelPolicy`) or, with `--inference server`, one
process that acts for all explorers (`impala.runtime.inference`), which refreshes mu itself.

What is learned and what is reported can differ (the Atari protocol): rewards are clipped to
`[-reward_clip, reward_clip]` for learning, and with `episodic_life` a lost life ends the episode
for learning (discount 0, the recurrent state reset), while the returns reported are the whole
game's unclipped score.

With a recurrent network (`model.is_recurrent`) the explorer carries the core state from step to
step and unroll to unroll, feeds the last action and reward, and records with every unroll the
state at its start and the per-step inputs (`prev_action`, `prev_reward`, `first`), so that the
learner replays the unroll exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import threadpoolctl
import torch
from gymnasium.vector import VectorEnv
from torch import nn

from impala import checkpoint, distributions
from impala.agent.params import ParameterStore
from impala.envs import spaces


@dataclasses.dataclass
class UnrollInfo:
    """What an explorer reports with each unroll: steps made and the episodes it finished."""

    explorer: int
    steps: int
    episode_returns: list[float]
    episode_lengths: list[int]
    policy_version: int
    task: int = 0  # a multi-task run's task of this explorer


@dataclasses.dataclass
class _Step:
    """One time step kept until its episode ends (REINFORCE needs the whole episode's return)."""

    obs: spaces.NetObs
    action: np.ndarray
    reward: float
    logits: np.ndarray
    version: int


class ActingPolicy(Protocol):
    """Who runs mu for an explorer: `ModelPolicy` (its own copy of the network, in its process)
    or a client of an inference server (`impala.runtime.inference.ServerPolicy`, one process
    acting for all explorers). Observations are as the explorer keeps them
    (`ObsSpec.to_network`); N rows, N at most the explorer's environments."""

    action_spec: distributions.ActionSpec
    recurrent: bool
    version: int
    """The version of the weights of the last answer (after `refresh`: of the weights held)."""

    def refresh(self) -> None:
        """Takes the newest weights (the explorer calls it where mu is to be refreshed)."""
        ...

    def initial_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A recurrent network's start state `(h, c)`, each `[n, core_size]` float32."""
        ...

    def logits(self, obs: spaces.NetObs) -> np.ndarray:
        """A feed-forward network's policy parameters `[N, P]` (float32)."""
        ...

    def values(self, obs: spaces.NetObs) -> np.ndarray:
        """A feed-forward network's values `[N]` (`[N, K]` with K tasks), float32."""
        ...

    def core_step(
        self,
        obs: spaces.NetObs,
        prev_action: np.ndarray,
        prev_reward: np.ndarray,
        first: np.ndarray,
        state: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
        """One step of a recurrent network: policy parameters `[N, P]`, values `[N]` (`[N, K]`;
        numpy float32) and the next state (float32 tensors `[N, core_size]`)."""
        ...


class ModelPolicy:
    """mu in the explorer's process: a copy of the network refreshed from the parameter store.
    Feed-forward networks that can act in numpy do (`impala.nets.mlp.NumpyMLP`); torch networks
    act under bf16 autocast with `bf16` (`--explorer-precision`): the behaviour policy mu is then
    the bf16 network's, which is what the unroll records."""

    def __init__(self, model: nn.Module, store: ParameterStore, bf16: bool = False) -> None:
        self.model, self.store = model, store
        self.action_spec: distributions.ActionSpec = model.action_spec
        self.recurrent = bool(getattr(model, "is_recurrent", False))
        self.version = -1
        self.numpy = None if self.recurrent else _numpy_net(model)
        self.bf16 = bf16 and self.numpy is None

    def refresh(self) -> None:
        version = self.store.load_into(self.model, self.version)
        if version is not None:
            self.version = version

    def initial_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.initial_state(n)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast with `bf16`; otherwise nothing to enter on the per-step path."""
        if self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logits(self, obs: spaces.NetObs) -> np.ndarray:
        if self.numpy is not None:
            return self.numpy.policy_logits(obs)
        with self._autocast():
            return self.model.policy_logits(spaces.as_tensors(obs)).float().numpy()

    def values(self, obs: spaces.NetObs) -> np.ndarray:
        if self.numpy is not None:
            return self.numpy.values(obs)
        with self._autocast():
            return self.model(spaces.as_tensors(obs))[1].float().numpy()

    def core_step(self, obs, prev_action, prev_reward, first, state):
        with self._autocast():
            logits, values, (h, c) = self.model.unroll(
                spaces.map_obs(lambda part: part[None], spaces.as_tensors(obs)),
                torch.from_numpy(prev_action)[None],
                torch.from_numpy(prev_reward)[None],
                torch.from_numpy(first)[None],
                state,
            )
        return logits[0].float().numpy(), values[0].float().numpy(), (h.float(), c.float())


class Explorer:
    """Steps `vec_env` with mu and fills unrolls.

    `fill(out)` fills one unroll into `out`, a dict of arrays laid out by `rollout_spec`
    (time-major `[T(+1), E, ...]`), and returns an `UnrollInfo`. With `algo="vtrace"` the unroll is
    the last T steps of every environment (episodes may end inside it); with
    `algo="reinforce"` it holds T x E steps of finished episodes, each with its discounted return.
    """

    def __init__(
        self,
        index: int,
        vec_env: VectorEnv,
        model: nn.Module,
        store: ParameterStore,
        *,
        unroll_length: int,
        gamma: float,
        algo: str = "vtrace",
        sync: str = "unroll",
        seed: int = 0,
        step_printer: Callable[[str], None] | None = None,
        reward_clip: float | None = None,
        episodic_life: bool = False,
        greedy: bool = False,
        record_actions: bool = False,
        task: int | None = None,
        bf16: bool = False,
        policy: ActingPolicy | None = None,
    ) -> None:
        self.index = index
        self.task = task  # its task in a multi-task run (the network has a value per task)
        self.vec_env = vec_env
        self.model = model
        self.store = store
        self.unroll_length = unroll_length
        self.gamma = gamma
        self.algo = algo
        self.sync = sync
        self.reward_clip = reward_clip
        self.episodic_life = episodic_life
        self.greedy = greedy  # evaluation: the most probable action instead of a sample
        self.num_envs = vec_env.num_envs
        # Who runs mu: this process (`ModelPolicy`, the default) or an inference server
        # (`impala.runtime.inference`); the explorer's logic is the same with either.
        self.policy: ActingPolicy = policy or ModelPolicy(model, store, bf16)
        # What the policy's output means and how actions are sampled (impala.distributions).
        self.action_spec: distributions.ActionSpec = self.policy.action_spec
        self.rng = np.random.default_rng(seed)
        self.version = -1
        # Every action since the reset below, if asked (the serial runtime's exact resume: the
        # environments' state is rebuilt by replaying them, see `state`).
        self.actions_made: list[np.ndarray] | None = [] if record_actions else None
        # The observation's parts (impala.envs.spaces): how the network takes them (images
        # [C, H, W], channels-last in memory; a dict by part name for Dict and Tuple spaces).
        self.obs_spec = spaces.describe(vec_env.single_observation_space)
        obs, infos = vec_env.reset(seed=seed)
        self.obs = self._laid_out(obs)
        # The seed prototype's per-step line (step, state, action, next state, terminal), on
        # request: the env's own "state" info where it has one (the corridor), else observations.
        self.step_printer = step_printer
        self._states = infos.get("state", self.obs)
        self.steps_made = 0
        # Called at every environment step: a runtime's sign that this explorer is not hung.
        self.heartbeat: Callable[[], None] | None = None
        self.episode_return = np.zeros(self.num_envs, dtype=np.float64)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)
        self._open_episodes: list[list[_Step]] = [[] for _ in range(self.num_envs)]
        self._finished_steps: deque[tuple[_Step, float]] = deque()
        self._finished_episodes: deque[tuple[float, int, int]] = deque()  # return, length, env
        self._lives = infos.get("lives")
        self.recurrent = self.policy.recurrent
        if self.recurrent:
            # The inputs of the next step: the state, the last action and (learning) reward, and
            # whether the next observation starts an episode (the state is reset before it).
            self.core_state = self.policy.initial_state(self.num_envs)
            self.prev_action = self._no_actions(self.num_envs)
            self.prev_reward = np.zeros(self.num_envs, dtype=np.float32)
            self.first = np.ones(self.num_envs, dtype=bool)
        self.refresh()

    @property
    def _numpy(self) -> Any:
        """The numpy forward pass mu acts with in this process, if any (`ModelPolicy`)."""
        return getattr(self.policy, "numpy", None)

    def refresh(self) -> None:
        """Copies pi into mu if the store holds a newer version (an inference server refreshes
        its own: then this only reads the version it last acted with)."""
        self.policy.refresh()
        self.version = self.policy.version

    def _laid_out(self, obs: Any) -> spaces.NetObs:
        """Observations from the environments as this explorer keeps them: as the network takes
        them (`ObsSpec.to_network`): images `[E, C, H, W]` laid out channels-last, reordered once
        here (or not at all, for `[H, W, C]` pixels) for both the network, which computes in
        that layout, and the unroll, which stores frames-last (`impala.agent.buffer`), so that
        neither reorders them again (torch's reordering of uint8 frames measured twice as fast
        as numpy's)."""
        return self.obs_spec.to_network(obs)

    def _write_obs(self, out: dict[str, np.ndarray], index: Any, obs: spaces.NetObs) -> None:
        """Writes observations into the unroll's fields at `index` (images frames-last: a plain
        copy of the channels-last frames)."""
        for key, value in self.obs_spec.stored(obs).items():
            out[key][index] = value

    def _no_actions(self, *shape: int) -> np.ndarray:
        """Zero actions of this action space, `[*shape, *action_shape]`."""
        spec = self.action_spec
        dtype = np.float32 if spec.kind == "box" else np.int64
        return np.zeros((*shape, *spec.action_shape), dtype=dtype)

    def _core_step(self, obs: np.ndarray, prev_action, prev_reward, first, state):
        """One step of the recurrent network: policy parameters `[N, P]`, values `[N]` (numpy,
        float32), the next state (float32 tensors)."""
        logits, values, state = self.policy.core_step(obs, prev_action, prev_reward, first, state)
        self.version = self.policy.version
        return logits, values, state

    def _act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples an action per environment from mu (in numpy, see `impala.distributions`):
        the actions `[E, *action_shape]` and mu's policy parameters `[E, P]`."""
        if self.recurrent:
            logits, _, self.core_state = self._core_step(
                obs, self.prev_action, self.prev_reward, self.first, self.core_state
            )
        else:
            logits = self.policy.logits(obs)
            self.version = self.policy.version  # the weights these logits came from
        if self.greedy:
            return distributions.mode(self.action_spec, logits), logits
        return distributions.sample(self.action_spec, logits, self.rng), logits

    def _values(self, obs: np.ndarray, envs: np.ndarray, actions, rewards) -> np.ndarray:
        """V_mu of the last observations `obs` of the episodes in environments `envs`."""
        if not self.recurrent:
            values = self.policy.values(obs)
        else:
            h, c = self.core_state  # after the step that led to `obs`
            first = np.zeros(len(envs), dtype=bool)
            policy = self.policy
            _, values, _ = policy.core_step(
                obs, actions[envs], rewards[envs], first, (h[envs], c[envs])
            )
        if self.task is not None:  # a multi-task network: the value of this explorer's task
            values = values[:, self.task]
        return values.astype(np.float64)

    def _step(self) -> tuple[Any, ...]:
        """One step of every environment; returns what an unroll records about it: the learning
        reward and ends of episodes (see the module doc)."""
        if self.heartbeat is not None:
            self.heartbeat()
        obs = self.obs
        actions, logits = self._act(obs)
        env_actions = self.action_spec.to_env(actions)  # a Box's clipped to its bounds
        next_obs, rewards, terminated, truncated, infos = self.vec_env.step(env_actions)
        if self.actions_made is not None:
            self.actions_made.append(np.asarray(env_actions))
        done = terminated | truncated  # the game's episode: reported, and reset by the env
        learn_rewards = np.asarray(rewards, dtype=np.float32)
        if self.reward_clip is not None:
            learn_rewards = np.clip(learn_rewards, -self.reward_clip, self.reward_clip)
        learn_terminated = terminated
        lives = infos.get("lives")
        if self.episodic_life and lives is not None and self._lives is not None:
            learn_terminated = terminated | ((np.asarray(lives) < self._lives) & ~done)
        self._lives = lives
        # A truncated (not terminated) episode is bootstrapped from the value of its own last
        # observation; `next_obs` already holds the next episode's first observation.
        truncation_value = np.zeros(self.num_envs, dtype=np.float64)
        cut = truncated & ~learn_terminated
        if cut.any():
            envs = np.flatnonzero(cut)
            final_obs = self.obs_spec.batch_of([infos["final_obs"][i] for i in envs])
            truncation_value[cut] = self._values(
                self._laid_out(final_obs), envs, actions, learn_rewards
            )
        learn_done = learn_terminated | truncated
        if self.recurrent:
            self.prev_action = np.asarray(actions, dtype=self.prev_action.dtype)
            self.prev_reward = learn_rewards
            self.first = learn_done
        self.steps_made += self.num_envs
        if self.step_printer is not None:
            self._print_steps(actions, next_obs, done, infos)
        self.episode_return += rewards
        self.episode_length += 1
        if done.any():
            for i in np.flatnonzero(done).tolist():
                self._finished_episodes.append(
                    (float(self.episode_return[i]), int(self.episode_length[i]), i)
                )
            self.episode_return[done] = 0.0
            self.episode_length[done] = 0
        self.obs = self._laid_out(next_obs)
        return obs, actions, logits, learn_rewards, learn_terminated, learn_done, truncation_value

    # --- checkpoints (the serial runtime) ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What rebuilds this explorer exactly, between two unrolls: the actions made since the
        environments' seeded reset (replayed by `restore`; environments need not be
        serialisable), the sampling generator, mu and the recurrent inputs. Needs
        `record_actions`; REINFORCE's partly collected episodes are not kept (ValueError)."""
        if self.actions_made is None:
            raise ValueError("explorer state needs record_actions=True")
        if any(self._open_episodes) or self._finished_steps:
            raise ValueError("REINFORCE explorers keep collected episodes that are not saved")
        actions = (
            np.stack(self.actions_made) if self.actions_made else self._no_actions(0, self.num_envs)
        )
        state: dict[str, Any] = {
            "actions": torch.from_numpy(actions),
            "obs": spaces.map_obs(lambda part: torch.from_numpy(np.array(part)), self.obs),
            "rng": checkpoint.numpy_rng_state(self.rng),
            "version": self.version,
            "mu": {k: v.clone() for k, v in self.model.state_dict().items()},
            "steps_made": self.steps_made,
        }
        if self.recurrent:
            state.update(
                core_h=self.core_state[0].clone(),
                core_c=self.core_state[1].clone(),
                prev_action=torch.from_numpy(self.prev_action.copy()),
                prev_reward=torch.from_numpy(self.prev_reward.copy()),
                first=torch.from_numpy(self.first.copy()),
            )
        return state

    def restore(self, state: dict[str, Any]) -> bool:
        """Takes a freshly built explorer (same seed, same environments) to `state`: replays the
        recorded actions through the environments and sets the rest. Returns whether the
        environments came out where they were (False for an environment that is not
        deterministic under its seed)."""
        actions = state["actions"].numpy()
        for row in actions:
            next_obs, rewards, terminated, truncated, infos = self.vec_env.step(row)
            done = terminated | truncated
            self.episode_return += rewards
            self.episode_length += 1
            self.episode_return[done] = 0.0
            self.episode_length[done] = 0
            self._lives = infos.get("lives")
            self._states = infos.get("state", next_obs)
            self.obs = self._laid_out(next_obs)
        if self.actions_made is not None:
            self.actions_made = list(actions)
        checkpoint.set_numpy_rng_state(self.rng, state["rng"])
        self.model.load_state_dict(state["mu"])
        self.version = int(state["version"])
        self.policy.version = self.version  # the policy's copy is `self.model`, just loaded
        self.steps_made = int(state["steps_made"])
        if self.recurrent:
            self.core_state = (state["core_h"].clone(), state["core_c"].clone())
            self.prev_action = state["prev_action"].numpy().copy()
            self.prev_reward = state["prev_reward"].numpy().copy()
            self.first = state["first"].numpy().copy()
        return spaces.equal(self.obs, spaces.map_obs(lambda part: part.numpy(), state["obs"]))

    def play(self) -> list[tuple[float, int, int]]:
        """One step of every environment (no unroll is recorded): the episodes it finished, as
        (unclipped return, length, environment index)."""
        self._step()
        finished = list(self._finished_episodes)
        self._finished_episodes.clear()
        return finished

    def _print_steps(self, actions, next_obs, done, infos) -> None:
        states = infos.get("state", next_obs)
        final = infos.get("final_info", {})
        for i in range(self.num_envs):
            next_state = _row(states, i)
            if done[i]:
                next_state = _row(final.get("state", infos.get("final_obs", states)), i)
            self.step_printer(
                f"explorer {self.index} env {i} step {self.steps_made - self.num_envs + i + 1} "
                f"state {_row(self._states, i)} action {actions[i]} next state {next_state} "
                f"terminal {bool(done[i])}"
            )
        self._states = states

    def _after_step(self, done: np.ndarray) -> None:
        if self.sync == "episode" and done.any():
            self.refresh()

    @torch.inference_mode()  # once per unroll: mu is never trained here
    def fill(self, out: dict[str, np.ndarray]) -> UnrollInfo:
        """Fills one unroll into `out` and reports the steps made and episodes finished."""
        if self.sync == "unroll":
            self.refresh()
        if self.algo == "reinforce":
            steps = self._fill_finished_episodes(out)
        else:
            steps = self._fill_unroll(out)
        returns, lengths = [], []
        while self._finished_episodes:
            ret, length, _ = self._finished_episodes.popleft()
            returns.append(ret)
            lengths.append(length)
        return UnrollInfo(self.index, steps, returns, lengths, self.version, self.task or 0)

    def _record_core_inputs(self, out: dict[str, np.ndarray], t: int) -> None:
        out["prev_action"][t] = self.prev_action
        out["prev_reward"][t] = self.prev_reward
        out["first"][t] = self.first

    def _fill_unroll(self, out: dict[str, np.ndarray]) -> int:
        if "task" in out:
            out["task"][...] = self.task
        if self.recurrent:
            out["core_h"][...] = self.core_state[0].numpy()
            out["core_c"][...] = self.core_state[1].numpy()
        for t in range(self.unroll_length):
            if self.recurrent:
                self._record_core_inputs(out, t)
            obs, actions, logits, rewards, _terminated, done, trunc_value = self._step()
            self._write_obs(out, t, obs)
            out["action"][t] = actions
            out["behaviour_logits"][t] = logits
            out["reward"][t] = rewards
            out["discount"][t] = self.gamma * (1.0 - done)
            out["truncation_value"][t] = trunc_value
            out["policy_version"][t] = self.version
            self._after_step(done)
        self._write_obs(out, self.unroll_length, self.obs)
        if self.recurrent:
            self._record_core_inputs(out, self.unroll_length)
        return self.unroll_length * self.num_envs

    def _fill_finished_episodes(self, out: dict[str, np.ndarray]) -> int:
        """REINFORCE: T x E steps of finished episodes, each with its discounted return G_t."""
        need = self.unroll_length * self.num_envs
        steps = 0
        while len(self._finished_steps) < need:
            obs, actions, logits, rewards, terminated, done, trunc_value = self._step()
            steps += self.num_envs
            for i in range(self.num_envs):
                self._open_episodes[i].append(
                    _Step(
                        spaces.map_obs(lambda part, i=i: part[i], obs),
                        actions[i],
                        float(rewards[i]),
                        logits[i],
                        self.version,
                    )
                )
                if done[i]:
                    self._close_episode(i, bootstrap=0.0 if terminated[i] else trunc_value[i])
            self._after_step(done)
        for k in range(need):
            t, e = divmod(k, self.num_envs)
            step, ret = self._finished_steps.popleft()
            self._write_obs(out, (t, e), step.obs)
            out["action"][t, e] = step.action
            out["behaviour_logits"][t, e] = step.logits
            out["reward"][t, e] = step.reward
            out["mc_return"][t, e] = ret
            out["policy_version"][t, e] = step.version
        return steps

    def _close_episode(self, env_index: int, bootstrap: float) -> None:
        episode = self._open_episodes[env_index]
        self._open_episodes[env_index] = []
        ret = bootstrap
        returns = []
        for step in reversed(episode):
            ret = step.reward + self.gamma * ret
            returns.append(ret)
        self._finished_steps.extend(zip(episode, reversed(returns), strict=False))


def _row(batch: Any, i: int) -> Any:
    """Environment `i`'s entry of a batch (an array, or a dict or tuple of them)."""
    if isinstance(batch, dict):
        return {k: _row(v, i) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_row(v, i) for v in batch)
    return batch[i]


def _numpy_net(model: nn.Module) -> Any:
    """`model`'s numpy forward pass, if it has one. numpy's BLAS is then held to one thread in
    this process: explorers already take a core each, and OpenBLAS would otherwise start a thread
    per core for the larger products (64 environments x 64 units and up)."""
    make = getattr(model, "numpy_net", None)
    net = make() if make is not None else None
    if net is not None:
        threadpoolctl.threadpool_limits(1, user_api="blas")
    return net
