"""The paper's networks (Fig. 3): shapes and parameter counts worked out from the figure."""

import copy

import pytest
import torch
import torch.nn.functional as F

from impala.nets.conv import InputScaledConv2d, deep_torso, minatar_torso, shallow_torso
from impala.nets.heads import PolicyValueNet


def AtariShallowNet(shape, num_actions):
    return PolicyValueNet(shallow_torso(shape), num_actions)


def AtariDeepNet(shape, num_actions):
    return PolicyValueNet(deep_torso(shape), num_actions)


def MinAtarNet(shape, num_actions):
    return PolicyValueNet(minatar_torso(shape), num_actions)


def _conv(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def _dense(n_in, n_out):
    return n_in * n_out + n_out


def _count(net):
    return sum(p.numel() for p in net.parameters())


A = 6


def test_shallow_net_has_the_papers_layers():
    net = AtariShallowNet((4, 84, 84), A)
    # 84 -(8x8 /4)-> 20 -(4x4 /2)-> 9
    want = _conv(4, 16, 8) + _conv(16, 32, 4) + _dense(32 * 9 * 9, 256) + _dense(256, A) + 257
    assert _count(net) == want


def test_deep_net_has_the_papers_layers():
    net = AtariDeepNet((4, 84, 84), A)
    sections = 0
    for c_in, c in [(4, 16), (16, 32), (32, 32)]:
        sections += _conv(c_in, c, 3) + 4 * _conv(c, c, 3)  # a conv, two blocks of two convs
    # three max-pools of stride 2 with SAME padding: 84 -> 42 -> 21 -> 11
    want = sections + _dense(32 * 11 * 11, 256) + _dense(256, A) + 257
    assert _count(net) == want


def test_minatar_net():
    net = MinAtarNet((4, 10, 10), A)
    assert _count(net) == _conv(4, 16, 3) + _dense(16 * 8 * 8, 128) + _dense(128, A) + 129


@pytest.mark.parametrize(
    "make, shape, dtype",
    [
        (AtariShallowNet, (4, 84, 84), torch.uint8),
        (AtariDeepNet, (4, 84, 84), torch.uint8),
        (MinAtarNet, (7, 10, 10), torch.bool),
    ],
)
def test_image_nets_take_compact_observations(make, shape, dtype):
    torch.manual_seed(0)
    net = make(shape, A)
    obs = torch.randint(0, 256 if dtype == torch.uint8 else 2, (5, *shape)).to(dtype)
    logits, values = net(obs)
    assert logits.shape == (5, A) and values.shape == (5,)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(net.policy_logits(obs), logits)
    (logits.sum() + values.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_deep_net_blocks_are_residual():
    """With a block's second conv zeroed, the block is the identity."""
    net = AtariDeepNet((4, 84, 84), A)
    block = net.torso.convs[0][2]
    torch.nn.init.zeros_(block.conv1.weight)
    torch.nn.init.zeros_(block.conv1.bias)
    x = torch.randn(2, 16, 42, 42)
    torch.testing.assert_close(block(x), x)


def test_auto_precision_takes_bf16_only_where_the_device_computes_it_fast(monkeypatch):
    """On an AVX2-only CPU oneDNN emulates bf16 (a MinAtar update 88 ms against 14 ms in fp32):
    'auto' keeps conv nets in fp32 there, and never puts an MLP in bf16."""
    from impala.agent import learner as learner_mod
    from impala.nets.mlp import MLPNet

    conv = MinAtarNet((4, 10, 10), 3)
    for fast in (True, False):
        monkeypatch.setattr(learner_mod, "bf16_is_fast", lambda device, fast=fast: fast)
        assert learner_mod.uses_bf16("auto", conv) is fast
        assert learner_mod.uses_bf16("auto", MLPNet(4, 2)) is False
        assert learner_mod.uses_bf16("bf16", conv) and not learner_mod.uses_bf16("fp32", conv)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_inputs_are_the_frames_in_the_compute_dtype(bf16, channels_last):
    torso = shallow_torso((4, 36, 36), channels_last=channels_last)
    frames = (torch.arange(3 * 4 * 36 * 36) % 256).to(torch.uint8).reshape(3, 4, 36, 36)
    want = frames.double()  # every uint8 value is exact in float32 and in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = torso.inputs(frames)
    assert got.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(got.double(), want)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    stored = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # frames-last storage
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert torch.equal(torso.inputs(stored).double(), want)


def _shallow_reference(torso, frames):
    """Fig. 3's shallow torso in float64, written out: frames / 255, conv 8x8 /4, ReLU,
    conv 4x4 /2, ReLU, flattened in (C, H, W) order, dense, ReLU."""
    conv0, conv1, dense = torso.convs[0], torso.convs[2], torso.dense[0]
    x = frames.double() / 255
    x = F.relu(F.conv2d(x, conv0.weight.double(), conv0.bias.double(), stride=4))
    x = F.relu(F.conv2d(x, conv1.weight.double(), conv1.bias.double(), stride=2))
    return F.relu(F.linear(x.flatten(1), dense.weight.double(), dense.bias.double()))


@pytest.mark.parametrize("layout", ["nchw", "frames-last"])
def test_the_shallow_torso_computes_the_papers_network(layout):
    """The scaling folded into the first convolution's weights and the last ReLU taken after
    the flattening change nothing but speed: the float32 torso matches a float64 oracle."""
    torch.manual_seed(0)
    torso = shallow_torso((4, 84, 84))
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    if layout == "frames-last":
        frames = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    want = _shallow_reference(torso, frames)
    torch.testing.assert_close(torso(frames).double(), want, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: within bf16's precision
        torch.testing.assert_close(torso(frames).double(), want, rtol=0.05, atol=0.02)


def test_the_deep_torso_scales_its_frames_once():
    """The deep torso against itself in float64 on frames scaled beforehand, with the first
    convolution's own scaling switched off (and no other convolution scaling)."""
    torch.manual_seed(0)
    torso = deep_torso((4, 84, 84))
    scaled = [m for m in torso.modules() if isinstance(m, InputScaledConv2d)]
    assert scaled == [torso.convs[0][0]] and scaled[0].input_scale == 1 / 255
    reference = copy.deepcopy(torso).double()
    reference.convs[0][0].input_scale = 1.0
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    want = reference.dense(reference.convs(frames.double() / 255))  # past the float32 inputs
    torch.testing.assert_close(torso(frames).double(), want, rtol=1e-4, atol=1e-5)


def test_a_large_batch_goes_through_the_convolutions_in_chunks_with_the_same_result(monkeypatch):
    import impala.nets.conv as conv

    torch.manual_seed(0)
    net = AtariShallowNet((4, 84, 84), 6)
    frames = torch.randint(0, 256, (40, 4, 84, 84), dtype=torch.uint8)
    assert net.torso.chunk_frames(frames) == 6 * 2**20 // (4 * 84 * 84 * 4)  # 55 float32 frames
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.torso.chunk_frames(frames) == 111  # bf16 frames are half the bytes
    minatar = MinAtarNet((7, 10, 10), 6)
    assert minatar.torso.chunk_frames(torch.zeros(672, 7, 10, 10)) >= 672  # a batch: one chunk

    def forward_and_grads():
        net.zero_grad()
        logits, values = net(frames)
        (logits.square().sum() + values.sum()).backward()
        return logits.detach(), [p.grad.clone() for p in net.parameters()]

    whole = forward_and_grads()
    calls = []
    real_inputs = net.torso.inputs
    monkeypatch.setattr(net.torso, "inputs", lambda x: calls.append(len(x)) or real_inputs(x))
    monkeypatch.setattr(conv, "CHUNK_BYTES", 16 * 4 * 84 * 84 * 4)  # 16 frames a chunk
    chunked = forward_and_grads()
    assert calls == [16, 16, 8]
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(chunked[1], whole[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
