"""Issue 5 guarantees that cut across modules: the caller's model is left exactly as found by every
public entry point (case 5), hooks are removed whatever happens (case 4), channel counts other than
three (case 15), and the display helpers' layout handling (case 16).

The per-module cases live next to their modules (see the case -> test table in the README's
"Limits and guarantees" section); this file checks the promises on *all* entry points at once.
"""
import copy
import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import vizlearn
from vizlearn import plot
from vizlearn.capture import capture, record_calls, run_to_layer
from vizlearn.images import to_display
from conftest import write_png16


# ============================================================================ helpers
class TrainNet(nn.Module):
    """conv-BN-ReLU(inplace)-pool-Dropout2d-conv-BN-ReLU(inplace)-GAP-Dropout-linear, 3x16x16 input."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout2d(0.5)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU(inplace=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.drop2 = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.drop1(self.pool(self.relu1(self.bn1(self.conv1(x)))))
        h = self.relu2(self.bn2(self.conv2(h)))
        return self.fc(self.drop2(self.flat(self.gap(h))))


def train_net(seed: int = 0, in_channels: int = 3) -> TrainNet:
    """Seeded, in train mode, with non-trivial BN statistics, one frozen parameter, one stored grad."""
    torch.manual_seed(seed)
    net = TrainNet(in_channels).train()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    net.conv1.bias.requires_grad_(False)  # a "frozen" parameter
    net.fc.weight.grad = torch.full_like(net.fc.weight, 3.0)  # a gradient the user accumulated
    net.eval_flag_probe = None  # plain attribute: must survive too
    net.drop1.training = False  # a mixed-mode model: one submodule deliberately in eval
    return net


def hook_counts(model):
    """Per module: forward, forward-pre, backward, backward-pre, state-dict hooks."""
    out = []
    for name, m in model.named_modules():
        out.append((name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    len(getattr(m, "_backward_pre_hooks", {})), len(getattr(m, "_forward_hooks_with_kwargs", {})),
                    len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks)))
    return out


def snapshot(model):
    """Everything of the caller's model a vizlearn call might change."""
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "inplace": [(n, m.inplace) for n, m in model.named_modules() if hasattr(m, "inplace")],
        "hooks": hook_counts(model),
        "params": [(n, id(p), p.dtype, p.device, p.requires_grad, p.detach().clone(),
                    None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "buffers": [(n, id(b), b.dtype, b.clone()) for n, b in model.named_buffers()],
    }


def assert_same_snapshot(before, after, what):
    for key in ("modules", "training", "inplace", "hooks"):
        assert before[key] == after[key], f"{what}: {key} changed"
    for (n, i, dt, dev, rg, v, g), (n2, i2, dt2, dev2, rg2, v2, g2) in zip(before["params"], after["params"],
                                                                          strict=True):
        assert (n, i, dt, dev, rg) == (n2, i2, dt2, dev2, rg2), f"{what}: parameter {n} replaced or re-flagged"
        assert torch.equal(v, v2), f"{what}: parameter {n} changed"
        assert (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), f"{what}: {n}.grad changed"
    for (n, i, dt, v), (n2, i2, dt2, v2) in zip(before["buffers"], after["buffers"], strict=True):
        assert (n, i, dt) == (n2, i2, dt2), f"{what}: buffer {n} replaced"
        assert v.dtype == v2.dtype and torch.equal(v, v2), f"{what}: buffer {n} changed"  # bitwise


TIMING_FIELDS = {"seconds", "elapsed", "wall_s"}  # wall-clock measurements in results


def assert_identical(a, b, where="result"):
    """Bitwise equality of nested results (dataclasses, dicts, sequences, tensors, arrays; NaN == NaN)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            if f.name in TIMING_FIELDS:
                continue
            assert_identical(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(torch.nan_to_num(a, nan=1234.5), torch.nan_to_num(b, nan=1234.5)), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
        assert a.dtype == b.dtype, where
    elif isinstance(a, float):
        assert (a == b) or (np.isnan(a) and np.isnan(b)), where
    else:
        assert a == b, where


def images(n=6, size=16, channels=3, seed=0):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def photos(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"p{i}", rng.random((size + 4, size + 6, 3)).astype(np.float32)) for i in range(n)]


def _evolution(net, x):
    from vizlearn.evolution import FeatureEvolution

    cb = FeatureEvolution(x, ["conv2"], {"conv2": [0, 3]}, epochs=(0, 1))
    cb.on_train_begin(net)
    cb.on_epoch_end(net, 1)
    return cb.result()


def _feature_tiles(net, x):
    loaded = vizlearn.load_model(net, input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    iset = vizlearn.image_set(photos(), size=16)
    res = vizlearn.top_k(loaded, iset, ["conv2"], k=3)["conv2"]
    return res, vizlearn.feature_tiles(loaded, iset, "conv2", res, [0, 2])


# Every public entry point that takes a model, called as a user would on TrainNet (3x16x16).
ENTRY_POINTS = {
    "list_layers": lambda net, x: vizlearn.list_layers(net, input_size=16),
    "receptive_field": lambda net, x: vizlearn.receptive_field(net, "conv2", input_size=16),
    "receptive_field_empirical": lambda net, x: vizlearn.receptive_field(net, "relu2", input_size=16,
                                                                         method="empirical"),
    "receptive_fields": lambda net, x: vizlearn.receptive_fields(net, input_size=16),
    "record_calls": lambda net, x: {k: o for k, (_, o) in record_calls(net, ["bn1", "fc"], x).items()},
    "top_k": lambda net, x: vizlearn.top_k(net, x, ["bn1", "relu1", "conv2", "fc"], k=3, batch_size=4),
    "project": lambda net, x: vizlearn.project(net, x, "relu2", 3),
    "project_guided": lambda net, x: vizlearn.project(net, x, "bn2", 2, method="guided"),
    "project_gradient_logit": lambda net, x: vizlearn.project(net, x, None, 3, method="gradient"),
    "project_units": lambda net, x: vizlearn.project_units(net, x, "conv2", [(0, 1, (2, 3)), (3, 5, None)],
                                                           chunk=1),
    "predict": lambda net, x: vizlearn.predict(vizlearn.load_model(net, input_size=16), [p for _, p in photos()]),
    "load_model": lambda net, x: vizlearn.load_model(net, input_size=16).input_size,
    "occlusion": lambda net, x: vizlearn.occlusion(net, x[0], size=4, stride=4, layer="conv2"),
    "sanity_check": lambda net, x: vizlearn.sanity_check(net, x[:2], "conv2", channel=1, max_steps=3),
    "invariance": lambda net, x: vizlearn.invariance(net, x[:2], layers=["conv1", "conv2"],
                                                     steps={"translate": np.array([-2.0, 0.0, 2.0]),
                                                            "scale": np.array([0.9, 1.0, 1.2]),
                                                            "rotate": np.array([0.0, 90.0])}),
    "correspondence": lambda net, x: vizlearn.correspondence(
        net, x[:3], {"eye": np.array([[2, 2, 6, 6], [3, 3, 7, 7], [2, 4, 6, 8]])}, layers=["conv1", "relu2"],
        n_random=2),
    "layer1_health": lambda net, x: vizlearn.layer1_health(net),
    "default_layers": lambda net, x: vizlearn.default_layers(net, n=3, input_size=16),
    "first_conv": lambda net, x: vizlearn.first_conv(net)[0],
    "feature_tiles": _feature_tiles,
    "feature_evolution_callback": _evolution,
}


# ============================================================================ case 5
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_train_mode_model_flags_and_bn_buffers_untouched_by_every_call(entry):
    """Case 5: BN + Dropout model in train mode (one submodule in eval, in-place ReLUs, a frozen
    parameter, a stored .grad): every public entry point leaves training/inplace flags, parameters
    (values, requires_grad, .grad), BN buffers incl. num_batches_tracked (bitwise), hooks and the
    input as found; two identical calls give identical results; the global RNG is not consumed."""
    net = train_net()
    x = images()
    x0 = x.clone()
    before = snapshot(net)
    rng = torch.get_rng_state()
    first = ENTRY_POINTS[entry](net, x)
    assert_same_snapshot(before, snapshot(net), entry)
    assert torch.equal(torch.get_rng_state(), rng), f"{entry} consumed the global torch RNG"
    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None
    second = ENTRY_POINTS[entry](net, x)
    assert_same_snapshot(before, snapshot(net), entry)
    assert_identical(first, second, entry)
    # the results are those of the eval-mode model: the same call on an eval copy gives the same
    ev = copy.deepcopy(net).eval()
    ev.drop1.training = False
    assert_identical(first, ENTRY_POINTS[entry](ev, x), f"{entry} (eval copy)")


def test_entry_point_table_covers_the_public_api():
    """Every callable exported by vizlearn that takes a model appears in the case-5 table (or is
    listed here with the reason it is left out), so a new entry point cannot skip the check."""
    covered = {name.split("_empirical")[0].split("_guided")[0].split("_gradient")[0] for name in ENTRY_POINTS}
    covered |= {"capture", "project_units", "feature_evolution_callback"}
    exempt = {
        # observe the caller's own forward pass, in the caller's mode (tested below)
        "capture",
        # write files; each wraps an entry point of the table (occlusion, invariance, ...)
        "run_occlusion", "run_invariance", "run_evolution", "run_correspondence", "run_layer1",
        # trains a model by design (case 13, tests/test_finetune.py) / builds its own model
        "finetune", "train_small_cnn_demo", "FeatureEvolution",
    }
    import inspect

    takes_model = []
    for name in dir(vizlearn):
        obj = getattr(vizlearn, name)
        if name.startswith("_") or not callable(obj) or inspect.isclass(obj) and name != "FeatureEvolution":
            continue
        try:
            params = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            continue
        if params and params[0] in ("model", "loaded", "model_or_weight", "name_or_module"):
            takes_model.append(name)
    for name in vizlearn._LAZY:
        params = list(__import__("inspect").signature(getattr(vizlearn, name)).parameters)
        if params and params[0] in ("model", "loaded"):
            takes_model.append(name)
    missing = sorted(set(takes_model) - covered - exempt)
    assert not missing, f"entry points not in the case-5 table: {missing}"


def test_capture_and_run_to_layer_leave_flags_and_hooks_and_observe_the_callers_mode():
    """capture / run_to_layer observe the caller's own forward: they change no flag, remove their
    hooks, and run in the mode the caller chose (documented; train-mode BN then updates its
    statistics, as the caller's own forward would)."""
    net = train_net()
    x = images()
    before = snapshot(net)
    with capture(net, ["bn1", "relu1", "fc"]) as acts:
        assert [(n, m.training) for n, m in net.named_modules()] == before["training"]
        ref = copy.deepcopy(net)  # what the caller's own train-mode forward does, without vizlearn
        torch.manual_seed(5)
        with torch.no_grad():
            out = net(x)
    torch.manual_seed(5)
    with torch.no_grad():
        ref_out = ref(x)
    assert torch.equal(out, ref_out) and torch.equal(acts["fc"], ref_out)  # train mode: dropout active
    after = snapshot(net)
    for key in ("modules", "training", "inplace", "hooks"):
        assert after[key] == before[key], key
    assert torch.equal(net.bn1.running_mean, ref.bn1.running_mean)  # updated exactly as without capture
    assert int(net.bn1.num_batches_tracked) == 8
    # in eval mode run_to_layer is side-effect free and equals the captured value
    net.eval()
    sd = copy.deepcopy(net.state_dict())
    with capture(net, "bn2") as acts, torch.no_grad():
        net(x)
    y = run_to_layer(net, x, "bn2")
    torch.testing.assert_close(y.detach(), acts["bn2"], rtol=0, atol=0)
    assert y.requires_grad  # stays on the graph
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())
    assert hook_counts(net) == before["hooks"]


# ============================================================================ case 4
class Boom(Exception):
    pass


class ExplodeAfter(nn.Module):
    """Raises on the call number ``when`` (counting from 1), otherwise identity."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.when = None

    def forward(self, x):
        self.calls += 1
        if self.when is not None and self.calls >= self.when:
            raise Boom("forward failed half-way")
        return x


class Fragile(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.mid = ExplodeAfter()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu2(self.conv2(self.mid(self.pool(self.relu1(self.conv1(x))))))
        return self.head(h.mean((2, 3)))


def _fragile():
    torch.manual_seed(1)
    return Fragile().train()


def test_fifty_projection_and_topk_cycles_leave_hook_counts_on_every_module():
    """Case 4 for projection / top_k / project_units / occlusion / sanity: 50 create-use-discard
    cycles leave the number of forward, pre-, backward and backward-pre hooks on every module as
    it was (the model starts with a user hook of each kind, which must survive and still fire)."""
    net = _fragile()
    fired = []
    net.conv2.register_forward_hook(lambda m, i, o: fired.append("f"))
    net.conv2.register_forward_pre_hook(lambda m, i: None)
    net.conv2.register_full_backward_hook(lambda m, gi, go: None)
    net.relu2.register_full_backward_pre_hook(lambda m, go: None)
    before = hook_counts(net)
    x = images(2)
    cycle = [
        lambda i: vizlearn.project(net, x, "relu2", i % 6),
        lambda i: vizlearn.top_k(net, x, ["conv1", "relu2"], k=2, batch_size=1),
        lambda i: vizlearn.project(net, x, "conv2", i % 6, method="guided"),
        lambda i: vizlearn.project_units(net, x, "conv2", [(0, 1, None), (1, 3, (1, 1))], chunk=1),
        lambda i: vizlearn.project(net, x, None, i % 3, method="gradient"),
    ]
    for i in range(50):
        cycle[i % len(cycle)](i)
        if i in (0, 49):
            vizlearn.occlusion(net, x[0], size=8, stride=8, layer="conv2")
            vizlearn.sanity_check(net, x[:1], "conv2", channel=0, max_steps=2)
        assert hook_counts(net) == before, f"cycle {i}"
    assert fired  # the user's own hook was still active during the runs
    fired.clear()
    net(x)
    assert fired == ["f"]


@pytest.mark.parametrize("call", ["project", "project_units", "top_k", "top_k_stream", "occlusion",
                                  "list_layers", "receptive_field_empirical"])
def test_forward_raising_half_way_leaves_no_hooks_and_flags_restored(call):
    """Case 4: a forward that raises half-way (after hooks before it fired, before hooks after it)
    propagates the user's exception, and leaves hook counts, training and inplace flags as found."""
    net = _fragile()
    x = images(4)
    before = snapshot(net)
    net.mid.when = 1

    def stream():  # the failure happens on the second batch of a stream
        yield x[:2]
        net.mid.calls, net.mid.when = 0, 1
        yield x[2:]

    calls = {
        "project": lambda: vizlearn.project(net, x, "relu2", 0),
        "project_units": lambda: vizlearn.project_units(net, x, "conv2", [(0, 1, None)]),
        "top_k": lambda: vizlearn.top_k(net, x, ["conv1", "relu2"], k=2),
        "top_k_stream": lambda: vizlearn.top_k(net, stream(), ["conv1", "relu2"], k=2),
        "occlusion": lambda: vizlearn.occlusion(net, x[0], size=8, stride=8, layer="conv2"),
        "list_layers": lambda: vizlearn.list_layers(net, input_size=16),
        "receptive_field_empirical": lambda: vizlearn.receptive_field(net, "conv2", input_size=16,
                                                                      method="empirical"),
    }
    if call == "top_k_stream":
        net.mid.when = None
    with pytest.raises(Boom):
        calls[call]()
    net.mid.when, net.mid.calls = None, 0
    assert_same_snapshot(before, snapshot(net), call)
    # and the model still works normally afterwards
    vizlearn.project(net, x, "relu2", 0)
    assert_same_snapshot(before, snapshot(net), call)


def test_projection_and_topk_keep_no_reference_to_the_model():
    """Case 4: nothing vizlearn returns or caches keeps the model (or its weights) alive."""
    def use():
        net = _fragile()
        x = images(4)
        p = vizlearn.project(net, x, "relu2", 1)
        u = vizlearn.project_units(net, x, "conv2", [(0, 1, None)])
        t = vizlearn.top_k(net, x, ["conv1", "relu2"], k=2)
        o = vizlearn.occlusion(net, x[0], size=8, stride=8, layer="conv2")
        s = vizlearn.sanity_check(net, x[:1], "conv2", channel=0, max_steps=2)
        return weakref.ref(net), weakref.ref(net.conv1.weight), (p, u, t, o, s)

    ref, wref, results = use()
    gc.collect()
    assert ref() is None and wref() is None
    assert results[0].grad_fn is None and not results[0].requires_grad


# ============================================================================ case 15
def _gray_net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()).eval()


def _rgba_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1),
                         nn.ReLU()).eval()


def test_one_channel_model_topk_projection_and_plots_are_2d():
    """Case 15: a 1-channel model with 1-channel input runs through top_k, project, project_units,
    receptive fields and the figures; its input and projections display as 2-D images."""
    net = _gray_net()
    x = images(5, channels=1, seed=4)
    res = vizlearn.top_k(net, x, ["0", "4"], k=3)
    assert res["4"].scores.shape == (6, 3)
    assert vizlearn.receptive_field(net, "4", input_size=16, in_channels=1).size == (8, 8)
    p = vizlearn.project(net, x, "4", 2)
    assert p.shape == (5, 1, 16, 16) and torch.isfinite(p).all() and p.abs().sum() > 0
    u = vizlearn.project_units(net, x, "4", [(int(res["4"].image_index[2, 0]), 2,
                                                tuple(int(v) for v in res["4"].position[2, 0]))])
    assert u.shape == (1, 1, 16, 16)
    shown = vizlearn.display_projection(p[0])
    assert shown.shape == (16, 16) and np.isfinite(shown).all() and shown.min() >= 0 and shown.max() <= 1
    img = to_display(x[0], mean=(0.5,), std=(0.25,))
    assert img.shape == (16, 16)
    np.testing.assert_allclose(img, np.clip(x[0, 0].numpy() * 0.25 + 0.5, 0, 1), atol=1e-6)
    # the figures take these 2-D pictures
    fig = plot.filter_grid(net[0].weight.detach().numpy())
    assert isinstance(fig, Figure)
    with torch.no_grad():
        maps = net[:5](x[:1])[0].numpy()
    assert isinstance(plot.activation_maps(img, {"4": maps}, n=3), Figure)
    lm = vizlearn.load_model(net, mean=(0.5,), std=(0.25,), input_size=16)
    iset = vizlearn.image_set(photos(4), size=16)
    r = vizlearn.top_k(lm, iset, "4", k=2)["4"]
    tiles = vizlearn.feature_tiles(lm, iset, "4", r, [0, 1], crop="theoretical")
    shown = tiles.projections[~np.isnan(tiles.projections[..., 0])]
    assert shown.size and np.isfinite(shown).all()
    assert np.array_equal(shown[..., 0], shown[..., 1]) and np.array_equal(shown[..., 0], shown[..., 2])  # grey
    assert isinstance(plot.feature_panel(tiles.projections, tiles.patches), Figure)


def test_four_channel_model_first_three_channel_and_per_channel_views():
    """Case 15: a 4-channel model works end to end; display helpers show the first three channels
    (documented) and per-channel views are available by slicing; bad channel counts are errors."""
    net = _rgba_net()
    x = images(3, channels=4, seed=5)
    res = vizlearn.top_k(net, x, ["3"], k=2)["3"]
    assert res.scores.shape == (6, 2)
    p = vizlearn.project(net, x, "3", 1)
    assert p.shape == (3, 4, 16, 16) and torch.isfinite(p).all() and p.abs().sum() > 0
    shown = vizlearn.display_projection(p[0])
    assert shown.shape[:2] == (16, 16) and shown.shape[-1] in (3, 4) and np.isfinite(shown).all()
    view = to_display(p[0])
    np.testing.assert_allclose(view, np.clip(p[0, :3].permute(1, 2, 0).numpy(), 0, 1), atol=1e-7)
    for c in range(4):  # per-channel view: one channel -> 2-D
        ch = to_display(p[0, c:c + 1])
        assert ch.shape == (16, 16)
        np.testing.assert_allclose(ch, np.clip(p[0, c].numpy(), 0, 1), atol=1e-7)
    assert isinstance(plot.filter_grid(net[0].weight.detach().numpy()), Figure)
    with pytest.raises(ValueError, match="channel"):
        to_display(torch.rand(3, 8, 8), mean=(0.5,) * 4, std=(0.5,) * 4)
    # a 3-channel batch into the 4-channel model: a clear error naming the mismatch
    with pytest.raises((RuntimeError, ValueError), match="channels"):
        vizlearn.project(net, images(1), "3", 0)


# ============================================================================ case 16
def test_display_same_picture_from_chw_hwc_uint8_bfloat16_and_red_stays_red():
    """Case 16: CHW float tensors, HWC uint8 arrays, bfloat16 and half maps, and NCHW with N=1 give
    the same picture; pure red stays red through every layout; ambiguous shapes are errors."""
    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    ref = u8.astype(np.float32) / 255
    chw = torch.from_numpy(ref).permute(2, 0, 1)
    for name, v, tol in [("hwc uint8", u8, 0), ("hwc float", ref, 0), ("chw", chw, 0),
                         ("nchw", chw[None], 0), ("chw bf16", chw.bfloat16(), 1 / 128),
                         ("chw half", chw.half(), 1e-3), ("hwc tensor", chw.permute(1, 2, 0), 0),
                         ("chw float64 ndarray", chw.double().numpy(), 1e-7)]:
        got = to_display(v)
        assert got.shape == (9, 11, 3) and got.dtype == np.float32, name
        np.testing.assert_allclose(got, ref, atol=tol, err_msg=name)
    # a bfloat16 feature map (2-D) displays as 2-D
    fmap = torch.rand(1, 9, 11)
    np.testing.assert_allclose(to_display(fmap.bfloat16()), fmap[0].numpy(), atol=1 / 128)
    red = np.zeros((6, 6, 3), np.uint8)
    red[..., 0] = 255
    for v in (red, torch.from_numpy(red).permute(2, 0, 1).float() / 255,
              (torch.from_numpy(red).permute(2, 0, 1).float() / 255).bfloat16(),
              torch.from_numpy(red).permute(2, 0, 1)[None].float() / 255):
        d = to_display(v)
        assert d.shape == (6, 6, 3) and (d[..., 0] == 1).all() and (d[..., 1:] == 0).all()
    for shape in [(3, 5, 3), (4, 6, 4), (1, 1, 1)]:
        with pytest.raises(ValueError, match="ambiguous|layout"):
            to_display(torch.rand(shape))


# ============================================================================ case 3
def test_gradient_at_layer_before_inplace_relu_equals_autograd_oracle_and_flags_kept():
    """Case 3: method="gradient" at a conv followed by an in-place ReLU gives no autograd error and
    equals a hand-written torch.autograd.grad oracle on an out-of-place copy; flags and modules kept."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(5, 4, 3, padding=1),
                        nn.ReLU(inplace=True)).eval()
    ids = [id(m) for m in net.modules()]
    x = images(2, size=8, seed=3)
    got = vizlearn.project(net, x, "0", 2, (3, 4), method="gradient")
    # oracle: d unit / d input, scaled by the unit's value (the projection seeds with the activation)
    xi = x.clone().requires_grad_(True)
    conv = nn.functional.conv2d(xi, net[0].weight, net[0].bias, padding=1)
    seed = torch.zeros_like(conv)
    seed[:, 2, 3, 4] = conv[:, 2, 3, 4].detach()
    (ref,) = torch.autograd.grad(conv, xi, seed)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    deeper = vizlearn.project(net, x, "2", 1, method="gradient")  # gradient passes the in-place ReLU
    assert torch.isfinite(deeper).all() and deeper.shape == x.shape
    assert net[1].inplace and net[3].inplace and [id(m) for m in net.modules()] == ids


# ============================================================================ case 10
def test_dead_filter_gives_grey_tiles_and_finite_figures_with_a_warning():
    """Case 10 through the figure path: a dead filter's projections (project_units, feature_tiles)
    are zeros with a RuntimeWarning, its tiles mid-grey, the panel draws; nothing is NaN outside the
    marked padding."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1),
                        nn.ReLU()).eval()
    with torch.no_grad():
        net[3].bias[1] = -1e4
    lm = vizlearn.load_model(net, input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    iset = vizlearn.image_set(photos(3), size=16)
    res = vizlearn.top_k(lm, iset, "4", k=2)["4"]
    assert (res.scores[1] == 0).all()
    with pytest.warns(RuntimeWarning, match="dead filter"):
        tiles = vizlearn.feature_tiles(lm, iset, "4", res, [1], crop="theoretical")
    inside = ~np.isnan(tiles.patches)
    assert np.array_equal(~np.isnan(tiles.projections), inside)
    np.testing.assert_array_equal(tiles.projections[inside], 0.5)
    fig = plot.feature_panel(tiles.projections, tiles.patches)
    assert isinstance(fig, Figure)


# ============================================================================ case 17
def test_report_on_folder_with_broken_files_completes_lists_skipped_once_and_counts_them(tmp_path):
    """Case 17 end to end: truncated JPEG, zero-byte file, text file named .png and a 16-bit PNG
    among good photos: run_report completes on the readable ones (the 16-bit PNG is readable),
    warns once listing the skipped files, and the summary (and results.json) lists and counts them."""
    import json
    import warnings

    from PIL import Image

    from vizlearn.report import run_report

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / "good.jpg", quality=90)
    Image.fromarray((rng.random((36, 30, 3)) * 255).astype(np.uint8)).save(folder / "good2.png")
    full = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    write_png16(folder / "deep16.png", (rng.random((20, 24, 3)) * 65535).astype(np.uint16))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    lm = vizlearn.load_model(net, input_size=16, categories=["a", "b", "c"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        summary = run_report(model=lm, images=folder, layers=["0", "3"], k=2, filters=1, crops=1,
                             out=tmp_path / "out", experiments=(), methods=("deconvnet",), quiet=True,
                             progress=False)
    bad = ["text.png", "truncated.jpg", "zero.png"]
    mentions = [w for w in rec if all(b in str(w.message) for b in bad)]
    assert len(mentions) == 1  # listed once
    assert sorted(summary["skipped_files"]) == bad
    assert summary["n_images"] == 3 and sorted(summary["photos"]) == ["deep16.png", "good.jpg", "good2.png"]
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(on_disk["skipped_files"]) == bad


# ============================================================================ case 18
def test_cli_error_is_one_line_without_debug_and_full_traceback_with_debug(capsys):
    """Case 18: a bad-input error gives exit code 2 and one line on stderr; with --debug the original
    exception propagates (full traceback) instead."""
    from vizlearn.cli import main

    assert main(["report", "--methods", "deconvnett"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "deconvnett" in err
    with pytest.raises(ValueError, match="deconvnett"):
        main(["--debug", "report", "--methods", "deconvnett"])
