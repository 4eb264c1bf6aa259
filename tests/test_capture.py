"""vizlearn.capture: issue 5 cases 1, 2, 4, 6, 7 and layers that never run."""
import gc
import weakref
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vizlearn
from vizlearn.capture import capture, record_calls, run_to_layer


def hook_counts(model):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(getattr(m, "_backward_pre_hooks", {})), len(getattr(m, "_forward_hooks_with_kwargs", {})))
            for name, m in model.named_modules()]


# ---------------------------------------------------------------- case 1
def test_case1_inplace_relu_after_captured_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, model[0].weight, model[0].bias, padding=1).detach()
    assert (expected < 0).any()
    with capture(model, ["0", "1"]) as acts, torch.no_grad():
        out = model(x)
    got = acts["0"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # negatives kept
    assert (got < 0).any()
    assert not got.requires_grad
    assert model[1].inplace  # capture itself does not change flags
    # not aliased: changing the captured tensor leaves the live ones alone and vice versa
    relu_out = acts["1"]
    assert got.data_ptr() != relu_out.data_ptr()
    before = out.clone()
    got.add_(100.0)
    assert torch.equal(out, before)
    # with grad enabled too
    with capture(model, "0") as acts2:
        model(x)
    assert not acts2["0"].requires_grad and (acts2["0"] < 0).any()


# ---------------------------------------------------------------- case 2
def test_case2_relu_used_twice_in_basic_block():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock(4, 4).eval()
    x = torch.randn(2, 4, 8, 8)
    with capture(block, ["relu", "relu:1"]) as acts, torch.no_grad():
        out = block(x)
    assert set(acts) >= {"relu", "relu:1"}
    with torch.no_grad():
        first = F.relu(block.bn1(block.conv1(x)))
    torch.testing.assert_close(acts["relu"], first)
    torch.testing.assert_close(acts["relu:1"], out)
    assert not torch.equal(acts["relu"], acts["relu:1"])
    # asking only for the first call still records the second under its own key, never overwriting
    with capture(block, "relu") as acts, torch.no_grad():
        block(x)
    torch.testing.assert_close(acts["relu"], first)
    # a call index that does not happen is an error
    with pytest.raises(RuntimeError, match="never ran"):
        with capture(block, "relu:2"), torch.no_grad():
            block(x)
    # same names through a full resnet and list_layers
    m = torchvision.models.resnet18()
    names = [r.name for r in vizlearn.list_layers(m, receptive_fields=False)]
    assert "layer1.0.relu" in names and "layer1.0.relu:1" in names


# ---------------------------------------------------------------- case 4
class Exploding(nn.Module):
    def forward(self, x):
        raise ValueError("boom half-way")


def test_case4_hooks_removed_after_cycles_and_exceptions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    before = hook_counts(model)
    for i in range(50):
        with capture(model, ["0", "3"]) as acts:
            model(x)
        assert set(acts) == {"0", "3"}
        run_to_layer(model, x, "1")
        record_calls(model, ["0"], x)
        if i % 10 == 0:
            vizlearn.top_k(model, x, ["0", "3"], k=2)
            vizlearn.receptive_field(model, "3", input_size=12)
        assert hook_counts(model) == before
    # a forward that raises half-way, with hooks on both sides of the failure
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), Exploding(), nn.Conv2d(4, 4, 3)).train()
    before_bad = hook_counts(bad)
    with pytest.raises(ValueError, match="boom"):
        with capture(bad, ["0", "2"]):
            bad(x)
    assert hook_counts(bad) == before_bad
    with pytest.raises(ValueError, match="boom"):
        run_to_layer(bad, x, "2")
    assert hook_counts(bad) == before_bad
    with pytest.raises(ValueError, match="boom"):
        vizlearn.top_k(bad, x, ["0", "2"], k=2)
    assert hook_counts(bad) == before_bad
    assert all(m.training for m in bad.modules())


def test_case4_nothing_keeps_the_model_alive():
    def use():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3))
        x = torch.randn(2, 3, 10, 10)
        with capture(model, ["0", "2"]) as acts:
            model(x)
        run_to_layer(model, x, "2")
        vizlearn.top_k(model, x, ["0", "2"], k=1)
        vizlearn.receptive_field(model, "2", input_size=10)
        vizlearn.receptive_field(model, "2", input_size=10, method="empirical")
        vizlearn.list_layers(model, input_size=10)
        assert acts["0"].shape == (2, 4, 10, 10)
        return weakref.ref(model), weakref.ref(model[0].weight)

    ref, wref = use()
    gc.collect()
    assert ref() is None and wref() is None


# ---------------------------------------------------------------- case 6
class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(Inner(), nn.ReLU(), nn.Sequential(Inner()))

    def forward(self, x):
        return self.block(self.conv1(x))


def test_case6_names_nested_typo_dataparallel():
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(1, 3, 6, 6)
    names = [n for n, _ in model.named_modules() if n]
    with capture(model, names) as acts, torch.no_grad():
        model(x)
    assert set(names) <= set(acts)
    torch.testing.assert_close(acts["block.2.0.conv"], acts["block"])
    with pytest.raises(ValueError) as err:
        with capture(model, "block.2.0.cnv"):
            model(x)
    assert "block.2.0.conv" in str(err.value) and "vizlearn layers" in str(err.value)
    assert hook_counts(model) == [(n, 0, 0, 0, 0, 0) for n, _ in model.named_modules()]
    dp = nn.DataParallel(model)
    with capture(dp, ["conv1", "module.block.0.conv"]) as acts, torch.no_grad():
        dp(x)
    with capture(dp, "module.conv1") as acts2, torch.no_grad():
        dp(x)
    torch.testing.assert_close(acts["module.conv1"], acts2["module.conv1"])
    torch.testing.assert_close(acts["module.block.0.conv"], model.block[0].conv(model.conv1(x)).detach())
    assert vizlearn.receptive_field(dp, "conv1", input_size=6) == vizlearn.receptive_field(model, "conv1",
                                                                                           input_size=6)


# ---------------------------------------------------------------- case 7
Out = namedtuple("Out", "logits features")


class Structured(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "tuple":
            return y, y.mean((2, 3))
        if self.kind == "namedtuple":
            return Out(y.mean((2, 3)), y)
        return {"features": y, "pooled": y.mean((2, 3))}


class Wrapper(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body = Structured(kind)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind,select,message", [
    ("tuple", 0, "tuple of 2"),
    ("namedtuple", "features", "Out(logits, features)"),
    ("dict", "features", "dict(keys=['features', 'pooled'])"),
])
def test_case7_structured_outputs(kind, select, message):
    torch.manual_seed(0)
    model = Wrapper(kind).eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(TypeError) as err:
        with capture(model, "body"), torch.no_grad():
            model(x)
    assert message in str(err.value) and "select=" in str(err.value)
    assert hook_counts(model) == [(n, 0, 0, 0, 0, 0) for n, _ in model.named_modules()]
    with capture(model, "body", select=select) as acts, torch.no_grad():
        model(x)
    torch.testing.assert_close(acts["body"], model.body.conv(x).detach())
    pick = (lambda o: o.features) if kind == "namedtuple" else (lambda o: o[select])
    with capture(model, "body", select=pick) as acts2, torch.no_grad():
        model(x)
    torch.testing.assert_close(acts2["body"], acts["body"])
    # the same selector works through run_to_layer and top_k
    y = run_to_layer(model, x, "body", select=select)
    torch.testing.assert_close(y.detach(), acts["body"])
    r = vizlearn.top_k(model, x, "body", k=1, select=select)["body"]
    assert r.scores.shape == (4, 1)


# ---------------------------------------------------------------- never ran
class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3)
        self.spare = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.used(x)


def test_layer_that_never_ran_is_an_error():
    model = Unused().eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(RuntimeError, match="never ran"):
        with capture(model, ["used", "spare"]), torch.no_grad():
            model(x)
    with pytest.raises(RuntimeError, match="never ran"):
        run_to_layer(model, x, "spare")
    with pytest.raises(RuntimeError, match="never ran"):
        vizlearn.top_k(model, x, "spare", k=1)
    with pytest.raises(ValueError, match="never ran"):
        vizlearn.receptive_field(model, "spare", input_size=6)
    assert hook_counts(model) == [(n, 0, 0, 0, 0, 0) for n, _ in model.named_modules()]
