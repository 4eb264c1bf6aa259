"""Projection (deconvnet / guided / gradient) against an explicit Zeiler-Fergus deconvnet."""
import copy
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vizlearn import state
from vizlearn.projection import display_projection, project, project_units


# ------------------------------------------------------------------ explicit reference (the oracle)

def reference_deconvnet(net: nn.Sequential, x: torch.Tensor, upto: int, channel: int, pos, method="deconvnet"):
    """The paper's deconvnet on a chain of Conv2d / ReLU / MaxPool2d, written out by hand.

    Forward keeps the pooling switches; going down: unpool with the switches (explicit output
    size), rectify, filter with the transposed weights (no bias), pad what the conv never covered.
    """
    assert x.shape[0] == 1
    inputs, switches = [], {}
    h = x
    for i, m in enumerate(list(net)[: upto + 1]):
        inputs.append(h)
        if isinstance(m, nn.Conv2d):
            h = F.conv2d(h, m.weight, m.bias, m.stride, m.padding, m.dilation)
        elif isinstance(m, nn.ReLU):
            h = torch.clamp(h, min=0)
        elif isinstance(m, nn.MaxPool2d):
            h, idx = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                                  return_indices=True)
            switches[i] = idx
        else:
            raise AssertionError(type(m))
    g = torch.zeros_like(h)
    g[0, channel, pos[0], pos[1]] = h[0, channel, pos[0], pos[1]]
    for i in range(upto, -1, -1):
        m, inp = net[i], inputs[i]
        if isinstance(m, nn.MaxPool2d):
            g = F.max_unpool2d(g, switches[i], m.kernel_size, m.stride, m.padding, output_size=inp.shape[-2:])
        elif isinstance(m, nn.ReLU):
            g = torch.clamp(g, min=0)
            if method == "guided":
                g = g * (inp > 0)
        else:
            g = F.conv_transpose2d(g, m.weight, None, m.stride, m.padding, 0, 1, m.dilation)
            dh, dw = inp.shape[-2] - g.shape[-2], inp.shape[-1] - g.shape[-1]
            assert dh >= 0 and dw >= 0
            g = F.pad(g, (0, dw, 0, dh))  # rows/cols no window reached: zero
    return g


def _argmax(a2d):
    flat = int(torch.argmax(a2d.reshape(-1)))
    return divmod(flat, a2d.shape[-1])


NETS = {
    "plain": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (16, 16)),
    "odd_ceil": (lambda: nn.Sequential(nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(),
                                       nn.MaxPool2d(3, stride=3, ceil_mode=True),
                                       nn.Conv2d(6, 10, 3, padding=1, dilation=2), nn.ReLU(),
                                       nn.MaxPool2d(2, ceil_mode=True)), (23, 29)),
    "stride_pad": (lambda: nn.Sequential(nn.Conv2d(3, 4, 7, stride=3), nn.ReLU(),
                                         nn.MaxPool2d(2, padding=1, ceil_mode=True),
                                         nn.Conv2d(4, 8, 2, stride=2), nn.ReLU(),
                                         nn.Conv2d(8, 8, 1), nn.ReLU()), (31, 26)),
}


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
@pytest.mark.parametrize("name", list(NETS))
def test_equals_explicit_deconvnet(name, method):
    torch.manual_seed(1)
    build, hw = NETS[name]
    net = build().eval()
    x = torch.randn(3, 3, *hw)
    for upto in range(len(net)):
        if isinstance(net[upto], nn.Conv2d) and upto == 0:
            continue
        with torch.no_grad():
            act = net[: upto + 1](x)
        ch = int(torch.argmax(act.amax(dim=(2, 3)).amin(dim=0)))  # a channel alive in every image
        assert (act[:, ch].amax(dim=(1, 2)) > 0).all()
        got = project(net, x, str(upto), ch, method=method)  # argmax positions
        assert got.shape == x.shape
        for i in range(x.shape[0]):
            pos = _argmax(act[i, ch])
            ref = reference_deconvnet(net, x[i:i + 1], upto, ch, pos, method)
            assert torch.allclose(got[i], ref[0], atol=1e-5, rtol=1e-5), (name, upto, i)
        # an explicit position, the same for all images
        pos = (act.shape[2] // 2, act.shape[3] - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # some of these units are dead
            got = project(net, x, str(upto), ch, position=pos, method=method)
        for i in range(x.shape[0]):
            ref = reference_deconvnet(net, x[i:i + 1], upto, ch, pos, method)
            assert torch.allclose(got[i], ref[0], atol=1e-5, rtol=1e-5)


def test_hand_checkable_single_relu():
    # identity conv, ReLU: deconvnet of the single pixel (0,1) -> its own value at that pixel only
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    net = nn.Sequential(conv, nn.ReLU())
    x = torch.tensor([[[[1.0, 3.0], [-1.0, 0.5]]]])
    p = project(net, x, "1", 0)  # argmax at (0, 1): activation 6
    expected = torch.zeros_like(x)
    expected[0, 0, 0, 1] = 12.0  # seed 6, relu(6)=6, transposed conv * 2
    assert torch.equal(p, expected)


def test_gradient_method_is_plain_gradient():
    torch.manual_seed(0)
    net = NETS["plain"][0]().eval()
    x = torch.randn(2, 3, 16, 16)
    got = project(net, x, "4", 3, method="gradient")
    for i in range(2):
        xi = x[i:i + 1].clone().requires_grad_(True)
        a = net[:5](xi)
        pos = _argmax(a[0, 3].detach())
        v = a[0, 3, pos[0], pos[1]]
        (g,) = torch.autograd.grad(v, xi)
        assert torch.allclose(got[i], g[0] * v.detach(), atol=1e-6)


# ------------------------------------------------------------------ functional twin, reuse

class FunctionalTwin(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.c1, self.c2 = seq[0], seq[3]

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        x = self.c2(x).relu()
        return x


class ReusedRelu(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.c1, self.c2 = seq[0], seq[3]
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.max_pool2d(self.relu(self.c1(x)), 2)
        return self.relu(self.c2(x))


@pytest.mark.parametrize("method", ["deconvnet", "guided", "gradient"])
def test_functional_twin_equals_module_model(method):
    torch.manual_seed(2)
    seq = NETS["plain"][0]().eval()
    x = torch.randn(3, 3, 16, 16)
    a = project(seq, x, "4", 5, method=method)
    twin = FunctionalTwin(seq).eval()
    b = project(twin, x, "c2", 5, method=method)  # output of the conv c2: before the functional relu
    a_conv = project(seq, x, "3", 5, method=method)
    assert torch.equal(a_conv, b)
    assert torch.equal(project(twin, x, None, 5, method=method), a)  # model output = after x.relu()
    reused = ReusedRelu(seq).eval()
    c = project(reused, x, "relu:1", 5, method=method)  # second call of the reused ReLU
    assert torch.equal(a, c)
    assert reused.relu.inplace is True


def test_functional_relu_gets_rule_not_gradient():
    torch.manual_seed(2)
    seq = NETS["plain"][0]().eval()
    x = torch.randn(2, 3, 16, 16)
    twin = FunctionalTwin(seq).eval()
    twin_c = project(twin, x, "c2", 1)
    plain = project(twin, x, "c2", 1, method="gradient")
    assert not torch.allclose(twin_c, plain)


def test_inplace_functional_relu_variants():
    torch.manual_seed(3)
    seq = NETS["plain"][0]().eval()

    class InplaceFunctional(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = seq[0], seq[3]
            self.probe = nn.Identity()

        def forward(self, x):
            h = self.c1(x)
            h.relu_()  # result unused on purpose: must act in place
            h = F.max_pool2d(h, 2)
            h = F.relu(self.c2(h), inplace=True)
            return self.probe(h)

    x = torch.randn(2, 3, 16, 16)
    for method in ("deconvnet", "guided"):
        a = project(seq, x, "4", 7, method=method)
        b = project(InplaceFunctional().eval(), x, "probe", 7, method=method)
        assert torch.equal(a, b)


# ------------------------------------------------------------------ batching

def test_batched_equals_one_at_a_time():
    torch.manual_seed(4)
    net = NETS["odd_ceil"][0]().eval()
    x = torch.randn(4, 3, 23, 29)
    rng = np.random.default_rng(0)
    units = [(int(rng.integers(4)), int(rng.integers(10)), (int(rng.integers(2)), int(rng.integers(3))))
             for _ in range(25)]
    units += [(0, 3, None), (0, 4, None), (0, 3, None)]  # same image many times, argmax positions
    for method in ("deconvnet", "guided", "gradient"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # some random units are dead
            batched = project_units(net, x, "4", units, method=method, chunk=3)
            batched_big = project_units(net, x, "4", units, method=method)
            single = torch.cat([project_units(net, x, "4", [u], method=method) for u in units])
        assert batched.shape == (len(units), 3, 23, 29)
        assert torch.allclose(batched, single, rtol=1e-6, atol=1e-7)
        assert torch.allclose(batched_big, single, rtol=1e-6, atol=1e-7)


def test_per_image_channels_and_positions():
    torch.manual_seed(5)
    net = NETS["plain"][0]().eval()
    x = torch.randn(3, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = project(net, x, "4", [1, 2, 3], position=[(0, 0), None, (3, 3)])
    for i, (c, pos) in enumerate([(1, (0, 0)), (2, None), (3, (3, 3))]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = project_units(net, x, "4", [(i, c, pos)])
        assert torch.allclose(p[i], q[0], atol=1e-7)
    with pytest.raises(ValueError, match=r"2 entries for 3 images"):
        project(net, x, "4", [1, 2])
    with pytest.raises(ValueError, match=r"4 entries for 3 images"):
        project(net, x, "4", 1, position=[(0, 0)] * 4)


def test_bad_input():
    net = NETS["plain"][0]().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="method"):
        project(net, x, "4", 0, method="lrp")
    with pytest.raises(ValueError, match="16 channels"):
        project(net, x, "4", 16)
    with pytest.raises(ValueError, match="spatial shape"):
        project(net, x, "4", 0, position=(9, 0))
    with pytest.raises(ValueError, match="out of range"):
        project_units(net, x, "4", [(5, 0, (0, 0))])
    with pytest.raises(ValueError, match="expected"):
        project_units(net, x, "4", [(0, 0)])
    with pytest.raises(ValueError, match="unknown layer"):
        project(net, x, "44", 0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        project(net, x[0], "4", 0)
    with pytest.raises(TypeError):
        project("not a model", x, "4", 0)
    with pytest.raises(ValueError, match="chunk"):
        project_units(net, x, "4", [(0, 0, None)], chunk=0)


# ------------------------------------------------------------------ state untouched

class BNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.r1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.r2 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.r2(self.c2(self.drop(self.r1(self.bn(self.c1(x))))))


def test_state_untouched_and_deterministic():
    torch.manual_seed(6)
    net = BNDrop().train()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    x.grad = torch.full_like(x, 7.0)
    x_before = x.detach().clone()
    p1 = project(net, x, "c2", 2)
    p2 = project(net, x, "c2", 2)
    assert torch.equal(p1, p2)
    assert net.training and net.bn.training and net.drop.training
    assert net.r1.inplace and net.r2.inplace
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert x.requires_grad and torch.equal(x.grad, torch.full_like(x, 7.0)) and torch.equal(x.detach(), x_before)
    y = torch.randn(2, 3, 12, 12)
    project(net, y, "c2", 2)
    assert not y.requires_grad and y.grad is None


def test_no_grad_works_inference_mode_errors():
    torch.manual_seed(7)
    net = NETS["plain"][0]().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = project(net, x, "4", 1)
    with torch.no_grad():
        assert torch.equal(project(net, x, "4", 1), ref)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            project(net, x, "4", 1)


def test_inplace_relu_after_target_layer():  # issue 5, case 3
    torch.manual_seed(8)
    inpl = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 4, 1),
                         nn.ReLU(inplace=True)).eval()
    outp = copy.deepcopy(inpl)
    for m in outp.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 16, 16)
    for layer in ("0", "3", "4", "5"):
        for method in ("deconvnet", "guided", "gradient"):
            assert torch.equal(project(inpl, x, layer, 2, method=method),
                               project(outp, x, layer, 2, method=method))
    assert all(m.inplace for m in inpl.modules() if isinstance(m, nn.ReLU))
    assert [type(m) for m in inpl] == [type(m) for m in outp]


def test_input_without_grad_gives_pixel_results():  # issue 5, case 8
    torch.manual_seed(9)
    net = NETS["plain"][0]().eval()
    x = torch.randn(2, 3, 16, 16)
    assert not x.requires_grad
    p = project(net, x, "5", 0)
    assert p.shape == x.shape and torch.isfinite(p).all() and p.abs().sum() > 0
    assert not x.requires_grad and x.grad is None


# ------------------------------------------------------------------ rectifier kinds

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.a1 = nn.LeakyReLU(0.2)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.a2 = nn.ReLU6()
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.a3 = nn.PReLU(6, init=0.3)
        self.c4 = nn.Conv2d(6, 5, 3, padding=1)
        self.a4 = nn.ReLU()
        self.fc = nn.Linear(5 * 8 * 8, 7)
        self.a5 = nn.ReLU()
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        h = self.a2(self.c2(self.a1(self.c1(x))))
        h = self.a4(self.c4(self.a3(self.c3(h))))
        return self.out(self.a5(self.fc(h.flatten(1))))


def _mixed_reference(m: Mixed, x, method, seed_at):
    """Explicit rules written out: leaky rule for LeakyReLU/PReLU, ReLU6 upper clip ignored."""
    h0 = m.c1(x); h1 = m.a1(h0); h2 = m.c2(h1); h3 = m.a2(h2); h4 = m.c3(h3); h5 = m.a3(h4)
    h6 = m.c4(h5); h7 = m.a4(h6)
    g = torch.zeros_like(h7)
    c, r, s = seed_at
    g[0, c, r, s] = h7[0, c, r, s]

    def rect(g, x_in, slope):
        if method == "deconvnet":
            return torch.where(g > 0, g, g * slope)
        return g.clamp(min=0) * torch.where(x_in > 0, torch.ones_like(g), slope * torch.ones_like(g))

    def convT(g, conv):
        return F.conv_transpose2d(g, conv.weight, None, conv.stride, conv.padding)

    g = convT(rect(g, h6, 0.0), m.c4)
    g = convT(rect(g, h4, m.a3.weight.detach().view(1, -1, 1, 1)), m.c3)
    g = convT(rect(g, h2, 0.0), m.c2)
    g = convT(rect(g, h0, 0.2), m.c1)
    return g, h7


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_mixed_rectifiers(method):  # issue 5, case 9
    torch.manual_seed(10)
    m = Mixed().eval()
    with torch.no_grad():
        m.c2.weight.mul_(40)  # make ReLU6 saturate somewhere
        m.a3.weight.copy_(torch.linspace(0.1, 0.6, 6))
    w_before = m.a3.weight.detach().clone()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert (m.c2(m.a1(m.c1(x))) > 6).any()
    with torch.no_grad():
        _, h7 = _mixed_reference(m, x, method, (0, 0, 0))
    ch = 2
    pos = _argmax(h7[0, ch])
    with torch.no_grad():
        ref, _ = _mixed_reference(m, x, method, (ch, *pos))
    got = project(m, x, "a4", ch, method=method)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(m.a3.weight, w_before) and m.a3.weight.grad is None
    # classifier-side ReLU (2-D output): a logit-like unit
    p = project(m, x, "a5", int(torch.argmax(m.a5(m.fc(h7.flatten(1))))))
    assert p.shape == x.shape and torch.isfinite(p).all() and p.abs().sum() > 0


def test_functional_relu6_hardtanh_leaky():
    torch.manual_seed(11)
    m = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)

    class Func(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3, self.c4 = m.c1, m.c2, m.c3, m.c4
            self.w = m.a3.weight
            self.probe = nn.Identity()

        def forward(self, x):
            h = F.leaky_relu(self.c1(x), 0.2)
            h = F.hardtanh(self.c2(h), 0.0, 6.0) if self.training else F.relu6(self.c2(h))
            h = torch.prelu(self.c3(h), self.w)
            return self.probe(F.relu(self.c4(h)))

    f = Func().eval()
    with torch.no_grad():
        h = m.a4(m.c4(m.a3(m.c3(m.a2(m.c2(m.a1(m.c1(x))))))))
    ch = int(torch.argmax(h.amax(dim=(2, 3)).amin(dim=0)))
    assert (h[:, ch].amax(dim=(1, 2)) > 0).all()
    for method in ("deconvnet", "guided"):
        a = project(m, x, "a4", ch, method=method)
        assert a.abs().sum() > 0
        assert torch.allclose(a, project(f, x, "probe", ch, method=method), atol=1e-7)
    f2 = Func().train()  # hardtanh path (analysis runs in eval mode, so switch branch by hand)
    f2.forward = lambda x: f2.probe(F.relu(f2.c4(torch.prelu(f2.c3(F.hardtanh(f2.c2(F.leaky_relu(f2.c1(x), 0.2)),
                                                                                0.0, 6.0)), f2.w))))
    assert torch.allclose(project(m, x, "a4", ch), project(f2, x, "probe", ch), atol=1e-7)


def test_no_rule_activation_warns_once():
    torch.manual_seed(12)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3),
                      nn.ReLU())
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        p = project(m, x, "5", 0)
    msgs = [str(w.message) for w in rec if "no clean" in str(w.message)]
    assert len(msgs) == 1 and "SiLU" in msgs[0] and "GELU" in msgs[0]
    # documented behaviour: plain gradient through SiLU/GELU, ReLU rule at the top
    xi = x.clone().requires_grad_(True)
    h = m[:5](xi)
    g = torch.zeros_like(h)
    for i in range(2):
        a = torch.relu(h[i, 0]).detach()
        r, c = _argmax(a)
        g[i, 0, r, c] = a[r, c]
    (ref,) = torch.autograd.grad(h, xi, g.clamp(min=0))
    assert torch.allclose(p, ref, atol=1e-6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        project(m, x, "5", 0, method="gradient")
    assert not [w for w in rec if "no clean" in str(w.message)]


def test_dead_filter_zeros_and_warning():  # issue 5, case 10
    torch.manual_seed(13)
    net = NETS["plain"][0]().eval()
    with torch.no_grad():
        net[3].bias[4] = -1e4
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="dead filter"):
        p = project(net, x, "4", 4)
    assert torch.equal(p, torch.zeros_like(p))
    img = display_projection(p[0])
    assert np.isfinite(img).all() and np.allclose(img, 0.5)


# ------------------------------------------------------------------ structured outputs

Pair = namedtuple("Pair", "main aux")


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.split = TupleLayer()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        t = self.split(self.body(x))
        return {"logits": self.head(t.main.mean((2, 3))), "aux": t.aux}


class TupleLayer(nn.Module):
    def forward(self, x):
        return Pair(x * 2, x[:, :1])


def test_structured_outputs_select():  # issue 5, case 7 for projection
    m = TupleModel().eval()
    x = torch.randn(2, 3, 8, 8)
    a = project(m, x, "split", 1, select="main")
    b = project(m, x, "split", 1, select=0)
    c = project(m, x, "split", 1, select=lambda t: t.main)
    assert torch.equal(a, b) and torch.equal(a, c) and a.abs().sum() > 0
    with pytest.raises(TypeError, match=r"Pair\(main, aux\)"):
        project(m, x, "split", 1)
    logit = project(m, x, None, 0, output_select="logits")
    assert logit.shape == x.shape and torch.isfinite(logit).all()
    with pytest.raises(TypeError, match="dict"):
        project(m, x, None, 0)
    with pytest.raises(ValueError, match="output_select"):
        project(m, x, "split", 0, output_select="logits")


# ------------------------------------------------------------------ display

def test_display_projection():
    p = torch.zeros(3, 2, 2)
    p[0, 0, 0] = 4.0
    p[2, 1, 1] = -2.0
    img = display_projection(p)
    assert img.shape == (2, 2, 3) and img.dtype == np.float32
    assert img[0, 0, 0] == 1.0 and img[1, 1, 2] == 0.25 and img[0, 1, 1] == 0.5
    assert np.allclose(display_projection(p[None]), img)
    assert display_projection(torch.ones(1, 4, 5)).shape == (4, 5)
    assert display_projection(torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 3)
    z = display_projection(torch.zeros(3, 4, 4))
    assert np.isfinite(z).all() and np.all(z == 0.5)
    with pytest.raises(ValueError):
        display_projection(torch.zeros(4, 4))


def test_loaded_model_wrapper_accepted():
    net = NETS["plain"][0]().eval()

    class Loaded:  # anything with a .model attribute (vizlearn.LoadedModel)
        model = net

    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(project(Loaded(), x, "4", 0), project(net, x, "4", 0))
