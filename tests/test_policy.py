"""`impala.load_policy`: a trained policy driven in a plain Gymnasium loop plays what `impala eval`
reports; greedy actions are deterministic; an LSTM policy acts exactly as the explorers do
(state, last action and reward, episode starts); one observation or a batch; bad input."""

import dataclasses
import io

import gymnasium as gym
import numpy as np
import pytest
import torch

import impala
from impala import checkpoint
from impala.agent.explorer import Explorer
from impala.agent.factory import build_model, settle
from impala.agent.params import ParameterStore
from impala.cli import main
from impala.config import resolve
from impala.envs import make_vector_env, probe_env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CartPole run of the serial runtime (trained a little: its greedy episodes differ)."""
    run_dir = tmp_path_factory.mktemp("policy") / "run"
    cfg = impala.Config(
        env="CartPole-v1",
        runtime="serial",
        total_steps=12_000,
        envs_per_explorer=4,
        batch_size=8,
        run_dir=str(run_dir),
    )
    impala.train(cfg, out=io.StringIO())
    return run_dir


def _untrained(env_id, run_dir, seed=0, scale=1.0, **fields):
    """A checkpoint of an untrained network for `env_id` (its weights times `scale`)."""
    cfg = resolve({"env": env_id, "run_dir": str(run_dir), **fields})
    env = probe_env(cfg.env, **cfg.env_options)
    cfg = settle(cfg, env, learner=False)
    torch.manual_seed(seed)
    model = build_model(cfg, env)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    state = {
        "config": dataclasses.asdict(cfg),
        "record": {},
        "model": model.state_dict(),
        "counters": {"steps": 1000, "updates": 0},
    }
    return checkpoint.save(state, run_dir, keep=10), cfg, env, model


def _episode(policy, env, seed, *, greedy):
    """One episode in a plain loop: its return."""
    obs, _ = env.reset(seed=seed)
    state, total = None, 0.0
    while True:
        action, state = policy.act(obs, state, greedy=greedy)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        if terminated or truncated:
            return total


def test_a_plain_gymnasium_loop_gets_the_return_eval_reports(trained, capsys):
    """`impala eval --episodes 3 --greedy --seed 0` plays environments seeded 0, 1, 2; the same
    policy in a loop of the user's own over gymnasium.make's CartPole gets the same returns."""
    policy = impala.load_policy(trained)
    assert policy.device == torch.device("cpu") and not policy.is_recurrent
    env = gym.make("CartPole-v1")
    mine = [_episode(policy, env, seed, greedy=True) for seed in range(3)]
    assert len(set(mine)) > 1  # not all alike: the comparison below means something
    assert main(["eval", str(trained), "--episodes", "3", "--greedy", "--seed", "0"]) == 0
    line = capsys.readouterr().out
    assert f"return mean {np.mean(mine):.2f} +- {np.std(mine):.2f}" in line
    reported = impala.evaluate(trained, episodes=3, greedy=True, seed=0, out=io.StringIO())
    assert sorted(reported.returns) == sorted(mine)
    assert reported.return_mean == pytest.approx(np.mean(mine)) and len(reported.lengths) == 3
    again = impala.evaluate(policy, episodes=3, greedy=True, seed=0, out=io.StringIO())
    assert again == reported  # a loaded Policy plays the same
    final = impala.load_policy(trained / "model.pt")  # the run's final weights, named directly
    assert final.steps is None and final.source == trained / "model.pt"
    # Sampled actions: the same with the same seeds (the environment's and the policy's).
    sampled = impala.load_policy(trained, seed=5)
    assert (
        _episode(sampled, env, 5, greedy=False)
        == impala.evaluate(trained, episodes=1, seed=5, out=io.StringIO()).returns[0]
    )


def test_greedy_actions_are_deterministic_one_or_a_batch(trained):
    policy = impala.load_policy(trained)
    observations = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    batch, state = policy.act(observations, greedy=True)
    assert state is None and batch.shape == (16,) and len(set(batch.tolist())) == 2
    again, _ = impala.load_policy(trained).act(observations, greedy=True)
    assert np.array_equal(batch, again)
    singles = [policy.act(obs, greedy=True)[0] for obs in observations]
    assert all(np.ndim(a) == 0 for a in singles) and np.array_equal(singles, batch)
    assert policy.act(observations[0].tolist(), greedy=True)[0] == batch[0]  # lists too
    sampled = {int(policy.act(observations[0])[0]) for _ in range(50)}
    assert sampled == {0, 1}  # not greedy: sampled from pi


def test_an_lstm_policy_acts_as_the_explorers_do(tmp_path):
    """An explorer (the training's acting) and the policy in a user's loop, same weights and
    seeds, over 300 steps of several episodes: the same actions, step for step. The user's loop
    passes the reward and marks episode starts, as the explorer's vector environment does. The
    weights are scaled up so that the state weighs in the actions (an untrained network's are
    near even: a state or reward fed wrongly would hardly change the sampled ones)."""
    ckpt, cfg, _, model = _untrained("CartPole-v1", tmp_path / "run", scale=4.0, core="lstm")
    seed, steps = 3, 300
    model.requires_grad_(False)
    explorer = Explorer(
        0,
        make_vector_env("CartPole-v1", 1),
        model,
        ParameterStore(*ParameterStore.allocate(model)),
        unroll_length=1,
        gamma=cfg.gamma,
        seed=seed,
        record_actions=True,
    )
    with torch.inference_mode():
        episodes = sum(len(explorer.play()) for _ in range(steps))
    assert episodes >= 5  # the state was reset inside the comparison, several times
    expected = [int(a[0]) for a in explorer.actions_made]

    policy = impala.load_policy(ckpt, seed=seed)
    assert policy.is_recurrent
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    state, reward, start, actions = None, None, None, []
    for _ in range(steps):
        action, state = policy.act(obs, state, reward=reward, episode_start=start)
        actions.append(int(action))
        obs, reward, terminated, truncated, _ = env.step(action)
        start = terminated or truncated
        if start:
            obs, _ = env.reset()
    assert actions == expected
    assert isinstance(state, impala.PolicyState) and state.h.shape == (1, cfg.core_size)


def test_an_lstm_policys_batch_and_state(tmp_path):
    ckpt, *_ = _untrained("CartPole-v1", tmp_path / "run", core="lstm")
    policy = impala.load_policy(ckpt)
    observations = np.zeros((3, 4), np.float32)
    _, state = policy.act(observations, greedy=True)
    assert state.batch_size == 3 and state.prev_action.shape == (3,)
    with pytest.raises(ValueError, match="a state for 3 environment"):
        policy.act(observations[:2], state)
    initial = policy.initial_state(3)
    first, _ = policy.act(observations, initial, greedy=True, episode_start=True)
    fresh, _ = policy.act(observations, None, greedy=True)
    assert np.array_equal(first, fresh)


def test_continuous_actions_come_clipped_to_the_bounds(tmp_path):
    ckpt, *_ = _untrained("Pendulum-v1", tmp_path / "run")
    policy = impala.load_policy(ckpt, seed=0)
    env = policy.make_env()
    obs, _ = env.reset(seed=0)
    actions = np.stack([policy.act(obs)[0] for _ in range(200)])
    assert actions.shape == (200, 1) and env.action_space.contains(actions[0])
    assert actions.min() >= -2.0 and actions.max() <= 2.0


def test_bad_input(trained, tmp_path):
    policy = impala.load_policy(trained)
    with pytest.raises(ValueError, match=r"an observation of shape \(3,\): this policy takes"):
        policy.act(np.zeros(3))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    with pytest.raises(impala.ConfigError, match="is not a checkpoint"):
        impala.load_policy(notes)
    with pytest.raises(impala.ConfigError, match="is not a run folder or a checkpoint"):
        impala.load_policy(tmp_path / "nowhere")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_policy_on_cuda_acts_as_on_the_cpu(tmp_path):
    ckpt, *_ = _untrained("CartPole-v1", tmp_path / "run", scale=4.0, core="lstm")
    observations = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    cpu, gpu = impala.load_policy(ckpt), impala.load_policy(ckpt, device="cuda")
    assert gpu.device.type == "cuda"
    state_cpu = state_gpu = None
    for _ in range(5):
        a, state_cpu = cpu.act(observations, state_cpu, greedy=True, reward=1.0)
        b, state_gpu = gpu.act(observations, state_gpu, greedy=True, reward=1.0)
        assert np.array_equal(a, b)


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt, *_ = _untrained("CartPole-v1", tmp_path / "run")
    with pytest.raises(impala.ConfigError, match="no CUDA device here"):
        impala.load_policy(ckpt, device="cuda")
