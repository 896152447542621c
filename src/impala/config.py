"""The one typed configuration of a training run, and the per-environment presets.

A run's config is resolved once: built-in defaults, then the preset of the chosen environment,
then what the user gave explicitly. Derived values are properties, never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import typing
from typing import Any, Literal

from impala import refs
from impala.envs import CORRIDOR_ID
from impala.envs.atari import AtariProtocol, looks_like_atari
from impala.envs.factory import CARTPOLE_NO_VELOCITY_ID, action_kind, task_ids
from impala.envs.minatar import looks_like_minatar
from impala.envs.minigrid import looks_like_minigrid
from impala.errors import ConfigError

Algo = Literal["vtrace", "reinforce"]
Runtime = Literal["local", "serial", "ray"]
BufferKind = Literal["fifo", "replay"]
Sync = Literal["unroll", "episode"]
Optimizer = Literal["rmsprop", "rmsprop-tf", "adam", "adagrad", "sgd"]
Core = Literal["ff", "lstm"]
Device = Literal["cpu", "cuda", "auto"]
Precision = Literal["auto", "fp32", "bf16"]
Inference = Literal["explorers", "server"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything that defines a training run: the settings of `impala train`, one field per
    option (`learning_rate` is `--learning-rate`). Field docstrings are the CLI's help texts.

    `Config(**settings)` resolves as the command line does: the built-in defaults, then the preset
    of the environment named by `env` (`PRESETS`, see `preset_for`), then the settings given, so
    `Config(env="CartPole-v1", total_steps=100_000)` is the config of
    `impala train --env CartPole-v1 --total-steps 100000`. Given values are type-checked (an int
    is taken for a float) and the whole is validated; bad input raises `ConfigError` with one line
    naming the setting. Derived values are properties, never written back. A Config is frozen:
    change one with `dataclasses.replace(config, seed=1)` (which keeps every other value as it
    is, presets aside).

    Raises:
        ConfigError: an unknown setting, a value of the wrong type or out of range, or settings
            that do not go together.
    """

    # --- task -------------------------------------------------------------------------------
    env: str = CORRIDOR_ID
    """Gymnasium environment id: vector observations, Atari (ALE/Pong-v5, PongNoFrameskip-v4,
    ...; the paper's preprocessing) or MinAtar/Breakout-v1; discrete, multi-discrete or
    continuous actions. Or your own: package.module:make_env, a function (or class) called with
    --env-kwargs that returns a gymnasium.Env, where module:attr names a callable; otherwise
    module:EnvId imports the module, which registers EnvId. Several ids, comma-separated, make a
    multi-task run: one network, explorer i on task i % K, a value output per task, returns
    reported per task."""
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Keyword arguments of the environment, as a JSON object ('{"size": 5}'): passed to an
    environment factory (package.module:make_env), or to gymnasium.make for a registered id."""
    max_steps_per_episode: int | None = None
    """Cap on steps in one episode (seed -m); the episode is truncated, not terminated."""
    sticky_actions: float = 0.0
    """Atari: probability that the emulator repeats the previous action (Machado et al. 2018
    use 0.25; the paper's protocol 0)."""
    full_action_space: bool = False
    """Atari: all 18 actions instead of the game's minimal set."""
    noop_max: int = 30
    """Atari: up to this many no-op actions after a reset (random starts)."""
    reward_clip: float | None = None
    """Rewards are clipped to [-c, c] for learning; returns are reported unclipped."""
    episodic_life: bool = False
    """A lost life ends the episode for learning (not for the reported return; the game goes
    on), for environments that report 'lives'."""
    algo: Algo = "vtrace"
    """'vtrace' (the paper's actor-critic) or 'reinforce' (the seed: Monte Carlo returns)."""
    net: str = "auto"
    """'seed' (two linear layers, the prototype's), 'mlp' (tanh MLP), the paper's 'shallow' or
    'deep' (residual) conv nets, or 'minatar' (small conv net); 'auto' picks by observation:
    mlp without images (vectors, discrete values one-hot, Dict and Tuple of them), shallow for
    Atari-sized images ([C, H, W] or [H, W, C]), minatar for small ones. A Dict or Tuple with
    images gets that conv net per image part, joined with an MLP over the other parts. Or your
    own: package.module:build, a function build(observation_space, action_spec, config,
    **net_kwargs) returning a network that obeys impala.nets.contract (checked at start)."""
    net_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Keyword arguments of your own network's build function, as a JSON object."""
    core: Core = "ff"
    """'ff' (feed-forward) or 'lstm': an LSTM between the torso and the heads, fed the clipped
    last reward and the one-hot last action too (the paper's)."""
    core_size: int = 256
    """Units of the LSTM core."""
    num_hidden: int = 64
    """Hidden units per layer of the network (seed --num-hidden)."""
    num_layers: int = 2
    """Hidden layers of the MLP."""
    # --- explorers --------------------------------------------------------------------------
    runtime: Runtime = "local"
    """'local' (explorer processes, shared memory), 'serial' (one process, deterministic) or
    'ray' (explorers as Ray actors, on a fresh local Ray or the cluster at --ray-address)."""
    ray_address: str | None = None
    """With --runtime ray: the address of an existing cluster (host:port, or 'auto': the one in
    RAY_ADDRESS, which Ray sets for a Ray job's entrypoint); default a fresh one."""
    max_restarts: int = 10
    """Explorer restarts allowed within any --restart-window seconds; one more ends the run with
    the explorer's error (a crash loop), while occasional deaths in a long run are survived."""
    restart_window: float = 60.0
    """The window, in seconds, over which --max-restarts is counted."""
    explorer_timeout: float | None = 60.0
    """Seconds an explorer may go without a sign of progress (an environment step, or a turn of a
    wait for the learner) before it is taken as hung (an environment deadlocked in step()): it
    is killed and started again within --max-restarts, with a line naming it. Its start-up
    (imports, building its environments) may take 120 s or this, the longer. none: no check.
    The job form's explorer tasks apply it to themselves (they exit, to be started again)."""
    num_explorers: int = 2
    """Explorer processes (each owns its environments and a copy mu of the policy); 'auto': one
    per core but one, at least 2 (the presets' 2 were measured on 2 cores)."""
    envs_per_explorer: int = 16
    """Environments each explorer steps together, with one batched policy call per step."""
    inference: Inference = "explorers"
    """Who runs the explorers' policy with the local runtime: 'explorers' (each explorer process
    its own copy, batched over its --envs-per-explorer environments) or 'server' (dynamic
    batching: one inference process holds the policy on the learner's --device, the GPU where
    there is one, and answers all waiting explorers with one forward pass; for many explorers
    and an expensive network with a GPU: on a 2-core CPU it measured slower, see the GPU
    guide). Not with --runtime serial or ray, the job form, --algo reinforce or --sync
    episode."""
    unroll_length: int = 20
    """Time steps T in one unroll (trajectory) sent by an explorer."""
    sync: Sync = "unroll"
    """When an explorer refreshes mu: at every unroll (paper) or at every episode start (seed)."""
    steps_per_explorer: int = 1_000_000
    """Env steps each explorer makes in total (seed -s); total = this x explorers."""
    total_steps: int | None = None
    """Env steps over all explorers; overrides steps_per_explorer when given."""
    # --- buffer -----------------------------------------------------------------------------
    buffer: BufferKind = "fifo"
    """'fifo': a queue of unrolls, each learned from once (paper); 'replay': the seed's
    round-robin global buffer sampled at random."""
    batch_size: int = 32
    """Unroll sequences per learner update (FIFO buffer): whole explorer unrolls, or with fewer
    than --envs-per-explorer, an unroll split into minibatches of this many, one update each."""
    buffer_size: int = 1000
    """Replay: time steps each explorer owns in the global buffer (seed -b)."""
    learn_batch_size: int = 32
    """Replay: time steps sampled at random per learner update (seed --learn-batch-size)."""
    upload_frequency: int = 4
    """Replay: an explorer uploads its local buffer every this many episodes (seed -f)."""
    replay_ratio: float = 0.5
    """Replay: time steps the learner samples per env step the explorers make. A rate limit on
    both sides (the learner waits for new steps, explorers wait for the learner, within one
    buffer's worth), so what is learned does not depend on the machine's speed."""
    # --- learning ---------------------------------------------------------------------------
    learner_threads: int = 1
    """Torch threads of the learner's update (the explorers need the other cores)."""
    explorer_nice: int = 5
    """Niceness (0 to 19) the local runtime's explorer processes add to their own: the learner,
    which sets the pace, gets the CPU when it has a batch, and the explorers take what is left
    (CartPole's throughput on 2 cores, alternating 0 and 5 within one run: 3-5% more)."""
    device: Device = "auto"
    """Where the learner updates: 'cpu', 'cuda' or 'auto' (cuda where torch sees a GPU, else the
    cpu). Explorers act on CPU."""
    precision: Precision = "auto"
    """The learner's arithmetic: 'fp32', 'bf16' (autocast) or 'auto' (bf16 for conv nets on a GPU
    or a CPU with native bf16, AVX-512 and up, where it measured 1.8-4x faster; fp32 elsewhere:
    an AVX2-only CPU emulates bf16, 6x slower)."""
    explorer_precision: Precision = "auto"
    """The explorers' arithmetic when they act with a torch network: 'fp32', 'bf16' (autocast;
    the recorded behaviour policy is the bf16 network's, so V-trace corrects for the difference)
    or 'auto' (bf16 where the learner's 'auto' takes it: conv nets on a CPU with native bf16,
    fp32 elsewhere). A shallow network's 32 Atari frames took 2.07 ms in fp32 and 1.40 ms in
    bf16; MinAtar (8 seeds) and Pong (2 seeds) learned as in fp32 (docs: results/learning)."""
    gamma: float = 0.99
    """Discount (seed -g)."""
    learning_rate: float = 6e-4
    """Learning rate (seed -a)."""
    optimizer: Optimizer = "rmsprop"
    """'rmsprop' (PyTorch's), 'rmsprop-tf' (TensorFlow's, as in the paper: epsilon inside the
    square root, mean square starting at 1; see impala.optim), 'adam', 'adagrad' (seed), 'sgd'."""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """'linear' decays the learning rate to 0 over the run (paper); 'constant' keeps it."""
    rmsprop_alpha: float = 0.99
    """RMSProp decay."""
    optimizer_eps: float = 0.01
    """Epsilon of RMSProp and Adam (a larger one damps steps on tiny, noisy gradients)."""
    rmsprop_momentum: float = 0.0
    """RMSProp momentum."""
    baseline_cost: float = 0.5
    """Weight of the baseline (value) loss."""
    entropy_cost: float = 0.01
    """Weight of the entropy bonus."""
    entropy_schedule: Literal["constant", "linear"] = "constant"
    """'linear' decays the entropy bonus's weight to 0 over the run, as the learning rate's
    'linear' does: a policy kept near-random early to explore may sharpen later; 'constant'
    keeps it."""
    grad_clip: float | None = 40.0
    """Global gradient-norm clip; none for no clipping."""
    loss_reduction: Literal["sum", "mean"] = "sum"
    """How the V-trace loss reduces over time and batch: 'sum' (paper) or 'mean'."""
    clip_rho_threshold: float | None = 1.0
    """V-trace rho-bar; none for no clipping."""
    clip_c_threshold: float | None = 1.0
    """V-trace c-bar; none for no clipping."""
    clip_pg_rho_threshold: float | None = 1.0
    """Clip of the importance weight in the policy gradient; none for no clipping."""
    vtrace_lambda: float = 1.0
    """V-trace lambda (Remark 2)."""
    correction: Literal["vtrace", "none", "epsilon", "is1"] = "vtrace"
    """The off-policy correction (the paper's Table 2): 'vtrace'; 'none' (n-step returns as if
    pi had acted); 'epsilon' ('none' with log(pi + 1e-6) in the policy gradient); 'is1' (1-step
    importance sampling: each step's policy gradient weighted by pi/mu, no traces)."""
    replay_fraction: float = 0.0
    """Share of every learner batch drawn at random from a replay of past unroll sequences (the
    paper's replay experiment: 0.5); the fresh batch is the rest, so a batch of B fresh
    sequences grows to B / (1 - f). 0: no replay."""
    replay_size: int = 10_000
    """Unroll sequences (one environment's T steps each) the learner keeps for
    --replay-fraction, the oldest overwritten first; allocated at the first batch (MinAtar: 84
    MB for 10,000; Atari frames: about 6 GB)."""
    max_policy_lag: int | None = None
    """Unroll sequences acted by a policy more than this many versions behind the learner's are
    dropped as they arrive, before learning (counted as stale_sequences in the metrics; replayed
    sequences are not held to it); none: no limit."""
    loss: Literal["impala", "appo"] = "impala"
    """'impala': the paper's policy gradient; 'appo': the clipped surrogate of PPO against a
    target network refreshed every --appo-target-interval updates, V-trace from the target
    policy (IMPACT, Luo et al. 2020; RLlib's APPO), which bounds how far one update moves pi."""
    appo_clip: float = 0.2
    """APPO: the surrogate's clip, ratios pi/pi_target kept within [1 - c, 1 + c]."""
    appo_target_interval: int = 8
    """APPO: updates between refreshes of the target network (a copy of pi); with
    --appo-target-growth, the most."""
    appo_target_growth: float = 0.0
    """APPO: above 0, the interval grows with training: the largest power of two not above this
    fraction of the updates so far, up to --appo-target-interval (frequent refreshes while the
    policy is young, a tighter trust region later); 0: a fixed interval."""
    appo_passes: int = 1
    """APPO: updates per batch received; passes after the first learn from batches drawn at
    random from a circular buffer of the last --appo-buffer batches."""
    appo_buffer: int = 4
    """APPO: batches kept for the extra passes."""
    value_norm: Literal["none", "popart"] = "none"
    """'popart': the value head learns normalised values, with running statistics of the V-trace
    targets (PopArt, Hessel et al. 2019), so that rewards of any scale learn alike; returns are
    reported unnormalised. 'none': plain values."""
    popart_beta: float = 3e-4
    """PopArt: step size of the targets' running mean and second moment, per update."""
    obs_norm: Literal["off", "on", "auto"] = "off"
    """'on': vector observations are standardised by running statistics of the observations
    learned from (each dimension to zero mean, unit variance, clipped to +-5), kept with the
    weights; each Box part of a Dict or Tuple by its own; 'auto': on where there are such
    vectors (not for images or discrete values)."""
    # --- run --------------------------------------------------------------------------------
    seed: int = 0
    """Random seed (env seeds, network init, action sampling)."""
    max_seconds: float | None = None
    """Stop training after this many seconds of wall time."""
    target_return: float | None = None
    """Stop once the mean return of the last 100 episodes reaches this."""
    log_interval: float = 5.0
    """Seconds between progress lines and metrics records."""
    run_dir: str | None = None
    """Folder for config.json and metrics.jsonl; default runs/<env>-<time>."""
    checkpoint_interval: float | None = 10.0
    """Minutes between checkpoints (RUN_DIR/checkpoints/); one is always written when the run
    ends, however it ends (Ctrl-C and SIGTERM included); none for only that one."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints are kept."""
    tensorboard: bool = True
    """Write every metric as TensorBoard scalars in RUN_DIR/tensorboard/."""
    wandb: bool = False
    """Log the same scalars to Weights & Biases too (needs the wandb package:
    pip install 'impala-rl[wandb]'; WANDB_MODE=offline keeps them on this machine); its files go
    in RUN_DIR/wandb/."""
    wandb_project: str = "impala"
    """With --wandb: the W&B project of the run."""
    wandb_name: str | None = None
    """With --wandb: the W&B run's name; default the run folder's name."""
    wandb_tags: str | None = None
    """With --wandb: tags of the W&B run, comma-separated (e.g. atari,baseline)."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """'bar': a live progress bar (steps, rate, ETA, recent return); 'lines': a progress line per
    --log-interval; 'auto': the bar on a terminal, lines elsewhere (logs, CI). The corridor
    prints the seed's learner line in every case."""
    print_steps: bool = False
    """Explorers print a line per env step (step, state, action, next state, terminal), as the
    seed prototype did."""
    task_index: int = 0
    """Index of this learner task (seed -t); printed in the learner line."""

    def __post_init__(self) -> None:
        # Python callables become references "module:attr" (what other processes, config.json
        # and checkpoints can hold); keyword arguments become plain JSON data.
        object.__setattr__(self, "env", refs.as_reference(self.env, "--env"))
        object.__setattr__(self, "net", refs.as_reference(self.net, "--net"))
        object.__setattr__(self, "env_kwargs", refs.check_kwargs(self.env_kwargs, "--env-kwargs"))
        object.__setattr__(self, "net_kwargs", refs.check_kwargs(self.net_kwargs, "--net-kwargs"))
        _check_types(self)
        _validate(self)

    @property
    def num_tasks(self) -> int:
        """Tasks of the run: 1, or K for a multi-task run of K comma-separated ids (the value
        outputs a network has)."""
        return len(task_ids(self.env))

    @property
    def steps_total(self) -> int:
        """Env steps of the whole run."""
        if self.total_steps is not None:
            return self.total_steps
        return self.steps_per_explorer * self.num_explorers

    @property
    def slots_per_batch(self) -> int:
        """Explorer unrolls (each `envs_per_explorer` sequences wide) in one FIFO batch."""
        return max(1, self.batch_size // self.envs_per_explorer)

    @property
    def replay_slack(self) -> int:
        """Replay: how far (in sampled steps) explorers may run ahead of the learner: one global
        buffer's worth."""
        return self.buffer_size * self.num_explorers

    @property
    def replay_slots_per_explorer(self) -> int:
        """Unroll slots in each explorer's slice of the replay buffer (its `-b` time steps)."""
        return max(1, self.buffer_size // (self.unroll_length * self.envs_per_explorer))

    @property
    def recurrent_state_size(self) -> int | None:
        """The LSTM's units, or None for a feed-forward network (what unrolls must carry)."""
        return self.core_size if self.core == "lstm" else None

    @property
    def atari_protocol(self) -> AtariProtocol:
        """The Atari preprocessing this run asks for (applies to Atari ids only)."""
        return AtariProtocol(
            noop_max=self.noop_max,
            sticky_actions=self.sticky_actions,
            full_action_space=self.full_action_space,
        )

    @property
    def env_options(self) -> dict[str, Any]:
        """Keyword arguments of the environment factories (`impala.envs`)."""
        return dict(
            max_episode_steps=self.max_steps_per_episode,
            atari_protocol=self.atari_protocol,
            env_kwargs=self.env_kwargs,
        )

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        """The settings as a JSON object (what a run's config.json holds), with `extra` entries
        after them; `Config(**json.loads(text))` reads it back when `extra` is empty."""
        return json.dumps({**dataclasses.asdict(self), **(extra or {})}, indent=2)


AUTO_COUNTS = ("num_explorers",)
"""Integer settings that also take 'auto', a count from this machine (`impala.devices`), which
replaces it when the config is made."""

POSITIVE_INTS = (
    "num_hidden",
    "num_layers",
    "num_explorers",
    "envs_per_explorer",
    "unroll_length",
    "steps_per_explorer",
    "batch_size",
    "buffer_size",
    "learn_batch_size",
    "upload_frequency",
    "learner_threads",
    "core_size",
    "keep_checkpoints",
    "appo_target_interval",
    "appo_passes",
    "appo_buffer",
    "replay_size",
)
POSITIVE_OPTIONAL = (
    "total_steps",
    "max_steps_per_episode",
    "max_seconds",
    "checkpoint_interval",
    "explorer_timeout",
)
CHOICES = {
    "algo": ("vtrace", "reinforce"),
    "runtime": ("local", "serial", "ray"),
    "buffer": ("fifo", "replay"),
    "sync": ("unroll", "episode"),
    "optimizer": ("rmsprop", "rmsprop-tf", "adam", "adagrad", "sgd"),
    "lr_schedule": ("constant", "linear"),
    "entropy_schedule": ("constant", "linear"),
    "loss_reduction": ("sum", "mean"),
    "core": ("ff", "lstm"),
    "device": ("cpu", "cuda", "auto"),
    "precision": ("auto", "fp32", "bf16"),
    "explorer_precision": ("auto", "fp32", "bf16"),
    "inference": ("explorers", "server"),
    "progress": ("auto", "bar", "lines"),
    "value_norm": ("none", "popart"),
    "obs_norm": ("off", "on", "auto"),
    "loss": ("impala", "appo"),
    "correction": ("vtrace", "none", "epsilon", "is1"),
}


def _check_types(cfg: Config) -> None:
    """ConfigError naming the field for a value of the wrong type; an int given for a float
    becomes that float (as from the command line and config files)."""
    for name, hint in _field_types().items():
        value = getattr(cfg, name)
        typed = _file_value(name, value, hint, "Config", strict=False)
        if typed is not value:
            object.__setattr__(cfg, name, typed)


def _validate(cfg: Config) -> None:
    for name in POSITIVE_INTS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
    for name in POSITIVE_OPTIONAL:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{_flag(name)} must be positive, got {value!r}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(
                f"{_flag(name)} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}"
            )
    if not _known_net(cfg.net):
        raise ConfigError(
            "--net must be one of auto, seed, mlp, shallow, deep, minatar, a name registered "
            f"with register_net, or a reference package.module:build, got {cfg.net!r}"
        )
    if cfg.net_kwargs and not _custom_net(cfg.net):
        raise ConfigError(
            f"--net-kwargs is for your own network (--net package.module:build); "
            f"the built-in '{cfg.net}' takes its settings from the options"
        )
    if not 0.0 <= cfg.gamma <= 1.0:
        raise ConfigError(f"--gamma must be in [0, 1], got {cfg.gamma!r}")
    if not (isinstance(cfg.explorer_nice, int) and 0 <= cfg.explorer_nice <= 19):
        raise ConfigError(
            f"--explorer-nice must be an integer in [0, 19], got {cfg.explorer_nice!r}"
        )
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be positive, got {cfg.learning_rate!r}")
    if not 0.0 < cfg.popart_beta <= 1.0:
        raise ConfigError(f"--popart-beta must be in (0, 1], got {cfg.popart_beta!r}")
    if cfg.value_norm == "popart" and (cfg.algo != "vtrace" or cfg.net == "seed"):
        raise ConfigError(
            "--value-norm popart needs --algo vtrace and a network with a value head (not seed)"
        )
    if cfg.loss == "appo" and cfg.algo != "vtrace":
        raise ConfigError("--loss appo needs --algo vtrace (its targets are V-trace's)")
    if not 0.0 < cfg.appo_clip < 1.0:
        raise ConfigError(f"--appo-clip must be in (0, 1), got {cfg.appo_clip!r}")
    if not 0.0 <= cfg.appo_target_growth <= 1.0:
        raise ConfigError(f"--appo-target-growth must be in [0, 1], got {cfg.appo_target_growth!r}")
    if not 0.0 <= cfg.replay_fraction < 1.0:
        raise ConfigError(f"--replay-fraction must be in [0, 1), got {cfg.replay_fraction!r}")
    if cfg.max_policy_lag is not None and (
        isinstance(cfg.max_policy_lag, bool)
        or not isinstance(cfg.max_policy_lag, int)
        or cfg.max_policy_lag < 0
    ):
        raise ConfigError(
            f"--max-policy-lag must be a non-negative integer or 'none', got {cfg.max_policy_lag!r}"
        )
    if cfg.correction != "vtrace" and (cfg.algo != "vtrace" or cfg.loss != "impala"):
        raise ConfigError(
            f"--correction {cfg.correction} needs --algo vtrace and --loss impala (REINFORCE has "
            "no correction to choose; APPO's targets are V-trace's)"
        )
    if (cfg.replay_fraction > 0 or cfg.max_policy_lag is not None) and cfg.algo != "vtrace":
        raise ConfigError(
            "--replay-fraction and --max-policy-lag need --algo vtrace (they act on unroll "
            "sequences)"
        )
    if not 0.0 <= cfg.vtrace_lambda <= 1.0:
        raise ConfigError(f"--vtrace-lambda must be in [0, 1], got {cfg.vtrace_lambda!r}")
    for name in ("clip_rho_threshold", "clip_c_threshold", "clip_pg_rho_threshold", "grad_clip"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{_flag(name)} must be positive or 'none', got {value!r}")
    for name in ("baseline_cost", "entropy_cost", "log_interval"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_flag(name)} must not be negative, got {getattr(cfg, name)!r}")
    if cfg.replay_ratio <= 0:
        raise ConfigError(f"--replay-ratio must be positive, got {cfg.replay_ratio!r}")
    if cfg.max_restarts < 0:
        raise ConfigError(f"--max-restarts must not be negative, got {cfg.max_restarts!r}")
    if cfg.restart_window <= 0:
        raise ConfigError(f"--restart-window must be positive, got {cfg.restart_window!r}")
    if cfg.task_index < 0:
        raise ConfigError(f"--task-index must not be negative, got {cfg.task_index!r}")
    if not 0.0 <= cfg.sticky_actions <= 1.0:
        raise ConfigError(f"--sticky-actions must be in [0, 1], got {cfg.sticky_actions!r}")
    if cfg.noop_max < 0:
        raise ConfigError(f"--noop-max must not be negative, got {cfg.noop_max!r}")
    if cfg.reward_clip is not None and cfg.reward_clip <= 0:
        raise ConfigError(f"--reward-clip must be positive or 'none', got {cfg.reward_clip!r}")
    tasks = task_ids(cfg.env)
    if len(tasks) > 1:
        if len(set(tasks)) < len(tasks):
            raise ConfigError(f"--env names a task twice: {cfg.env!r}")
        if cfg.num_explorers < len(tasks):
            raise ConfigError(
                f"a multi-task run of {len(tasks)} tasks needs at least as many explorers (each "
                f"plays one task), got --num-explorers {cfg.num_explorers}"
            )
        if cfg.algo != "vtrace":
            raise ConfigError("a multi-task run needs --algo vtrace (a value output per task)")
    if cfg.inference == "server":
        _check_inference_server(cfg)
    if cfg.core == "lstm" and cfg.net == "seed":
        raise ConfigError("--core lstm needs a network with a torso; the seed network has none")
    if cfg.core == "lstm" and cfg.algo == "reinforce":
        raise ConfigError(
            "--core lstm needs --algo vtrace: REINFORCE learns from single steps, without the "
            "sequence an LSTM state comes from"
        )
    if cfg.buffer == "fifo" and cfg.batch_size % cfg.envs_per_explorer and cfg.batch_size > 1:
        if cfg.batch_size > cfg.envs_per_explorer or (
            cfg.algo == "vtrace" and cfg.envs_per_explorer % cfg.batch_size
        ):
            raise ConfigError(
                f"--batch-size ({cfg.batch_size}) must be a multiple or a divisor of "
                f"--envs-per-explorer ({cfg.envs_per_explorer}): a batch is made of whole "
                "explorer unrolls, or an unroll is split into equal minibatches"
            )


def _check_inference_server(cfg: Config) -> None:
    """What --inference server cannot do: ConfigError, one line."""
    if cfg.runtime != "local":
        raise ConfigError(
            f"--inference server needs --runtime local (its explorer processes send their "
            f"observations to one inference process); --runtime {cfg.runtime} runs the policy in "
            "its explorers: use --inference explorers"
        )
    if cfg.algo != "vtrace":
        raise ConfigError(
            "--inference server needs --algo vtrace: the server acts with the newest weights at "
            "every step, and only V-trace corrects for a policy that changes within an episode"
        )
    if cfg.sync != "unroll":
        raise ConfigError(
            "--inference server refreshes the weights before every batch it serves, so --sync "
            "episode cannot hold; use --sync unroll"
        )


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _custom_net(net: object) -> bool:
    from impala.nets.custom import is_custom

    return isinstance(net, str) and is_custom(net)


def _known_net(net: object) -> bool:
    from impala.nets.factory import NET_NAMES

    return net in NET_NAMES or _custom_net(net)


# Settings that only some algorithms, buffers, optimizers or runtimes read: field -> (setting
# that must hold for it to matter, its values where it does).
_APPLIES_WHEN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "batch_size": ("buffer", ("fifo",)),
    "buffer_size": ("buffer", ("replay",)),
    "learn_batch_size": ("buffer", ("replay",)),
    "upload_frequency": ("buffer", ("replay",)),
    "replay_ratio": ("buffer", ("replay",)),
    "baseline_cost": ("algo", ("vtrace",)),
    "entropy_cost": ("algo", ("vtrace",)),
    "entropy_schedule": ("algo", ("vtrace",)),
    "loss_reduction": ("algo", ("vtrace",)),
    "clip_rho_threshold": ("algo", ("vtrace",)),
    "clip_c_threshold": ("algo", ("vtrace",)),
    "clip_pg_rho_threshold": ("algo", ("vtrace",)),
    "vtrace_lambda": ("algo", ("vtrace",)),
    "correction": ("algo", ("vtrace",)),
    "appo_clip": ("loss", ("appo",)),
    "appo_target_interval": ("loss", ("appo",)),
    "appo_target_growth": ("loss", ("appo",)),
    "appo_passes": ("loss", ("appo",)),
    "appo_buffer": ("loss", ("appo",)),
    "rmsprop_alpha": ("optimizer", ("rmsprop", "rmsprop-tf")),
    "rmsprop_momentum": ("optimizer", ("rmsprop", "rmsprop-tf")),
    "optimizer_eps": ("optimizer", ("rmsprop", "rmsprop-tf", "adam")),
    "ray_address": ("runtime", ("ray",)),
    "max_restarts": ("runtime", ("local", "ray")),
    "core_size": ("core", ("lstm",)),
    "popart_beta": ("value_norm", ("popart",)),
    "restart_window": ("runtime", ("local", "ray")),
    "explorer_timeout": ("runtime", ("local", "ray")),
    "wandb_project": ("wandb", (True,)),
    "wandb_name": ("wandb", (True,)),
    "wandb_tags": ("wandb", (True,)),
}


def inapplicable(cfg: Config, given: set[str]) -> list[str]:
    """One warning per setting the user gave that the run will not read."""
    warnings = []
    for name in sorted(given):
        if name in _APPLIES_WHEN:
            switch, values = _APPLIES_WHEN[name]
            if getattr(cfg, switch) not in values:
                warnings.append(
                    f"{_flag(name)} has no effect with {_flag(switch)} {getattr(cfg, switch)}"
                )
    if "steps_per_explorer" in given and "total_steps" in given:
        warnings.append("--steps-per-explorer has no effect when --total-steps is given")
    depth = replay_depth(cfg)
    if cfg.max_policy_lag is not None and depth is not None and cfg.max_policy_lag < depth:
        warnings.append(
            f"--max-policy-lag {cfg.max_policy_lag} with --buffer replay drops most of what the "
            f"learner samples: the buffer holds about {depth:,} updates' worth of steps "
            f"(--buffer-size {cfg.buffer_size} per explorer, --replay-ratio {cfg.replay_ratio:g}), "
            "so its sequences are up to that many versions old by design; the limit is meant for "
            "--buffer fifo"
        )
    return warnings


def replay_depth(cfg: Config) -> int | None:
    """With the seed's replay buffer, how many learner updates it takes to sample as many steps
    as the buffer holds (its oldest sequences are about that many policy versions old); None
    for the FIFO buffer."""
    if cfg.buffer != "replay":
        return None
    per_update = cfg.learn_batch_size
    if cfg.algo == "vtrace":  # whole sequences (see batch_note)
        per_update = max(1, cfg.learn_batch_size // cfg.unroll_length) * cfg.unroll_length
    return round(cfg.buffer_size * cfg.num_explorers * cfg.replay_ratio / per_update)


def batch_note(cfg: Config) -> str | None:
    """What one update learns from, when that differs from what the batch settings say (batches
    are made of whole unroll columns)."""
    if cfg.buffer == "replay" and cfg.algo == "vtrace":
        sequences = max(1, cfg.learn_batch_size // cfg.unroll_length)
        steps = sequences * cfg.unroll_length
        if steps != cfg.learn_batch_size:
            return (
                f"each update samples {sequences} sequence(s) of {cfg.unroll_length} steps "
                f"({steps} steps; V-trace learns from whole --unroll-length sequences, "
                f"--learn-batch-size {cfg.learn_batch_size} rounded to them)"
            )
    if cfg.buffer == "fifo":
        sequences = cfg.slots_per_batch * cfg.envs_per_explorer
        # V-trace's learner splits a wider unroll into updates of --batch-size sequences
        if sequences != cfg.batch_size and cfg.algo != "vtrace":
            return (
                f"each update learns from {sequences} sequences of {cfg.unroll_length} steps "
                f"(one explorer unroll of --envs-per-explorer {cfg.envs_per_explorer} "
                f"environments; --batch-size {cfg.batch_size} rounded up to it)"
            )
    return None


ATARI = "atari"  # the preset of every Atari id
MINATAR = "minatar"  # the preset of every MinAtar id
MINIGRID = "minigrid"  # the preset of every MiniGrid and BabyAI id
FALLBACK = "fallback"  # the preset of every other id: vector observations, discrete actions
FALLBACK_BOX = "fallback-box"  # ... and of every other id with continuous (Box) actions

# Presets: what a user gets for an environment unless they say otherwise. Why each is what it is
# (the measurements behind every value): docs/reference/presets.md.
PRESETS: dict[str, dict[str, Any]] = {
    CORRIDOR_ID: dict(
        net="seed",
        num_hidden=10,
        max_steps_per_episode=100,
        gamma=0.97,
        learning_rate=1e-3,
        optimizer="rmsprop",
        lr_schedule="linear",
        entropy_cost=0.0,
        num_explorers=1,
        envs_per_explorer=4,
        unroll_length=40,
        sync="episode",
        buffer="replay",
        batch_size=4,
        log_interval=1.0,
        loss_reduction="mean",
        grad_clip=None,
    ),
    "CartPole-v1": dict(
        net="mlp",
        num_hidden=64,
        gamma=0.99,
        learning_rate=2e-3,
        optimizer="adam",
        optimizer_eps=1e-3,
        entropy_cost=0.0,
        num_explorers=2,
        envs_per_explorer=32,
        unroll_length=20,
        batch_size=32,
        total_steps=2_000_000,
        loss_reduction="mean",
        grad_clip=0.5,
        baseline_cost=0.5,
    ),
    # The paper's Atari settings (Espeholt et al. 2018, appendix D and Table G.1).
    ATARI: dict(
        net="shallow",
        reward_clip=1.0,
        episodic_life=True,
        gamma=0.99,
        optimizer="rmsprop-tf",
        learning_rate=6e-4,
        lr_schedule="linear",
        rmsprop_alpha=0.99,
        optimizer_eps=0.01,
        rmsprop_momentum=0.0,
        grad_clip=40.0,
        entropy_cost=0.01,
        baseline_cost=0.5,
        loss_reduction="sum",
        unroll_length=20,
        batch_size=32,
        num_explorers=2,
        envs_per_explorer=32,
        total_steps=50_000_000,
    ),
    # MinAtar: tuned on Breakout.
    MINATAR: dict(
        net="minatar",
        gamma=0.99,
        optimizer="adam",
        learning_rate=2e-3,
        optimizer_eps=1e-5,
        lr_schedule="linear",
        grad_clip=0.5,
        entropy_cost=0.05,
        entropy_schedule="linear",
        baseline_cost=0.5,
        loss_reduction="mean",
        unroll_length=20,
        batch_size=8,
        num_explorers=2,
        envs_per_explorer=32,
        total_steps=10_000_000,
    ),
}


# The memory task (CartPole observing positions only): CartPole's with small batches.
PRESETS[CARTPOLE_NO_VELOCITY_ID] = PRESETS["CartPole-v1"] | dict(
    envs_per_explorer=8, batch_size=8, total_steps=1_000_000, entropy_cost=0.01
)


# The fallback, for every id without a preset of its own or of its family.
PRESETS[FALLBACK] = dict(
    net="auto",
    num_hidden=64,
    gamma=0.999,
    optimizer="adam",
    learning_rate=3e-4,
    optimizer_eps=1e-5,
    lr_schedule="linear",
    grad_clip=0.5,
    entropy_cost=0.001,
    baseline_cost=0.5,
    loss_reduction="mean",
    value_norm="popart",
    popart_beta=1e-3,
    obs_norm="auto",
    loss="appo",
    appo_target_interval=1000,
    unroll_length=20,
    buffer="replay",
    buffer_size=20_000,
    learn_batch_size=160,
    replay_ratio=4.0,
    upload_frequency=1,
    sync="unroll",
    num_explorers=2,
    envs_per_explorer=8,
    total_steps=1_000_000,
)


# The fallback for continuous actions (Box).
PRESETS[FALLBACK_BOX] = PRESETS[FALLBACK] | dict(
    buffer="fifo",
    batch_size=8,
    gamma=0.99,
    vtrace_lambda=0.95,
    learning_rate=1e-3,
    entropy_cost=0.0,
    loss="appo",
    appo_passes=4,
    appo_target_interval=20,
)
# MiniGrid (and BabyAI): sparse rewards; APPO's target refreshed often while the policy is young.
PRESETS[MINIGRID] = PRESETS[FALLBACK] | dict(appo_target_growth=0.1)

# Pendulum-v1: the continuous fallback with gamma 0.95.
PRESETS["Pendulum-v1"] = PRESETS[FALLBACK_BOX] | dict(gamma=0.95)


def preset_for(env_id: str, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset of `env_id`: its own, else its family's (Atari, MinAtar, MiniGrid ids), else the
    fallback of its action space (for several ids, the first one's; an environment factory's
    made with `env_kwargs`)."""
    env_id = task_ids(env_id)[0]  # a multi-task run: its first task's
    if env_id in PRESETS:
        return dict(PRESETS[env_id])
    if looks_like_atari(env_id):
        return dict(PRESETS[ATARI])
    if looks_like_minatar(env_id):
        return dict(PRESETS[MINATAR])
    if looks_like_minigrid(env_id):
        return dict(PRESETS[MINIGRID])
    if action_kind(env_id, json.dumps(env_kwargs or {}, sort_keys=True)) == "box":
        return dict(PRESETS[FALLBACK_BOX])
    return dict(PRESETS[FALLBACK])


def resolve(explicit: dict[str, Any]) -> Config:
    """Builds the run's Config: defaults < the environment's preset < explicit user values
    (what `Config(**explicit)` does).

    Raises ConfigError naming the field for an unknown field or an invalid value.
    """
    return Config(**explicit)


def with_preset(explicit: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a run given `explicit` ones: the preset of their env under them (see
    `Config`); `explicit` as it is when it names every field (a run's config.json, or
    `dataclasses.replace`). ConfigError for an unknown field."""
    hints = _field_types()
    unknown = sorted(set(explicit) - set(hints))
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, hints, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}{hint}")
    if len(explicit) == len(hints):
        return explicit
    explicit = _with_references(explicit)
    env_id = explicit.get("env", Config.env)
    if not isinstance(env_id, str):
        raise ConfigError(f"Config: env must be a string (an environment id), got {env_id!r}")
    preset = preset_for(env_id, explicit.get("env_kwargs"))
    if "steps_per_explorer" in explicit and "total_steps" not in explicit:
        preset.pop("total_steps", None)  # the user's -s is the budget, not the preset's total
    # What a preset adds to V-trace (PopArt's value head, APPO's loss) yields to a user who asks
    # for the seed's REINFORCE or its network, rather than making the request an error.
    if explicit.get("algo", preset.get("algo", Config.algo)) != "vtrace":
        preset.pop("value_norm", None)
        preset.pop("loss", None)
    if explicit.get("net") == "seed":
        preset.pop("value_norm", None)
    if _custom_net(explicit.get("net")):  # PopArt needs a head your network may not have
        preset.pop("value_norm", None)
    if explicit.get("correction", "vtrace") != "vtrace":  # the paper's comparisons: its loss
        preset.pop("loss", None)
    if explicit.get("inference") == "server":  # it refreshes weights at every batch it serves
        preset.pop("sync", None)  # the corridor's (the seed's) per-episode sync yields to it
    merged = {**preset, **explicit}
    if merged.get("num_explorers") == "auto":
        from impala.devices import auto_explorers

        merged["num_explorers"] = auto_explorers()
    return merged


def _field_types() -> dict[str, Any]:
    """Config's field names -> their types (resolved once)."""
    global _FIELD_TYPES
    if _FIELD_TYPES is None:
        hints = typing.get_type_hints(Config)
        _FIELD_TYPES = {f.name: hints[f.name] for f in dataclasses.fields(Config)}
    return _FIELD_TYPES


_FIELD_TYPES: dict[str, Any] | None = None
_init_fields = Config.__init__


@functools.wraps(_init_fields)
def _init_with_preset(self: Config, **settings: Any) -> None:
    _init_fields(self, **with_preset(settings))


Config.__init__ = _init_with_preset  # type: ignore[method-assign]


def _with_references(explicit: dict[str, Any]) -> dict[str, Any]:
    """`explicit` with an environment factory or network given as a Python callable replaced by
    its reference (`impala.refs`), and keyword arguments checked, before presets are chosen."""
    out = dict(explicit)
    for name in ("env", "net"):
        if name in out:
            out[name] = refs.as_reference(out[name], _flag(name))
    if "env_kwargs" in out:
        out["env_kwargs"] = refs.check_kwargs(out["env_kwargs"], "--env-kwargs")
    return out


# --- settings from a file (`--config FILE`) ------------------------------------------------------

RUN_RECORD_KEYS = frozenset({"atari_protocol"})
"""What a run's config.json holds beyond its Config (`impala.agent.factory.run_record`): a config
file may hold these keys; they are not settings and are ignored."""

RESOLVED_KEY = "resolved"
"""What `--print-config` adds to the settings: what their 'auto' values resolve to for the env on
this machine. Not a setting: a config file may hold it, and it is ignored."""

CONFIG_FILE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in the TOML, YAML or JSON file at `path` (by its suffix), type-checked:
    Config field names (or their flag spelling, `learning-rate`) -> values. Integers are taken
    where floats are expected; 'none' (and 'off', or 'inf' for floats) as none, as on the
    command line. The run-record keys (RUN_RECORD_KEYS) and RESOLVED_KEY are ignored, and so
    is "run_dir" when the file is a run's record (named config.json, or holding a run-record
    key): a repeated run needs a folder of its own.

    Raises ConfigError, one line naming the file, for a file that cannot be read or parsed (with
    the parser's line), an unknown key or a value of the wrong type.
    """
    name = os.fspath(path)
    where = f"config file '{name}'"
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in CONFIG_FILE_SUFFIXES:
        raise ConfigError(f"{where}: must end in {', '.join(CONFIG_FILE_SUFFIXES)}")
    try:
        with open(name, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start + 1})") from None
    raw = _parse_config_text(text, suffix, where)
    if raw is None:  # an empty YAML file
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must hold a table of settings, not a {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if str(key) in RUN_RECORD_KEYS or str(key) == RESOLVED_KEY:
            continue
        field = str(key).replace("-", "_")
        if field not in hints:
            unknown.append(str(key))
        elif field in values:
            raise ConfigError(f"{where}: {field} is given twice")
        else:
            values[field] = _file_value(str(key), value, hints[field], where)
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {', '.join(unknown)} (the keys are the names of the "
            "settings, e.g. learning_rate or learning-rate)"
        )
    if os.path.basename(name) == "config.json" or RUN_RECORD_KEYS & set(map(str, raw)):
        values.pop("run_dir", None)  # a run's record: the repeat gets a folder of its own
    return values


def with_config_file(
    explicit: dict[str, Any], path: str | os.PathLike[str]
) -> tuple[dict[str, Any], set[str]]:
    """The settings of a run given the config file at `path`: the file's under `explicit` (the
    command line's; `resolve` puts both over the preset of the env they name), and the names of
    those the user chose, for `inapplicable`: the explicit ones and the file's that differ from
    what the run would have without the file (a run's config.json holds every setting)."""
    from_file = load_config_file(path)
    if "steps_per_explorer" in explicit and "total_steps" not in explicit:
        from_file.pop("total_steps", None)  # the command line's -s is the budget (see resolve)
    merged = {**from_file, **explicit}
    baseline = {  # the fields' own defaults (Config() would add the corridor's preset)
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(Config)
    }
    baseline |= preset_for(merged.get("env", Config.env), merged.get("env_kwargs"))
    chosen = {k for k, v in from_file.items() if k not in baseline or v != baseline[k]}
    return merged, set(explicit) | chosen


_NONE_WORDS = {"int": ("none", "off"), "float": ("none", "off", "inf")}


def _file_value(key: str, value: Any, hint: Any, where: str, *, strict: bool = True) -> Any:
    """`value` as a Config field of type `hint` takes it, or ConfigError naming `key`. Not
    `strict`: a field type this checker does not know takes any value (Config's own check)."""
    options = typing.get_args(hint)
    optional = type(None) in options  # `X | None`
    if optional:
        (hint,) = [option for option in options if option is not type(None)]
        words = _NONE_WORDS.get(getattr(hint, "__name__", ""), ())
        if value is None or (isinstance(value, str) and value.lower() in words):
            return None
        if hint is float and value == math.inf:
            return None  # as 'inf' on the command line: no limit
    if typing.get_origin(hint) is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        wanted = "one of " + ", ".join(typing.get_args(hint))
    elif hint is bool:
        if isinstance(value, bool):
            return value
        wanted = "true or false"
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if value == "auto" and key.replace("-", "_") in AUTO_COUNTS:
            return value
        wanted = "an integer"
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        wanted = "a finite number"
    elif hint is str:
        if isinstance(value, str):
            return value
        wanted = "a string"
    elif typing.get_origin(hint) is dict:  # keyword arguments: a table, mapping or object
        if isinstance(value, dict):
            return refs.check_kwargs(value, f"{where}: {key}")
        wanted = "a table of keyword arguments"
    elif not strict:
        return value
    else:  # a field type this loader does not know yet
        raise ConfigError(f"{where}: {key} cannot be set from a file")
    wanted += " or none" if optional else ""
    raise ConfigError(f"{where}: {key} must be {wanted}, got {value!r}")


def _parse_config_text(text: str, suffix: str, where: str) -> Any:
    """The document in `text` (TOML, YAML or JSON by `suffix`), or ConfigError with the parser's
    message and line."""
    if suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid JSON: {_one_line(exc)}") from None
    if suffix == ".toml":
        import sys

        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: invalid TOML: {_one_line(exc)}") from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or _one_line(exc)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{at}") from None


def _yaml_loader() -> type:
    """PyYAML's SafeLoader, reading 1e-3 as a number as YAML 1.2 does (PyYAML follows YAML 1.1,
    which wants 1.0e-3 and reads 1e-3 as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
