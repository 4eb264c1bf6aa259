"""Invariance sweeps: identity steps, hand-computed distances for a 1x1-conv + pooling model, bad input."""
import numpy as np
import pytest
import torch
from torch import nn

from vizlearn.invariance import InvarianceResult, invariance, transform_images


def _pool_model():
    """1x1 conv (fixed weights) -> global average pool -> linear: the pooled feature ignores pixel order."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -0.5, 0.25], [0.5, 1.0, -1.0]]).view(2, 3, 1, 1))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4)).eval()


def _imgs(n=2, h=12, w=12, seed=0):
    return np.random.default_rng(seed).random((n, h, w, 3)).astype(np.float32)


def test_identity_steps_give_zero_distance_and_original_probability():
    model = _pool_model()
    imgs = _imgs()
    res = invariance(model, imgs, layers=["0", "1"], steps={"translate": [0], "scale": [1.0], "rotate": [0, 360]})
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    top = p.argmax(1)
    for t in res.transforms:
        assert (res.distance[t] == 0).all()
        np.testing.assert_allclose(res.prob[t], np.broadcast_to(p[torch.arange(2), top].numpy(), res.prob[t].shape),
                                   rtol=1e-6)
    np.testing.assert_array_equal(res.label, top.numpy())


def test_hand_computed_distances_rotation_and_translation():
    model = _pool_model()
    imgs = _imgs()
    w = model[0].weight.detach().numpy()[:, :, 0, 0]  # (2, 3)
    res = invariance(model, imgs, layers=["0", "1"], transforms=("rotate", "translate"),
                     steps={"rotate": [180], "translate": [3, -2]}, fill=0.5)

    def conv(a):  # (H, W, 3) -> (2, H, W) 1x1 convolution
        return np.einsum("oc,hwc->ohw", w, a)

    for n in range(2):
        f = conv(imgs[n])
        fr = conv(imgs[n][::-1, ::-1])
        d = np.linalg.norm(fr - f) / np.linalg.norm(f)
        assert res.distance["rotate"][0, n, 0] == pytest.approx(d, rel=1e-5)
        assert res.distance["rotate"][0, n, 1] == pytest.approx(0.0, abs=1e-6)  # pooled: order-free
        for s, dy in enumerate([3, -2]):
            shifted = np.full_like(imgs[n], 0.5)
            if dy > 0:
                shifted[dy:] = imgs[n][:-dy]
            else:
                shifted[:dy] = imgs[n][-dy:]
            ft = conv(shifted)
            assert res.distance["translate"][s, n, 0] == pytest.approx(np.linalg.norm(ft - f) / np.linalg.norm(f),
                                                                        rel=1e-5)
            g0, gt = f.mean((1, 2)), ft.mean((1, 2))
            assert res.distance["translate"][s, n, 1] == pytest.approx(np.linalg.norm(gt - g0) / np.linalg.norm(g0),
                                                                        rel=1e-4)


def test_bilinear_rotation_and_scale_run_and_save(tmp_path, tiny_convnet):
    imgs = [("a", _imgs(1, 16, 16)[0]), ("b", _imgs(1, 16, 16, seed=1)[0])]
    model = tiny_convnet.train()
    res = invariance(model, imgs, layers=["1", "6"], steps={"scale": [0.8, 1.0, 1.3], "rotate": [0, 30]},
                     transforms=("scale", "rotate"))
    assert model.training
    assert res.names == ("a", "b") and res.distance["scale"].shape == (3, 2, 2)
    assert (res.distance["scale"][1] == 0).all() and (res.distance["scale"][0] > 0).all()
    r2 = InvarianceResult.load(res.save(tmp_path / "inv"))
    np.testing.assert_array_equal(r2.distance["rotate"], res.distance["rotate"])
    assert r2.layers == res.layers and r2.names == res.names


def test_transform_images_translate_exact():
    x = torch.arange(2 * 1 * 4 * 3, dtype=torch.float32).view(2, 1, 4, 3)
    y = transform_images(x, "translate", 1, [-1.0])
    assert torch.equal(y[:, :, 1:], x[:, :, :3]) and (y[:, :, 0] == -1).all()
    assert transform_images(x, "rotate", 0, [0.0]) is x


def test_bad_input():
    model = _pool_model()
    with pytest.raises(ValueError, match="unknown transform"):
        invariance(model, _imgs(), layers=["0"], transforms=("shear",))
    with pytest.raises(ValueError, match="same size"):
        invariance(model, [_imgs(1, 8, 8)[0], _imgs(1, 9, 8)[0]], layers=["0"])
    with pytest.raises(ValueError, match="whole number"):
        invariance(model, _imgs(), layers=["0"], transforms=("translate",), steps={"translate": [1.5]})
    with pytest.raises(ValueError, match="at least one layer"):
        invariance(model, _imgs(), layers=[])
    with pytest.raises(ValueError, match="unknown layer"):
        invariance(model, _imgs(), layers=["zz"])
    with pytest.raises(TypeError):
        invariance(model, "photo.png", layers=["0"])


def test_plot_returns_figure():
    from matplotlib.figure import Figure

    from vizlearn.plot_experiments import plot_invariance

    res = invariance(_pool_model(), _imgs(), layers=["0", "1"], steps={"translate": [-2, 0, 2], "scale": [1.0],
                                                                         "rotate": [0, 90]})
    assert isinstance(plot_invariance(res), Figure)
