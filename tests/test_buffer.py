import dataclasses

import numpy as np
import pytest
import torch

from impala.agent import ReplayBuffer, ReplayRate, ReplayStaging, rollout_spec, slots_to_batch
from impala.agent.buffer import allocate, as_stored, frames_first, frames_last
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


def _frames(slots, frame_shape=(4, 6, 5)):
    """Distinct uint8 frames `[slots, T+1, E, C, H, W]` (as the explorer sees them)."""
    count = slots * (T + 1) * E * int(np.prod(frame_shape))
    return (torch.arange(count) % 251).to(torch.uint8).view(slots, T + 1, E, *frame_shape)


def _image_spec(frame_shape=(4, 6, 5)):
    env = probe_env("CartPole-v1")
    return rollout_spec(dataclasses.replace(env, obs_shape=frame_shape, obs_dtype=np.uint8), T, E)


@pytest.mark.parametrize("slots", [[1], [2, 0]], ids=["one unroll", "two unrolls"])
@pytest.mark.parametrize("algo", ["vtrace", "reinforce"])
def test_images_are_stored_frames_last_and_batched_frames_first(slots, algo):
    """Frames [C, H, W] sit in the slots as [H, W, C]; a batch gives them back [C, H, W], in the
    channels-last layout the convolutions take, so the learner need not reorder them."""
    spec = _image_spec()
    assert spec["obs"] == ((T + 1, E, 6, 5, 4), torch.uint8)
    storage = allocate(spec, 3)
    frames = _frames(3)
    for slot in range(3):  # what the explorer writes: its frames, frames-last
        storage["obs"][slot].numpy()[...] = frames_last(frames[slot].numpy())
    batch = slots_to_batch(storage, slots, algo)
    if algo == "vtrace":
        want = torch.cat([frames[s] for s in slots], dim=1)  # [T+1, S * E, C, H, W]
        assert torch.equal(batch["obs"], want)
        assert batch["obs"].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    else:
        want = torch.cat([frames[s][:T].flatten(0, 1) for s in slots])  # [S * T * E, C, H, W]
        assert torch.equal(batch["obs"], want)
        assert batch["obs"].is_contiguous(memory_format=torch.channels_last)


def test_replayed_images_come_back_frames_first():
    spec = _image_spec()
    buffer = ReplayBuffer(allocate(spec, 2), torch.tensor([2]), 2)
    frames = _frames(2)
    buffer.storage["obs"].numpy()[...] = frames_last(frames.numpy())
    gen = torch.Generator().manual_seed(0)
    batch = buffer.sample(2 * T, "vtrace", gen)  # two columns [T+1, 2, C, H, W]
    assert batch["obs"].shape == (T + 1, 2, 4, 6, 5)
    columns = {tuple(frames[s, :, e].flatten().tolist()) for s in range(2) for e in range(E)}
    for b in range(2):
        assert tuple(batch["obs"][:, b].flatten().tolist()) in columns
    steps = buffer.sample(8, "reinforce", gen)
    assert steps["obs"].shape == (8, 4, 6, 5)
    every = {tuple(f.flatten().tolist()) for f in frames[:, :T].flatten(0, 2)}
    assert all(tuple(f.flatten().tolist()) in every for f in steps["obs"])


def test_replay_storage_saved_frames_first_goes_back_frames_last():
    """A serial run's checkpoint from before frames were stored frames-last resumes."""
    storage = allocate(_image_spec(), 2)
    frames = _frames(2)  # [S, T+1, E, C, H, W], as an earlier version stored them
    restored = as_stored(frames, storage["obs"])
    assert restored.shape == storage["obs"].shape
    assert torch.equal(frames_first(restored), frames)
    saved = storage["obs"].clone()  # saved frames-last, and other fields: as they are
    assert as_stored(saved, storage["obs"]) is saved
    assert as_stored(storage["reward"], storage["reward"]) is storage["reward"]


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


def _uploaded(buffer, explorer, value):
    local = {
        k: np.zeros((buffer.slots_per_explorer, *v.shape[1:]), v.numpy().dtype)
        for k, v in buffer.storage.items()
    }
    local["reward"][:] = value
    buffer.upload(explorer, local, buffer.slots_per_explorer)


def test_a_restarted_explorer_reclaims_a_slice_its_predecessor_left_half_uploaded():
    """An explorer SIGKILLed in the middle of an upload left its slice marked as being written,
    for ever: the learner skipped it, and with one explorer sampled nothing again while the
    replacement waited for it at the rate limit (hardening issue, item 1). The replacement
    claims the slice at start: emptied (it holds a mix of two uploads) and readable again."""
    buffer = ReplayBuffer.allocate(_spec(), 1, 2)
    _uploaded(buffer, 0, 1.0)
    buffer.seq[0] += 1  # SIGKILLed inside the next upload's copy
    gen = torch.Generator().manual_seed(0)
    assert buffer.num_slots_filled == 2 and buffer.num_readable() == 0
    assert buffer.sample(T, "vtrace", gen) is None
    buffer.claim(0)
    assert buffer.seq[0] % 2 == 0 and buffer.num_slots_filled == 0
    _uploaded(buffer, 0, 2.0)  # the replacement's first upload
    assert set(buffer.sample(T, "vtrace", gen)["reward"].flatten().tolist()) == {2.0}
    before = buffer.seq.clone()
    buffer.claim(0)  # a slice left whole keeps what it holds
    assert torch.equal(buffer.seq, before) and buffer.num_slots_filled == 2


def test_a_sample_that_overlapped_an_upload_is_drawn_again(monkeypatch):
    """The replay's seqlock: a slice an upload began writing while a sample was being drawn
    (after the sample read the counters) invalidates that draw, which is made again; a sample
    that only ever overlaps writes is given up (None)."""
    buffer = ReplayBuffer.allocate(_spec(), 2, 1)
    _uploaded(buffer, 0, 1.0)
    _uploaded(buffer, 1, 2.0)
    real_draw = ReplayBuffer._draw
    draws = []

    def draw_while_explorer_1_writes(self, slots, *args):
        batch = real_draw(self, slots, *args)
        draws.append(slots.tolist())
        if len(draws) == 1:  # explorer 1 starts an upload while we copy: its slice is torn
            self.storage["reward"][1] = 3.0
            self.seq[1] += 1
        return batch

    monkeypatch.setattr(ReplayBuffer, "_draw", draw_while_explorer_1_writes)
    batch = buffer.sample(10 * T, "vtrace", torch.Generator().manual_seed(0))
    assert len(draws) == 2 and draws[0] == [0, 1] and draws[1] == [0]
    assert set(batch["reward"].flatten().tolist()) == {1.0}  # nothing from the torn slice

    def always_overlapped(self, slots, *args):
        self.seq[0] += 2  # a whole upload of explorer 0 during every draw
        return real_draw(self, slots, *args)

    monkeypatch.setattr(ReplayBuffer, "_draw", always_overlapped)
    assert buffer.sample(T, "vtrace", torch.Generator().manual_seed(0)) is None
