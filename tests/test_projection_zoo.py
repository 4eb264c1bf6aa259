"""Projection on random-weight torchvision / timm architectures: shape = input, finite, nonzero."""
import warnings

import pytest
import torch

from vizlearn import state
from vizlearn.capture import run_to_layer
from vizlearn.projection import project, project_units

tv = pytest.importorskip("torchvision.models")

# (builder, mid layer, input size)
ZOO = {
    "alexnet": (lambda: tv.alexnet(weights=None), "features.8", 96, False),
    "vgg16": (lambda: tv.vgg16(weights=None), "features.15", 64, True),
    "resnet18": (lambda: tv.resnet18(weights=None), "layer2.1.relu:1", 64, False),
    "resnet50": (lambda: tv.resnet50(weights=None), "layer2.0", 64, True),
    "googlenet": (lambda: tv.googlenet(weights=None, aux_logits=False, init_weights=False), "inception3b", 64, True),
    "inception_v3": (lambda: tv.inception_v3(weights=None, aux_logits=False, init_weights=False), "Mixed_5b",
                     80, True),
    "densenet121": (lambda: tv.densenet121(weights=None), "features.transition1", 64, True),
    "mobilenet_v2": (lambda: tv.mobilenet_v2(weights=None), "features.7", 64, False),
    "efficientnet_b0": (lambda: tv.efficientnet_b0(weights=None), "features.4", 64, True),
    "convnext_tiny": (lambda: tv.convnext_tiny(weights=None), "features.3", 64, True),
    "tf_efficientnet_lite0": (lambda: __import__("timm").create_model("tf_efficientnet_lite0", pretrained=False),
                              "blocks.3", 64, False),
}


def _params(name):
    slow = ZOO[name][3]
    return pytest.param(name, marks=pytest.mark.slow) if slow else name


@pytest.mark.parametrize("name", [_params(n) for n in ZOO])
def test_zoo_projection(name):
    build, layer, size, _ = ZOO[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), state.eval_mode(model):
        act = run_to_layer(model, x, layer)
    top2 = torch.topk(act[0].flatten(1).amax(1), 2).indices.tolist()  # two live channels
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        p = project_units(model, x, layer, [(0, top2[0], None), (0, top2[1], None)])
    assert p.shape == (2,) + x.shape[1:]
    assert torch.isfinite(p).all()
    assert (p.flatten(1).abs().sum(1) > 0).all()
    msgs = [str(w.message) for w in rec if "no clean" in str(w.message)]
    if name in ("efficientnet_b0", "convnext_tiny"):
        assert len(msgs) == 1  # SiLU / sigmoid gates, GELU named in one warning
        assert ("SiLU" in msgs[0] or "silu" in msgs[0]) if name == "efficientnet_b0" else "gelu" in msgs[0]
    else:
        assert msgs == [], msgs  # every activation of these nets is a rectifier with a rule


def test_zoo_rule_differs_from_gradient():
    """On a net of functional F.relu calls (googlenet uses F.relu inside BasicConv2d) the rule applies."""
    torch.manual_seed(0)
    model = tv.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    x = torch.randn(1, 3, 64, 64)
    d = project(model, x, "inception3a", 3)
    g = project(model, x, "inception3a", 3, method="gradient")
    assert not torch.allclose(d, g)
