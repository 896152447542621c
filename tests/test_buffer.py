import numpy as np
import torch

from impala.agent import ReplayBuffer, ReplayRate, ReplayStaging, rollout_spec, slots_to_batch
from impala.agent.buffer import allocate
from impala.envs import probe_env

T, E = 5, 3


def _spec():
    return rollout_spec(probe_env("CartPole-v1"), T, E)


def test_slots_to_batch_is_time_major_and_keeps_columns():
    storage = allocate(_spec(), 4)
    for slot in range(4):
        storage["reward"][slot] = torch.arange(T * E, dtype=torch.float32).view(T, E) + 100 * slot
        storage["obs"][slot] = slot
    batch = slots_to_batch(storage, [2, 0], "vtrace")
    assert batch["obs"].shape == (T + 1, 2 * E, 4)
    assert batch["reward"].shape == (T, 2 * E)
    # column b = slot_index * E + env
    assert torch.equal(batch["reward"][:, :E], storage["reward"][2])
    assert torch.equal(batch["reward"][:, E:], storage["reward"][0])
    assert torch.all(batch["obs"][:, :E] == 2) and torch.all(batch["obs"][:, E:] == 0)
    # a copy: the slots can be reused at once
    storage["reward"][2] = -1
    assert batch["reward"][0, 0] == 200


def test_slots_to_batch_reinforce_flattens_steps():
    storage = allocate(_spec(), 2)
    batch = slots_to_batch(storage, [0, 1], "reinforce")
    assert batch["obs"].shape == (2 * T * E, 4)
    assert batch["mc_return"].shape == (2 * T * E,)


def test_replay_upload_every_f_episodes_and_sampling():
    spec = _spec()
    slots = 2
    buffer = ReplayBuffer(allocate(spec, 2 * slots), torch.zeros(2, dtype=torch.int64), slots)
    staging = ReplayStaging(spec, slots, explorer=1, buffer=buffer, upload_frequency=3)
    gen = torch.Generator().manual_seed(0)
    assert buffer.sample(10, "vtrace", gen) is None
    for k, episodes in enumerate([1, 1]):
        staging.next_slot()["reward"][:] = k + 1
        assert staging.commit(episodes) is False  # fewer than 3 episodes: nothing uploaded
    assert buffer.num_slots_filled == 0
    staging.next_slot()["reward"][:] = 3  # overwrites the oldest local slot (round robin)
    assert staging.commit(1) is True
    assert buffer.num_slots_filled == 2
    assert set(buffer.storage["reward"][2:, 0, 0].tolist()) == {3.0, 2.0}
    assert torch.all(buffer.storage["reward"][:2] == 0)  # explorer 0's slice untouched
    batch = buffer.sample(2 * T, "vtrace", gen)
    assert batch["obs"].shape == (T + 1, 2, 4) and batch["reward"].shape == (T, 2)
    assert set(batch["reward"].flatten().tolist()) <= {2.0, 3.0}
    steps = buffer.sample(32, "reinforce", gen)
    assert steps["obs"].shape == (32, 4) and steps["mc_return"].shape == (32,)


def test_replay_uploads_when_episodes_outlast_the_local_buffer():
    """Episodes longer than the local buffer: it is uploaded once it wraps, so the learner gets
    data (the rate limit would otherwise hold explorers and learner waiting for each other)."""
    spec = _spec()
    slots = 2
    buffer = ReplayBuffer(allocate(spec, 2 * slots), torch.zeros(2, dtype=torch.int64), slots)
    staging = ReplayStaging(spec, slots, explorer=0, buffer=buffer, upload_frequency=4)
    assert [staging.commit(0) for _ in range(3)] == [False, False, True]
    assert buffer.num_slots_filled == 2
    assert [staging.commit(0) for _ in range(3)] == [False, False, True]


def test_replay_sampling_skips_a_slice_whose_upload_never_finished():
    spec = _spec()
    slots = 1
    seq = torch.zeros(2, dtype=torch.int64)
    buffer = ReplayBuffer(allocate(spec, 2 * slots), torch.zeros(2, dtype=torch.int64), slots, seq)
    for explorer, value in ((0, 1.0), (1, 2.0)):
        local = {
            k: np.zeros((slots, *v.shape[1:]), v.numpy().dtype) for k, v in buffer.storage.items()
        }
        local["reward"][:] = value
        buffer.upload(explorer, local, 1)
    assert seq.tolist() == [2, 2]
    seq[0] = 3  # explorer 0 died in the middle of its next upload
    gen = torch.Generator().manual_seed(0)
    batch = buffer.sample(5 * T, "vtrace", gen)
    assert set(batch["reward"].flatten().tolist()) == {2.0}
    seq[1] = 5
    assert buffer.sample(5 * T, "vtrace", gen) is None


def test_replay_rate_limits_the_learner_and_the_explorers():
    spec = _spec()
    buffer = ReplayBuffer(allocate(spec, 2), torch.zeros(1, dtype=torch.int64), 2)
    local = {k: np.zeros((2, *v.shape[1:]), v.numpy().dtype) for k, v in buffer.storage.items()}
    buffer.upload(0, local, 2)
    rate = ReplayRate(0.5, slack=100)
    gen = torch.Generator().manual_seed(0)
    assert rate.sample(buffer, 0, 2 * T, "vtrace", gen) is None  # nothing owed yet
    batches = 0
    while rate.sample(buffer, 100, 2 * T, "vtrace", gen) is not None:
        batches += 1
    assert batches == 5 and rate.sampled == 50  # 0.5 x 100 steps, in batches of 10
    assert rate.explorers_may_act(100)  # owed 0 < 100
    assert rate.explorers_may_act(299)  # owed 99.5
    assert not rate.explorers_may_act(300)  # a buffer's worth behind: explorers wait
    assert rate.explorers_may_act(300, sampled=60)  # as an explorer process sees it
