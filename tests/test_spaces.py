"""Every Gymnasium observation space (impala.envs.spaces, impala.nets.encoders): the parts a
space is described by, the conversion from what environments return to what is stored and what
networks take, the encoders, storage in each part's own dtype (uint8 frames stay uint8 in the
slots and the replay buffer), and whole runs: an [H, W, C] image task (CarRacing) and a Dict task
of a picture, a vector and a Discrete mode that must use all three to learn (DictCues-v0, in
envs_for_tests), on the serial and local runtimes, resumed, evaluated and filmed."""

import io

import envs_for_tests  # noqa: F401  (registers DictCues-v0, TextObservations-v0)
import gymnasium as gym
import numpy as np
import pytest
import torch

from impala import checkpoint
from impala.agent import Learner, ParameterStore, ReplayBuffer, ReplayStaging, rollout_spec
from impala.agent.buffer import allocate, numpy_views
from impala.agent.factory import build_explorer, build_model, settle
from impala.cli import main
from impala.config import resolve
from impala.envs import probe_env, spaces
from impala.errors import ConfigError
from impala.evaluation import evaluate
from impala.nets import build_net, resolve_net
from impala.nets.encoders import FlatEncoder, MultiInputTorso, OneHot
from impala.nets.obsnorm import ObsNorm
from impala.runtime.slots import SlotBoard, SlotQueue
from impala.training import train

DICT_ID = "envs_for_tests:DictCues-v0"
Box, Discrete = gym.spaces.Box, gym.spaces.Discrete


# --- parts -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "space, kind, shape, channels_last",
    [
        (Box(-1, 1, (4,)), "vector", (4,), False),
        (Box(-1, 1, ()), "vector", (), False),
        (Box(-1, 1, (2, 2)), "vector", (2, 2), False),
        (Box(-1, 1, (2, 3, 4, 5)), "vector", (2, 3, 4, 5), False),
        (Box(0, 255, (4, 84, 84), np.uint8), "image", (4, 84, 84), False),  # Atari's stack
        (Box(0, 1, (10, 10, 10), np.uint8), "image", (10, 10, 10), False),  # MinAtar's 10 planes
        (Box(0, 255, (96, 96, 3), np.uint8), "image", (3, 96, 96), True),  # CarRacing's pixels
        (Box(0, 255, (7, 7, 3), np.uint8), "image", (3, 7, 7), True),  # MiniGrid's view
        (Box(0, 1, (2, 2, 3)), "vector", (2, 2, 3), False),  # too small for a 3x3 convolution
        (Discrete(5, start=2), "discrete", (), False),
        (gym.spaces.MultiDiscrete([[3, 2], [4, 5]]), "discrete", (2, 2), False),
        (gym.spaces.MultiBinary((3, 2)), "binary", (3, 2), False),
    ],
)
def test_each_space_is_one_part(space, kind, shape, channels_last):
    spec = spaces.describe(space)
    assert not spec.structured and spec.keys == ("obs",)
    (part,) = spec.parts
    assert (part.name, part.kind, part.shape, part.channels_last) == (
        "",
        kind,
        shape,
        channels_last,
    )
    assert part.dtype == space.dtype
    # what the network receives, per observation, is what network_space says
    net_space = spec.network_space()
    assert net_space.shape == shape and net_space.dtype == space.dtype


def test_discrete_parts_know_their_values():
    part = spaces.describe(Discrete(5, start=2)).parts[0]
    assert (part.sizes, part.starts, part.flat_size) == ((5,), (2,), 5)
    part = spaces.describe(gym.spaces.MultiDiscrete([[3, 2], [4, 5]], start=[[1, 0], [0, -2]]))
    assert part.parts[0].sizes == (3, 2, 4, 5) and part.parts[0].starts == (1, 0, 0, -2)
    assert part.parts[0].flat_size == 14


def test_images_are_scaled_to_about_one():
    assert spaces.describe(Box(0, 255, (3, 8, 8), np.uint8)).parts[0].scale == 1 / 255
    assert spaces.describe(Box(0, 1, (3, 8, 8), np.uint8)).parts[0].scale == 1.0
    assert spaces.describe(Box(-np.inf, np.inf, (3, 8, 8))).parts[0].scale == 1.0


def test_dict_and_tuple_parts_are_named_and_nested_names_joined():
    space = gym.spaces.Dict(
        {
            "robot": gym.spaces.Dict(
                {"camera": Box(0, 255, (16, 16, 3), np.uint8), "pos": Box(-1, 1, (3,))}
            ),
            "task": gym.spaces.Tuple((Discrete(3), gym.spaces.MultiBinary(2))),
        }
    )
    spec = spaces.describe(space)
    assert spec.structured
    assert [p.name for p in spec.parts] == ["robot.camera", "robot.pos", "task.0", "task.1"]
    assert spec.keys == ("obs/robot.camera", "obs/robot.pos", "obs/task.0", "obs/task.1")
    assert [p.name for p in spec.images] == ["robot.camera"]
    assert [p.name for p in spec.vectors] == ["robot.pos"]
    net_space = spec.network_space()  # flat, keyed by part name, images channels-first
    assert list(net_space.spaces) == [p.name for p in spec.parts]
    assert net_space["robot.camera"].shape == (3, 16, 16)
    tuple_spec = spaces.describe(gym.spaces.Tuple((Discrete(2), Discrete(3))))
    assert tuple_spec.structured and [p.name for p in tuple_spec.parts] == ["0", "1"]


@pytest.mark.parametrize(
    "space, words",
    [
        (gym.spaces.Text(5), "has a Text observation space, which no network here takes"),
        (gym.spaces.Graph(Box(-1, 1, (2,)), None), "has a Graph observation space"),
        (gym.spaces.Sequence(Box(-1, 1, (2,))), "has a Sequence observation space"),
        (gym.spaces.Dict({"a": gym.spaces.Text(5)}), "has a Text observation space (part 'a')"),
        (
            gym.spaces.Dict({"a.b": Discrete(2), "a": gym.spaces.Dict({"b": Discrete(2)})}),
            "observation parts named alike once nested names are joined with '.': 'a.b'",
        ),
    ],
)
def test_spaces_no_network_takes_are_one_line(space, words):
    with pytest.raises(ConfigError) as error:
        spaces.describe(space, "SomeEnv-v0")
    line = str(error.value)
    assert "\n" not in line and line.startswith("'SomeEnv-v0' ") and words in line


def test_a_text_observation_env_is_refused_in_one_line(capsys):
    from conftest import run_main

    code, _, err = run_main(capsys, "train", "--env", "envs_for_tests:TextObservations-v0")
    assert code == 2
    assert err.strip().count("\n") == 0 and "has a Text observation space" in err


# --- conversion and storage ------------------------------------------------------------------
def test_hwc_pixels_reach_the_network_channels_first_without_a_copy_and_are_stored_as_given():
    spec = spaces.describe(gym.spaces.Dict({"pixels": Box(0, 255, (6, 5, 3), np.uint8)}))
    pixels = np.arange(4 * 6 * 5 * 3, dtype=np.uint8).reshape(4, 6, 5, 3)  # [E, H, W, C]
    net = spec.to_network({"pixels": pixels})
    assert net["pixels"].shape == (4, 3, 6, 5) and np.shares_memory(net["pixels"], pixels)
    assert torch.from_numpy(net["pixels"]).is_contiguous(memory_format=torch.channels_last)
    stored = spec.stored(net)
    assert list(stored) == ["obs/pixels"] and np.array_equal(stored["obs/pixels"], pixels)


def test_chw_frames_are_laid_out_channels_last_and_stored_frames_last():
    spec = spaces.describe(Box(0, 255, (4, 6, 5), np.uint8))
    frames = np.arange(2 * 4 * 6 * 5, dtype=np.uint8).reshape(2, 4, 6, 5)
    net = spec.to_network(frames)
    assert np.array_equal(net, frames)
    assert torch.from_numpy(net).is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(spec.stored(net)["obs"], frames.transpose(0, 2, 3, 1))


def _dict_cfg(tmp_path=None, **kw):
    settings = dict(
        dict(env=DICT_ID, num_explorers=1, envs_per_explorer=3, unroll_length=5, tensorboard=False),
        **kw,
    )
    if tmp_path is not None:
        settings["run_dir"] = str(tmp_path / "run")
    cfg = resolve(settings)
    env = probe_env(cfg.env, **cfg.env_options)
    return settle(cfg, env), env


def _explorer(cfg, env):
    model = build_model(cfg, env)
    store = ParameterStore(*ParameterStore.allocate(model))
    store.publish(model)
    return build_explorer(cfg, env, 0, store)


def test_dict_unrolls_keep_each_part_in_its_dtype_through_the_shared_slots():
    """The FIFO slot board's storage in shared memory: one field per part, uint8 pictures stay
    uint8 (and frames-last), and the learner's batch gives back what the explorer acted on."""
    cfg, env = _dict_cfg(buffer="fifo", batch_size=3)
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    T1, E = cfg.unroll_length + 1, cfg.envs_per_explorer
    assert spec["obs/picture"] == ((T1, E, 8, 8, 3), torch.uint8)
    assert spec["obs/vector"] == ((T1, E, 2), torch.float32)
    assert spec["obs/mode"] == ((T1, E), torch.int64)
    assert "obs" not in spec
    board = SlotBoard(1, 2)
    storage = allocate(spec, 2, shared=True)
    assert storage["obs/picture"].dtype == torch.uint8 and storage["obs/picture"].is_shared()
    explorer = _explorer(cfg, env)
    acted_on = []
    act = explorer._act
    explorer._act = lambda obs: (acted_on.append(spaces.map_obs(np.copy, obs)), act(obs))[1]
    slot = board.take(0, lambda: True)
    board.begin(slot, 1)
    info = explorer.fill(numpy_views(storage, slot))
    board.commit(0, slot, 1, info.steps)
    batch = SlotQueue(board, storage, "vtrace").take(1)
    obs = spaces.from_batch(batch)
    assert list(obs) == ["mode", "picture", "vector"]  # the space's order (Gymnasium sorts keys)
    assert obs["picture"].dtype == torch.uint8 and obs["picture"].shape == (T1, E, 3, 8, 8)
    assert obs["vector"].dtype == torch.float32 and obs["mode"].dtype == torch.int64
    for t, seen in enumerate(acted_on):
        for name in ("picture", "vector", "mode"):
            assert np.array_equal(obs[name][t].numpy(), seen[name]), (t, name)
    # every picture is half lit: uint8 values 0 and 255, nothing scaled on the way
    assert set(np.unique(obs["picture"].numpy())) == {0, 255}


def test_the_batch_pipeline_slices_and_joins_every_part():
    """Minibatch split and replay mixing (the learner's pipeline) work field by field: each
    part is sliced by sequence, and the replay ring keeps the pictures uint8."""
    from impala.agent.buffer import SequenceReplay, slots_to_batch
    from impala.agent.pipeline import MinibatchSplit, ReplayMixing

    cfg, env = _dict_cfg(buffer="fifo", batch_size=2, envs_per_explorer=4)
    storage = allocate(rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer), 1)
    _explorer(cfg, env).fill(numpy_views(storage, 0))
    batch = slots_to_batch(storage, [0], "vtrace")
    halves = list(MinibatchSplit(2)(batch))
    assert len(halves) == 2
    for i, half in enumerate(halves):
        obs = spaces.from_batch(half)
        assert obs["picture"].shape == (cfg.unroll_length + 1, 2, 3, 8, 8)
        assert torch.equal(obs["picture"], batch["obs/picture"][:, 2 * i : 2 * i + 2])
        assert torch.equal(obs["mode"], batch["obs/mode"][:, 2 * i : 2 * i + 2])
    replay = SequenceReplay(8, 0.5, torch.Generator().manual_seed(0))
    mixing = ReplayMixing(replay)
    list(mixing(halves[0]))
    (mixed,) = mixing(halves[1])
    assert replay.storage["obs/picture"].dtype == torch.uint8
    assert mixed["obs/picture"].shape[1] == 4 and mixed["obs/picture"].dtype == torch.uint8
    assert torch.equal(mixed["obs/vector"][:, :2], halves[1]["obs/vector"])
    assert torch.equal(mixed["obs/picture"][:, 2:], halves[0]["obs/picture"])


def test_dict_unrolls_keep_each_part_in_its_dtype_in_the_replay_buffer():
    cfg, env = _dict_cfg(buffer="replay", learn_batch_size=10, upload_frequency=1)
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    replay = ReplayBuffer.allocate(spec, 1, 2, shared=True)
    assert replay.storage["obs/picture"].dtype == torch.uint8
    staging = ReplayStaging(spec, 2, 0, replay, upload_frequency=1)
    explorer = _explorer(cfg, env)
    for _ in range(3):
        staging.commit(len(explorer.fill(staging.next_slot()).episode_returns) + 1)
    gen = torch.Generator().manual_seed(0)
    for algo, lead in (("vtrace", 2), ("reinforce", 1)):
        obs = spaces.from_batch(replay.sample(10, algo, gen))
        assert obs["picture"].dtype == torch.uint8 and obs["picture"].shape[lead:] == (3, 8, 8)
        assert obs["vector"].dtype == torch.float32 and obs["vector"].shape[lead:] == (2,)
        assert obs["mode"].dtype == torch.int64 and obs["mode"].dim() == lead
        assert set(np.unique(obs["picture"].numpy())) == {0, 255}


# --- encoders ----------------------------------------------------------------------------------
def test_one_hot_codes_each_entry_from_its_start():
    encode = OneHot(sizes=(3, 2), starts=(1, -1))
    values = torch.tensor([[1, -1], [3, 0]])
    assert encode(values).tolist() == [[1, 0, 0, 1, 0], [0, 0, 1, 0, 1]]


def test_flat_encoder_joins_the_parts_in_order_and_standardises_vectors_each_alone():
    spec = spaces.describe(
        gym.spaces.Dict(
            {
                "speed": Box(-10, 10, (2,)),
                "mode": Discrete(3),
                "flags": gym.spaces.MultiBinary(2),
                "grid": Box(-1, 1, (2, 2)),
            }
        )
    )
    encoder = FlatEncoder(spec.parts, obs_norm=True)
    assert [p.name for p in spec.parts] == ["flags", "grid", "mode", "speed"]  # Gymnasium sorts
    assert encoder.num_features == 2 + 4 + 3 + 2
    norms = [m for m in encoder.modules() if isinstance(m, ObsNorm)]
    assert [n.part for n in norms] == ["grid", "speed"]
    obs = {
        "speed": torch.tensor([[3.0, -4.0]]),
        "mode": torch.tensor([2]),
        "flags": torch.tensor([[1, 0]], dtype=torch.int8),
        "grid": torch.tensor([[[0.5, 0.0], [0.0, -0.5]]]),
    }
    norms[1].mean.data[:] = torch.tensor([1.0, -2.0])  # speed's own statistics
    out = encoder(obs)[0]
    assert out[:2].tolist() == [1, 0]
    torch.testing.assert_close(out[2:6], torch.tensor([0.5, 0.0, 0.0, -0.5]))
    assert out[6:9].tolist() == [0, 0, 1]
    torch.testing.assert_close(out[9:], torch.tensor([2.0, -2.0]), atol=1e-4, rtol=0)


def test_the_learner_moves_each_vector_parts_statistics_from_that_part():
    cfg, env = _dict_cfg(buffer="fifo", batch_size=3, obs_norm="on")
    model = build_model(cfg, env)
    (norm,) = [m for m in model.modules() if isinstance(m, ObsNorm)]
    assert norm.part == "vector"
    learner = Learner(cfg, model, ParameterStore(*ParameterStore.allocate(model)))
    explorer = _explorer(cfg, env)
    spec = rollout_spec(env, cfg.unroll_length, cfg.envs_per_explorer)
    storage = allocate(spec, 1)
    explorer.fill(numpy_views(storage, 0))
    from impala.agent.buffer import slots_to_batch

    batch = slots_to_batch(storage, [0], "vtrace")
    learner.update(batch)
    vectors = batch["obs/vector"].reshape(-1, 2).double()
    np.testing.assert_allclose(norm.mean.numpy(), vectors.mean(0).numpy(), rtol=1e-5)
    assert float(norm.count) == len(vectors)


def test_auto_picks_the_network_by_the_parts():
    cfg, env = _dict_cfg()
    assert resolve_net("auto", env) == "minatar" and cfg.obs_norm == "on"  # the fallback: auto
    model = build_model(cfg, env)
    assert isinstance(model.torso, MultiInputTorso)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3
    with pytest.raises(ConfigError, match="network 'mlp' needs a flat vector observation"):
        resolve_net("mlp", env)
    with pytest.raises(ConfigError, match="network 'shallow' needs images of at least 36x36"):
        resolve_net("shallow", env)
    for env_id, net in [("Blackjack-v1", "mlp"), ("FrozenLake-v1", "mlp"), ("CartPole-v1", "mlp")]:
        assert resolve_net("auto", probe_env(env_id)) == net
    blackjack = probe_env("Blackjack-v1")  # a Tuple of three Discrete: one-hot, 32 + 11 + 2
    model = build_net("auto", blackjack, num_hidden=8)
    assert model.encoder.num_features == 45
    logits, values = model(
        spaces.as_tensors({"0": np.array([4, 31]), "1": np.array([1, 10]), "2": np.array([0, 1])})
    )
    assert logits.shape == (2, 2) and values.shape == (2,)


def test_recurrent_network_takes_dict_observations():
    cfg, env = _dict_cfg(core="lstm", core_size=16)
    model = build_model(cfg, env)
    T, B = 3, 2
    sample = env.obs.network_space().sample()
    obs = {k: torch.as_tensor(np.asarray(v)).expand(T, B, *np.shape(v)) for k, v in sample.items()}
    logits, values, state = model.unroll(
        obs,
        torch.zeros(T, B, dtype=torch.int64),
        torch.zeros(T, B),
        torch.zeros(T, B, dtype=torch.bool),
        model.initial_state(B),
    )
    assert logits.shape == (T, B, 2) and values.shape == (T, B) and state[0].shape == (B, 16)


# --- an [H, W, C] image environment --------------------------------------------------------------
def test_carracing_gets_a_conv_net_over_its_3_channels_and_runs(tmp_path):
    """CarRacing-v3 observes 96x96x3 pixels; it used to get the MinAtar net over 96 'channels'."""
    env = probe_env("CarRacing-v3")
    assert env.obs.parts[0].shape == (3, 96, 96) and env.obs.parts[0].channels_last
    assert resolve_net("auto", env) == "shallow"
    cfg = resolve(
        dict(
            env="CarRacing-v3",
            runtime="serial",
            num_explorers=1,
            envs_per_explorer=2,
            unroll_length=10,
            batch_size=2,
            total_steps=100,
            run_dir=str(tmp_path / "run"),
            tensorboard=False,
            log_interval=1000.0,
        )
    )
    first_conv = next(
        m for m in build_model(settle(cfg, env), env).modules() if isinstance(m, torch.nn.Conv2d)
    )
    assert first_conv.in_channels == 3
    result = train(cfg, out=io.StringIO())
    assert result.stop_reason == "step budget" and result.steps >= 100 and result.updates >= 1


# --- a Dict task that needs every part ----------------------------------------------------------
LEARN = dict(
    loss="impala",
    buffer="fifo",
    batch_size=8,
    gamma=0.5,
    learning_rate=2e-3,
    value_norm="none",
    entropy_cost=0.0,
    total_steps=80_000,  # a budget far past the ~9k-20k steps it needs; the target ends it
    target_return=9.5,  # a policy that ignores any part earns at most 7.5, a uniform one 5
    log_interval=1.0,
    tensorboard=False,
)


@pytest.mark.parametrize("runtime", ["serial", "local"])
def test_dict_task_of_a_picture_a_vector_and_a_mode_learns(tmp_path, runtime):
    """Serial: about 9.9 at 9k steps (seed 0), the target reached. The local runtime's explorer
    processes are not deterministic: most runs reach the target too, some settle near 8.5 (seen
    8.49 and 8.62, on this version and the one before), still above the 7.5 that a policy
    ignoring any one part can earn, which is what this test is about."""
    cfg = resolve(dict(LEARN, env=DICT_ID, runtime=runtime, run_dir=str(tmp_path / "run")))
    result = train(cfg, out=io.StringIO())
    if runtime == "serial":
        assert result.return_mean >= 9.0 and result.steps < 80_000, result  # the target
    else:
        assert result.return_mean >= 8.0, result


@pytest.mark.parametrize("settings", [dict(algo="reinforce"), dict(core="lstm", core_size=16)])
def test_dict_task_runs_with_reinforce_and_an_lstm_core(tmp_path, settings):
    """REINFORCE's explorer keeps single steps of every part; the LSTM core unrolls dicts."""
    cfg = resolve(
        dict(
            LEARN,
            env=DICT_ID,
            runtime="serial",
            total_steps=1_000,
            run_dir=str(tmp_path / "run"),
            **settings,
        )
    )
    result = train(cfg, out=io.StringIO())
    assert result.stop_reason == "step budget" and result.updates > 0


def test_dict_task_evaluates_and_films(tmp_path, capfd):
    """`impala eval` and `--video` of a Dict task, recurrent (its exact resume is in
    test_checkpoint.py)."""
    cfg = resolve(
        dict(
            LEARN,
            env=DICT_ID,
            runtime="serial",
            core="lstm",
            core_size=16,
            total_steps=2_000,
            run_dir=str(tmp_path / "run"),
        )
    )
    train(cfg, out=io.StringIO())
    run = tmp_path / "run"
    assert checkpoint.listed(run)
    assert main(["eval", str(run), "--episodes", "4", "--greedy"]) == 0
    out, _ = capfd.readouterr()
    assert out.startswith(f"4 episodes of {DICT_ID} (greedy actions): return mean ")
    video = tmp_path / "cues.mp4"
    figures = evaluate(run, episodes=2, video=video, out=io.StringIO())
    assert figures["video_frames"] == 11  # one episode of 10 steps: 11 pictures
    assert video.stat().st_size > 0
