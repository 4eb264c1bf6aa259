"""Fine-tuning: frozen means frozen, BN statistics, head by identity, stats bookkeeping, drift numbers."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vizlearn.datasets import Dataset
from vizlearn.finetune import FinetuneResult, find_head, finetune, model_stages

MEAN = STD = (0.5, 0.5, 0.5)


class TinyEffNet(nn.Module):
    """EfficientNet-shaped: conv_stem/bn1, blocks, conv_head/bn2, classifier = Dropout + Linear."""

    def __init__(self, n_out=7):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.conv_head = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, n_out))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = F.relu(self.bn2(self.conv_head(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def make_model(seed=0):
    torch.manual_seed(seed)
    m = TinyEffNet()
    # non-trivial BN statistics, as in a pretrained network
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                b.bias.uniform_(-0.2, 0.2)
    return m.eval()


def make_dataset(n_train=60, n_test=30, size=16, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)

    def draw(n):
        y = np.arange(n) % n_classes
        x = rng.uniform(0, 0.3, (n, size, size, 3)).astype(np.float32)
        for i, c in enumerate(y):  # class = which third of the image is bright
            x[i, :, c * size // n_classes:(c + 1) * size // n_classes, c % 3] += 0.6
        return np.clip(x, 0, 1), y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Dataset("toy", xtr, ytr, xte, yte, classes=tuple(f"c{i}" for i in range(n_classes)))


FAST = dict(mean=MEAN, std=STD, natural_images=False, stage_probe=False, progress=False, batch_size=16,
            probe_steps=20)


def test_stages_and_head_by_identity_not_name():
    m = make_model()
    name, head = find_head(m)
    assert name == "classifier.1" and head is m.classifier[1]  # conv_head is not the head
    st = model_stages(m)
    assert [s.name for s in st] == ["stem", "blocks.0", "blocks.1", "conv_head", "head"]
    res = finetune(m, make_dataset(), recipe="linear-probe", **FAST)
    ft = res.model
    assert ft.classifier[1].out_features == 3 and ft.classifier[1] is not m.classifier[1]
    assert ft.conv_head.weight.shape == m.conv_head.weight.shape
    assert torch.equal(ft.conv_head.weight, m.conv_head.weight)  # linear probe: backbone untouched
    assert m.classifier[1].out_features == 7  # caller's model unchanged


def test_find_head_torchvision_and_timm():
    import timm
    import torchvision

    r = torchvision.models.resnet18(weights=None)
    assert find_head(r) == ("fc", r.fc)
    assert [s.name for s in model_stages(r)] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    v = torchvision.models.vgg11(weights=None)
    assert find_head(v) == ("classifier.6", v.classifier[6])
    e = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert find_head(e) == ("classifier", e.classifier)
    names = [s.name for s in model_stages(e)]
    assert names[0] == "stem" and names[-2:] == ["conv_head", "head"] and len(names) == 10


def test_frozen_params_bitwise_unchanged_sgd_momentum_weight_decay_train_mode():
    m = make_model()
    before = copy.deepcopy(m.state_dict())
    m.train()  # caller left it in train mode: flags must be restored as found
    flags = [x.training for x in m.modules()]
    res = finetune(m, make_dataset(), recipe="freeze-to:2", optimizer="sgd", momentum=0.9,
                   weight_decay=0.1, lr=0.05, epochs=2, **FAST)
    ft = res.model
    frozen = [n for n, _ in ft.named_parameters() if n.startswith(("conv_stem", "bn1", "blocks.0"))]
    assert frozen
    for n, p in ft.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n  # bitwise
            assert p.grad is None and not p.requires_grad
        elif n.startswith(("blocks.1.0", "conv_head")):
            assert not torch.equal(p, before[n]), n
    for n, v in m.state_dict().items():  # the caller's model: untouched
        assert torch.equal(v, before[n]), n
    assert [x.training for x in m.modules()] == flags
    ix = [res.param_names.index(n) for n in frozen]
    assert np.all(res.param_change[:, ix] == 0.0)
    assert res.config["stage_lr"]["stem"] == 0.0 and res.config["stage_lr"]["blocks.1"] == pytest.approx(0.01)


def test_bn_buffers_frozen_by_default_and_reported_when_updating():
    m = make_model()
    ds = make_dataset()
    res = finetune(m, ds, recipe="full", epochs=1, **FAST)
    for (n, b0), (_, b1) in zip(m.named_buffers(), res.model.named_buffers()):
        assert torch.equal(b0, b1), n
    assert np.all(res.bn_mean_drift[:, :-1] == 0) and np.all(res.bn_var_drift[:, :-1] == 0)
    assert np.all(np.isnan(res.bn_mean_drift[:, -1]))  # head has no BN

    upd = finetune(m, ds, recipe="full", epochs=1, bn="update", **FAST)
    changed = [n for (n, b0), (_, b1) in zip(m.named_buffers(), upd.model.named_buffers())
               if n.endswith("running_mean") and not torch.equal(b0, b1)]
    assert len(changed) == 4
    assert np.all(upd.bn_mean_drift[-1, :-1] > 0) and np.all(upd.bn_var_drift[-1, :-1] > 0)
    # oracle for the reported drift of the stem
    naive = (upd.model.bn1.running_mean - m.bn1.running_mean).norm() / m.bn1.running_mean.norm()
    assert upd.bn_mean_drift[-1, 0] == pytest.approx(float(naive), rel=1e-6)


def test_weight_change_matches_naive_oracle():
    m = make_model()
    res = finetune(m, make_dataset(), recipe="full", epochs=1, **FAST)
    ft = res.model
    w0, w1 = m.conv_head.weight.detach().double(), ft.conv_head.weight.detach().double()
    assert res.param("conv_head.weight") == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-9)
    g = res.stage_index("stem")
    a0 = torch.cat([m.conv_stem.weight.flatten(), m.bn1.weight, m.bn1.bias]).detach().double()
    a1 = torch.cat([ft.conv_stem.weight.flatten(), ft.bn1.weight, ft.bn1.bias]).detach().double()
    assert res.weight_change[-1, g] == pytest.approx(float((a1 - a0).norm() / a0.norm()), rel=1e-9)
    cos = float(a0 @ a1 / (a0.norm() * a1.norm()))
    assert res.weight_angle[-1, g] == pytest.approx(math.degrees(math.acos(min(cos, 1.0))), abs=1e-5)
    assert res.weight_scale[-1, g] == pytest.approx(float(a1.norm() / a0.norm()), rel=1e-9)
    # pretrained snapshot: zero change, CKA 1, top-9 overlap 1
    assert np.all(res.weight_change[0, :-1] == 0)
    np.testing.assert_allclose(res.cka_target[0, :-1], 1.0, atol=1e-12)
    np.testing.assert_allclose(res.topk_overlap_target[0, :-1], 1.0)
    assert res.step_drift.shape == (len(res.step), len(res.stages))
    assert res.step_drift[-1] == pytest.approx(res.weight_change[-1], rel=1e-5, nan_ok=True)
    # per-filter cosine of the first conv
    fb, fa = res.filters_before.reshape(8, -1), res.filters_after.reshape(8, -1)
    naive_cos = np.sum(fb * fa, 1) / (np.linalg.norm(fb, axis=1) * np.linalg.norm(fa, axis=1))
    np.testing.assert_allclose(res.filter_cosine, naive_cos, rtol=1e-5)


def test_near_zero_first_layer_filters_are_masked():
    m = make_model()
    with torch.no_grad():
        m.conv_stem.weight[2] = 1e-9
    res = finetune(m, make_dataset(), recipe="linear-probe", **FAST)
    assert np.isnan(res.filter_cosine[2]) and np.sum(np.isnan(res.filter_cosine)) == 1


def test_discriminative_lrs_geometric_and_linear_probe_keeps_backbone():
    m = make_model()
    res = finetune(m, make_dataset(), recipe="discriminative", epochs=1, lr=1e-2, **FAST)
    lrs = np.array(list(res.config["stage_lr"].values()))
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-2)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (100.0) ** (1 / (len(lrs) - 1)))
    assert res.snapshots == ("pretrained", "probe", "epoch1")
    lp = finetune(m, make_dataset(), recipe="linear-probe", **FAST)
    assert lp.snapshots == ("pretrained", "probe") and lp.unfreeze_step == -1
    assert np.all(lp.weight_change[:, :-1] == 0) and lp.weight_change[-1, -1] > 0


def test_stats_tagged_by_phase_and_step_counts_match_batches():
    m = make_model()
    seen = []

    class Rec:
        def on_batch_end(self, rec):
            seen.append(rec)

        def on_end(self, info):
            raise RuntimeError("broken teardown")  # must not escape

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = finetune(m, make_dataset(60, 30), recipe="lp-ft", epochs=2, callbacks=[Rec()], **FAST)
    assert any("broken teardown" in str(x.message) for x in w)
    phase, part = np.array(res.log_phase), np.array(res.log_part)
    n_iter = res.config["probe_iterations"]  # full-batch L-BFGS: one batch per iteration
    tr = (phase == "train") & (part == "finetune")
    va = (phase == "val") & (part == "finetune")
    assert tr.sum() == 2 * math.ceil(60 / 16) and va.sum() == 2 * math.ceil(30 / 16)
    assert ((phase == "train") & (part == "probe")).sum() == n_iter
    assert np.all(res.log_size[(phase == "train") & (part == "probe")] == 60)
    n_val = len(set(res.log_step[(phase == "val") & (part == "probe")]))
    assert n_val >= 1 and ((phase == "val") & (part == "probe")).sum() == n_val * math.ceil(30 / 16)
    assert np.all(np.diff(res.log_step[phase == "train"]) == 1)  # one step per train batch
    for ep in (1, 2):  # validation tagged with the step at which it ran
        last = res.log_step[tr & (res.log_epoch == ep)].max()
        assert np.all(res.log_step[va & (res.log_epoch == ep)] == last)
    assert res.log_size[va].sum() == 2 * 30
    assert len(seen) == len(res.log_phase)
    assert np.all(np.isfinite(res.log_act_mean[tr])) and np.all(np.isnan(res.log_act_mean[part == "probe"]))


def test_error_mid_training_propagates_and_teardown_is_clean():
    m = make_model()
    hooks_before = sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())
    ended = []

    class Boom:
        def on_batch_end(self, rec):
            if rec["part"] == "finetune":
                raise KeyError("stop here")

        def on_end(self, info):
            ended.append(info)

    with pytest.raises(KeyError, match="stop here"):
        finetune(m, make_dataset(), recipe="lp-ft", callbacks=[Boom()], **FAST)
    assert ended  # on_end ran
    assert sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()) == hooks_before


def test_seeded_runs_are_reproducible_and_leave_global_rng(tmp_path):
    m = make_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = finetune(m, make_dataset(), recipe="lp-ft", epochs=1, **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    b = finetune(m, make_dataset(), recipe="lp-ft", epochs=1, **FAST)
    np.testing.assert_array_equal(a.weight_change, b.weight_change)
    a.save(tmp_path / "r")
    c = FinetuneResult.load(tmp_path / "r")
    np.testing.assert_array_equal(c.weight_change, a.weight_change)
    assert c.stages == a.stages and c.log_phase == a.log_phase and c.config["recipe"] == "lp-ft"
    for f in ("stages.csv", "params.csv", "log.csv", "steps.csv", "filters.csv", "stage_probe.csv"):
        assert (tmp_path / "r" / f).stat().st_size > 0


def test_bad_input():
    m, ds = make_model(), make_dataset()
    with pytest.raises(ValueError, match="unknown recipe"):
        finetune(m, ds, recipe="magic", **FAST)
    with pytest.raises(ValueError, match="freeze_to"):
        finetune(m, ds, recipe="freeze-to", **FAST)
    with pytest.raises(ValueError, match="bn must be"):
        finetune(m, ds, bn="train", **FAST)
    with pytest.raises(TypeError, match="Dataset"):
        finetune(m, (ds.x_train, ds.y_train), **FAST)
    with pytest.raises(ValueError, match="linear classifier"):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


@pytest.mark.slow
def test_acceptance_default_model_full_control_on_digits():
    """Issue 4 acceptance: uniform-lr control on digits (64 px), fixed seed."""
    from vizlearn.datasets import digits
    from vizlearn.models import load_model

    loaded = load_model()
    res = finetune(loaded, digits(64, seed=0), recipe="full", epochs=3, lr=1e-3, seed=0,
                   natural_images=False, stage_probe=False, progress=False)
    first = res.param("conv_stem.weight")
    last = res.param("conv_head.weight")
    g = {s: i for i, s in enumerate(res.stages)}
    mid = res.stages[(len(res.stages) - 1) // 2]
    print(f"\nfirst conv r={first:.5f} last conv r={last:.5f} ratio={last / first:.1f} "
          f"CKA stem={res.cka_target[-1, g['stem']]:.4f} mid({mid})={res.cka_target[-1, g[mid]]:.4f} "
          f"conv_head={res.cka_target[-1, g['conv_head']]:.4f} acc={res.accuracy[-1]:.4f}")
    assert first < 0.01
    assert last > 5 * first
    assert res.cka_target[-1, g["stem"]] > 0.99
    assert res.cka_target[-1, g["conv_head"]] <= res.cka_target[-1, g[mid]] - 0.1
    assert res.accuracy[-1] >= 0.93


def test_figures_draw_from_a_result_and_from_its_saved_copy(tmp_path):
    from matplotlib.figure import Figure

    from vizlearn import plot_finetune as pf

    m = make_model()
    ds = make_dataset()
    kw = dict(FAST, stage_probe=True)
    a = finetune(m, ds, recipe="lp-ft", epochs=1, **kw)
    b = finetune(m, ds, recipe="full", epochs=1, **FAST)
    c = finetune(m, ds, recipe="lp-ft", epochs=1, bn="update", **FAST)
    a.save(tmp_path / "a")
    a = FinetuneResult.load(tmp_path / "a")
    figs = [pf.drift_profile({"lp-ft": a, "full": b}), pf.cka_profile(a), pf.first_layer_filters(a),
            pf.drift_over_steps(a), pf.drift_over_steps(b), pf.topk_before_after(a), pf.bn_pitfall(a, c),
            pf.recipe_comparison({"lp-ft": a, "full": b}), pf.stage_probe_accuracy(a)]
    assert all(isinstance(f, Figure) for f in figs)
    assert a.unit_stage == ("stem", "conv_head") and a.unit_before.shape == (2, 9)


def test_feature_evolution_callback_records_each_finetune_epoch():
    """Issue 6: the Fig.-4 callback plugs into vizlearn.finetune and sees the model being trained."""
    from vizlearn.evolution import FeatureEvolution

    m, ds = make_model(), make_dataset()
    probe = (torch.from_numpy(ds.x_test[:6]).permute(0, 3, 1, 2) - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    cb = FeatureEvolution(probe, ["conv_stem"], epochs=(1, 2), units_per_layer=2, mean=MEAN, std=STD)
    res = finetune(m, ds, recipe="full", epochs=2, callbacks=[cb], **FAST)
    evo = cb.result()
    assert evo.epochs.tolist() == [1, 2]
    assert evo.projection.shape[:2] == (2, 2) and np.isfinite(evo.projection).all()
    # the callback saw the fine-tuned copy: its last snapshot matches a fresh recording of res.model
    fresh = FeatureEvolution(probe, ["conv_stem"], epochs=(2,), units_per_layer=2, mean=MEAN, std=STD)
    fresh.on_epoch_end(res.model, 2)
    np.testing.assert_allclose(fresh.result().score[0], evo.score[-1], rtol=1e-5)
