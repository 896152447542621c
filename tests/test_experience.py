"""The shared experience piece (`impala.agent.experience`): its rules in isolation, and every
runtime making the same number of updates for the same run (they once each wrote the rules
themselves, and the local runtime dropped the learner's replay debt at the end: 874 updates
where the serial runtime made 997)."""

import math

import numpy as np
import pytest
import torch

from impala.agent import ReplayBuffer, rollout_spec
from impala.agent.experience import Experience, ListQueue
from impala.config import resolve
from impala.envs import probe_env
from impala.training import train

T, E = 5, 2


def _spec():
    return rollout_spec(probe_env("CartPole-v1"), T, E)


def _unroll(value=0.0):
    unroll = {
        k: np.zeros(shape, torch.empty(0, dtype=d).numpy().dtype)
        for k, (shape, d) in _spec().items()
    }
    unroll["reward"][:] = value
    return unroll


def test_fifo_batches_are_whole_until_the_explorers_are_done():
    cfg = resolve({"env": "CartPole-v1", "envs_per_explorer": E, "batch_size": 2 * E})
    assert cfg.slots_per_batch == 2
    queue = ListQueue("vtrace")
    experience = Experience(cfg, queue=queue)
    for k in range(5):
        queue.put(_unroll(k))
    assert experience.accepts(0) is False  # two batches' worth wait: explorers hold back
    batch = experience.next_batch(made=0, done=False)
    assert batch["reward"].shape == (T, 2 * E) and batch["reward"][0].tolist() == [0, 0, 1, 1]
    assert experience.accepts(0)
    assert experience.next_batch(made=0, done=False)["reward"][0].tolist() == [2, 2, 3, 3]
    assert experience.next_batch(made=0, done=False) is None  # one unroll: not a batch yet
    assert not experience.exhausted(made=0, done=True)
    last = experience.next_batch(made=0, done=True)  # the explorers are done: a partial batch
    assert last["reward"].shape == (T, E)
    assert experience.exhausted(made=0, done=True) and not experience.exhausted(0, done=False)


def _replay_experience(ratio=2.0):
    cfg = resolve(
        {
            "env": "CartPole-v1",
            "buffer": "replay",
            "unroll_length": T,
            "envs_per_explorer": E,
            "buffer_size": 2 * T * E,
            "learn_batch_size": 2 * T,
            "replay_ratio": ratio,
        }
    )
    replay = ReplayBuffer.allocate(_spec(), 1, cfg.replay_slots_per_explorer)
    return cfg, replay, Experience(cfg, replay=replay, generator=torch.Generator().manual_seed(0))


def test_replay_debt_is_paid_after_the_explorers_are_done():
    _, replay, experience = _replay_experience(ratio=2.0)
    local = {k: np.zeros((2, *v.shape[1:]), v.numpy().dtype) for k, v in replay.storage.items()}
    replay.upload(0, local, 2)
    made = 25  # 2 x 25 = 50 steps owed, 10 a batch
    batches = 0
    while experience.next_batch(made, done=True) is not None:
        batches += 1
        assert not experience.exhausted(made, done=True) or experience.owed(made) <= 0
    assert batches == 5 and experience.sampled == 50 and experience.exhausted(made, done=True)
    assert not experience.exhausted(made + 1, done=True)  # one more step: owed again
    assert not experience.exhausted(made, done=False)


def test_replay_with_nothing_readable_ends_rather_than_waits():
    """Owed samples but nothing that could be sampled (an explorer died mid-upload after making
    its share): the run ends instead of waiting for ever."""
    _, replay, experience = _replay_experience()
    replay.filled[0] = 2
    replay.seq[0] = 1  # left half uploaded
    assert experience.next_batch(100, done=True) is None
    assert experience.exhausted(100, done=True)
    assert experience.accepts(100)  # the learner cannot catch up: explorers must go on


# --- every runtime, the same updates ------------------------------------------------------------

COMMON = dict(env="CartPole-v1", num_explorers=2, envs_per_explorer=4, total_steps=8000)
REPLAY = dict(
    COMMON,
    buffer="replay",
    unroll_length=20,
    buffer_size=800,
    learn_batch_size=80,
    replay_ratio=2.0,
    upload_frequency=1,
)
FIFO = dict(COMMON, buffer="fifo", batch_size=8)


def _run(tmp_path, runtime, settings):
    cfg = resolve(
        {
            **settings,
            "runtime": runtime,
            "run_dir": str(tmp_path / runtime),
            "progress": "lines",
            "tensorboard": False,
            "log_interval": 60.0,
        }
    )
    return cfg, train(cfg)


@pytest.mark.parametrize("runtime", ["serial", "local", "ray"])
def test_every_runtime_learns_its_replay_debt(tmp_path, runtime, capsys):
    cfg, result = _run(tmp_path, runtime, REPLAY)
    assert result.stop_reason == "step budget" and result.steps == 8000
    # 2 explorers x 4,000 steps, each sampled twice on average, 80 steps an update
    assert result.updates == math.ceil(cfg.replay_ratio * result.steps / cfg.learn_batch_size)
    assert result.updates == 200


@pytest.mark.parametrize("runtime", ["serial", "local"])
def test_every_runtime_learns_each_fifo_unroll_once(tmp_path, runtime, capsys):
    cfg, result = _run(tmp_path, runtime, FIFO)
    assert result.stop_reason == "step budget" and result.steps == 8000
    assert result.updates == 8000 // (cfg.unroll_length * cfg.batch_size)  # 50 batches of 2 unrolls
