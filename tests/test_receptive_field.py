"""Receptive fields: analytic composition vs. the empirical gradient support vs. hand values."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vizlearn
from vizlearn.receptive_field import Field, crop_patch, receptive_field, receptive_fields, unit_box


# ---------------------------------------------------------------- oracles written for the tests
def compose_chain(layers):
    """Hand composition over a list of (kernel, stride, padding, dilation) per dim: (size, jump, lo)."""
    size, jump, lo = [1, 1], [1, 1], [0, 0]
    for k, s, p, d in layers:
        for i in range(2):
            size[i] += d[i] * (k[i] - 1) * jump[i]
            lo[i] -= p[i] * jump[i]
            jump[i] *= s[i]
    return Field(tuple(size), tuple(jump), tuple(lo[i] + (size[i] - 1) / 2 for i in range(2)))


def linearised(model):
    """Explicit linear copy for the oracle: weights 1, no bias, ReLU removed, max-pool -> avg-pool."""
    m = copy.deepcopy(model).double()
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, (nn.ReLU, nn.ReLU6)):
                setattr(mod, cname, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                assert child.dilation == 1
                setattr(mod, cname, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                 ceil_mode=child.ceil_mode))
            elif isinstance(child, nn.Conv2d):
                child.weight.data.fill_(1.0)
                if child.bias is not None:
                    child.bias.data.zero_()
    return m


def gradient_support(model, layer_index, hw, unit):
    """(y0, x0, y1, x1) half-open bbox of the nonzero input gradient of one unit (all channels)."""
    x = torch.ones(1, model[0].in_channels, *hw, dtype=torch.float64, requires_grad=True)
    out = model[:layer_index + 1](x)
    out[0, :, unit[0], unit[1]].sum().backward()
    nz = (x.grad[0] != 0).any(0)
    rows = torch.nonzero(nz.any(1)).flatten()
    cols = torch.nonzero(nz.any(0)).flatten()
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def issue5_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=1, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, dilation=2, padding=2), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
    ).eval()


# ---------------------------------------------------------------- issue 5, case 11
def test_issue5_case11_analytic_equals_gradient_support_all_units():
    net = issue5_net()
    hand = compose_chain([((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 2), (2, 2), (0, 0), (1, 1)),
                          ((3, 3), (1, 1), (2, 2), (2, 2)), ((3, 3), (2, 2), (1, 1), (1, 1))])
    assert hand == Field((16, 16), (4, 4), (0.5, 0.5))  # by hand: 3 -> 4 -> 12 -> 16; jump 1,2,2,4; lo -7
    f = receptive_field(net, "5", input_size=16)
    assert f == hand
    assert receptive_field(net, "5", input_size=16, method="empirical") == hand
    lin = linearised(net)
    # every unit of the 4x4 map: the clipped box is exactly the gradient support on the 16x16 input
    for i in range(4):
        for j in range(4):
            assert unit_box(f, (i, j), (16, 16)) == gradient_support(lin, 5, (16, 16), (i, j))
    # unclipped: on a big input the interior unit's support has the full field size
    y0, x0, y1, x1 = gradient_support(lin, 5, (64, 64), (8, 8))
    assert (y1 - y0, x1 - x0) == f.size
    assert (y0 + (f.size[0] - 1) / 2, x0 + (f.size[1] - 1) / 2) == (f.start[0] + 8 * 4, f.start[1] + 8 * 4)


def test_issue5_case11_border_boxes_clipped_and_patches_padded():
    net = issue5_net()
    f = receptive_field(net, "5", input_size=16)
    assert unit_box(f, (0, 0), (16, 16)) == (0, 0, 9, 9)  # raw box (-7, -7, 9, 9)
    assert unit_box(f, (3, 3), (16, 16)) == (5, 5, 16, 16)  # raw box (5, 5, 21, 21)
    assert unit_box(f, (0, 3), (16, 16)) == (0, 5, 9, 16)
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 3)).astype(np.float32)
    for i in range(4):
        for j in range(4):
            p = crop_patch(img, f, (i, j))
            assert p.shape == (16, 16, 3)  # constant size everywhere
            y0 = -7 + 4 * i
            x0 = -7 + 4 * j
            rows = np.arange(y0, y0 + 16)
            cols = np.arange(x0, x0 + 16)
            outside = ~(((rows >= 0) & (rows < 16))[:, None] & ((cols >= 0) & (cols < 16))[None, :])
            # the NaN region is exactly the out-of-image part, for every channel
            assert np.array_equal(np.isnan(p).all(-1), outside)
            assert np.array_equal(np.isnan(p).any(-1), outside)
            b = unit_box(f, (i, j), (16, 16))
            assert np.array_equal(p[~outside].reshape(b[2] - b[0], b[3] - b[1], 3), img[b[0]:b[2], b[1]:b[3]])
    # a visible constant fill, and a grey 2-D image
    p = crop_patch(img[..., 0], f, (0, 0), fill=0.5)
    assert p.shape == (16, 16) and np.all(p[:7] == 0.5) and not np.isnan(p).any()
    # integer images become float so that NaN can mark the padding
    p = crop_patch((img * 255).astype(np.uint8), f, (0, 0))
    assert p.dtype == np.float32 and np.isnan(p[0, 0, 0])


# ---------------------------------------------------------------- other chains
CHAINS = [
    # (modules, per-layer (k, s, p, d) for the hand composition, input size)
    (lambda: [nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.AvgPool2d(3, 2, padding=1),
              nn.Conv2d(4, 4, 3, dilation=3)],
     [((5, 5), (2, 2), (2, 2), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 3), (1, 1), (0, 0), (3, 3))], 64),
    (lambda: [nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(1, 2)), nn.ReLU(),
              nn.MaxPool2d((2, 3), stride=(2, 1)), nn.Conv2d(4, 4, (1, 3), dilation=(1, 2))],
     [((3, 5), (1, 2), (1, 2), (1, 1)), ((2, 3), (2, 1), (0, 0), (1, 1)), ((1, 3), (1, 1), (0, 0), (1, 2))], 48),
    (lambda: [nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), nn.ReLU6(),
              nn.Conv2d(4, 4, 3, stride=3, padding=1), nn.MaxPool2d(2, dilation=2)],
     [((3, 3), (1, 1), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 3), (3, 3), (1, 1), (1, 1)),
      ((2, 2), (2, 2), (0, 0), (2, 2))], 61),
]


@pytest.mark.parametrize("chain", range(len(CHAINS)))
def test_chain_analytic_equals_hand_and_empirical(chain):
    make, geometry, size = CHAINS[chain]
    torch.manual_seed(chain)
    net = nn.Sequential(*make()).eval()
    last = str(len(net) - 1)
    hand = compose_chain(geometry)
    assert receptive_field(net, last, input_size=size) == hand
    assert receptive_field(net, last, input_size=size, method="empirical") == hand


class Branchy(nn.Module):
    """Two branches of different field sizes, added and concatenated, then a strided conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.a = nn.Conv2d(4, 4, 5, padding=2)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, dilation=1))
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # TF-style asymmetric padding
        self.down = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.a(x) + x  # residual with a 5x5 branch
        z = torch.cat([self.b(x), y], dim=1)
        return self.down(self.pad(z))


def test_branching_net_union_of_branches():
    torch.manual_seed(0)
    net = Branchy().eval()
    fs = receptive_fields(net, ["stem", "a", "b", "down"], input_size=32)
    # stem: 3, jump 2, lo -1. a: 3 + 4*2 = 11, lo -1 - 2*2 = -5; b: two 3x3 -> 3 + 2*2 + 2*2 = 11, lo -5
    assert fs["stem"] == Field((3, 3), (2, 2), (0.0, 0.0))
    assert fs["a"] == Field((11, 11), (2, 2), (0.0, 0.0))
    assert fs["b"] == Field((11, 11), (2, 2), (0.0, 0.0))
    # down: union = 11 (lo -5), ZeroPad top 0, conv3 s2 p0: 11 + 2*2 = 15, jump 4, lo -5 -> start 2
    assert fs["down"] == Field((15, 15), (4, 4), (2.0, 2.0))
    for key, f in fs.items():
        assert receptive_field(net, key, input_size=32, method="empirical") == f


class Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.interpolate(self.c1(x), scale_factor=2.0))


def test_unknown_op_falls_back_to_empirical():
    net = Upsampler().eval()
    with pytest.raises(ValueError, match="method='empirical'"):
        receptive_field(net, "c2", input_size=32, method="analytic")
    auto = receptive_field(net, "c2", input_size=32)
    assert auto == receptive_field(net, "c2", input_size=32, method="empirical")
    assert receptive_field(net, "c1", input_size=32) == Field((3, 3), (2, 2), (0.0, 0.0))


class TinySE(nn.Module):
    """conv -> squeeze-and-excitation gate -> conv: every unit after the gate sees the whole image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.gate = nn.Sigmoid()
        self.out = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        x = x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))
        return self.out(x)


def test_global_fields_se_gate_and_global_pool():
    net = TinySE().eval()
    whole = Field((20, 24), (20, 24), (9.5, 11.5))
    assert receptive_field(net, "conv", input_size=(20, 24)) == Field((3, 3), (1, 1), (0.0, 0.0))
    assert receptive_field(net, "out", input_size=(20, 24)) == whole
    assert receptive_field(net, "out", input_size=(20, 24), method="empirical") == whole
    assert receptive_field(net, "out", input_size=(20, 24), ignore_global=True) == Field((5, 5), (1, 1), (0.0, 0.0))
    assert unit_box(whole, (0, 0), (20, 24)) == (0, 0, 20, 24)


# ---------------------------------------------------------------- real architectures (random weights)
def test_resnet18_theoretical_values():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18()
    m.train()
    flags = [x.training for x in m.modules()]
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    fs = receptive_fields(m, ["conv1", "maxpool", "layer1", "layer1.0.relu:1", "layer2", "layer3", "layer4",
                              "avgpool"])
    # composition by hand: conv1 7/2 p3; maxpool 3/2 p1 -> 11, jump 4; layer1: 4 3x3 convs at jump 4 -> 43;
    # layer2: 43 + 2*4 + 3*2*8 = 99 (jump 8); layer3: 99 + 2*8 + 3*2*16 = 211; layer4: 211 + 32 + 192 = 435
    assert fs["conv1"] == Field((7, 7), (2, 2), (0.0, 0.0))
    assert fs["maxpool"] == Field((11, 11), (4, 4), (0.0, 0.0))
    assert fs["layer1"] == Field((43, 43), (4, 4), (0.0, 0.0))
    assert fs["layer1.0.relu:1"] == Field((27, 27), (4, 4), (0.0, 0.0))  # after the block's second conv
    assert fs["layer2"] == Field((99, 99), (8, 8), (0.0, 0.0))
    assert fs["layer3"] == Field((211, 211), (16, 16), (0.0, 0.0))
    assert fs["layer4"] == Field((435, 435), (32, 32), (0.0, 0.0))
    assert fs["avgpool"] == Field((224, 224), (224, 224), (111.5, 111.5))
    assert receptive_field(m, "layer1", input_size=96, method="empirical") == fs["layer1"]
    assert [x.training for x in m.modules()] == flags
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
    with pytest.raises(ValueError, match="does not output"):
        receptive_field(m, "fc")


def test_efficientnet_lite0_fields():
    timm = pytest.importorskip("timm")
    m = timm.create_model("tf_efficientnet_lite0")
    fs = receptive_fields(m, ["conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "conv_head"])
    # TF "same" padding: stride-2 convs on even sizes pad (0 top, 1 bottom), so unit (0, 0) starts at 0
    assert fs["conv_stem"] == Field((3, 3), (2, 2), (1.0, 1.0))
    assert fs["blocks.0"] == Field((7, 7), (2, 2), (1.0, 1.0))
    assert fs["blocks.1"] == Field((19, 19), (4, 4), (3.0, 3.0))
    assert fs["blocks.2"] == Field((67, 67), (8, 8), (7.0, 7.0))
    assert fs["blocks.3"] == Field((147, 147), (16, 16), (15.0, 15.0))
    assert fs["conv_head"].size == (851, 851) and fs["conv_head"].jump == (32, 32)  # larger than the input
    assert receptive_field(m, "blocks.1", input_size=64, method="empirical") == \
        receptive_field(m, "blocks.1", input_size=64)
    rows = {r.name: r for r in vizlearn.list_layers(m)}
    assert rows["conv_head"].rf_size == (851, 851) and rows["conv_head"].out_shape == (1280, 7, 7)
    assert rows["classifier"].rf_size is None


@pytest.mark.slow
def test_efficientnet_lite0_deep_layer_empirical():
    timm = pytest.importorskip("timm")
    m = timm.create_model("tf_efficientnet_lite0")
    assert receptive_field(m, "blocks.2", input_size=128, method="empirical") == \
        receptive_field(m, "blocks.2", input_size=128)


# ---------------------------------------------------------------- state, bad input
def test_model_untouched_and_no_hooks_left():
    net = issue5_net()
    net[1].inplace = True
    net.train()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    receptive_field(net, "5", input_size=16)
    receptive_field(net, "5", input_size=16, method="empirical")
    assert net.training and net[1].inplace
    assert all(m._forward_hooks == {} and m._forward_pre_hooks == {} for m in net.modules())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())


def test_bad_input():
    net = issue5_net()
    with pytest.raises(ValueError, match="Closest valid names"):
        receptive_field(net, "55")
    with pytest.raises(ValueError, match="method"):
        receptive_field(net, "5", method="exact")
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(net, "5", input_size=(0, 3))
    with pytest.raises(ValueError, match="in_channels"):
        receptive_field(net, "5", in_channels=0)
    with pytest.raises(ValueError, match="failed on a zero input"):
        receptive_field(net, "5", input_size=16, in_channels=1)
    f = receptive_field(net, "5", input_size=16)
    with pytest.raises(ValueError, match="row, col"):
        unit_box(f, (1, 2, 3), (16, 16))
    with pytest.raises(TypeError):
        unit_box((16, 4, 0.5), (0, 0), (16, 16))
    with pytest.raises(ValueError, match="HW or HWC"):
        crop_patch(np.zeros((1, 16, 16, 3)), f, (0, 0))
