"""Occlusion sensitivity: naive-loop oracle, odd sizes, pixel-space fill, chunk invariance, bad input."""
import numpy as np
import pytest
import torch
from torch import nn

from vizlearn.occlusion import OcclusionResult, occlusion, window_starts, windows_to_map


def _gap_net(seed=0, classes=5):
    """Works on any input size: conv -> ReLU -> conv -> ReLU -> global average pool -> linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def _naive(model, x, size, stride, fill_norm, target, layer_idx=None, channel=None):
    """Window by window, one forward each, explicit per-pixel sums and counts."""
    _, c, h, w = x.shape
    rows = list(range(0, h - size + 1, stride))
    if rows[-1] + size < h:
        rows.append(h - size)
    cols = list(range(0, w - size + 1, stride))
    if cols[-1] + size < w:
        cols.append(w - size)
    with torch.no_grad():
        k = model(x).shape[1]
        psum = np.zeros((h, w, k))
        asum = np.zeros((h, w))
        cnt = np.zeros((h, w))
        for y0 in rows:
            for x0 in cols:
                xo = x.clone()
                for ch in range(c):
                    xo[0, ch, y0:y0 + size, x0:x0 + size] = fill_norm[ch]
                p = torch.softmax(model(xo), 1)[0].numpy()
                psum[y0:y0 + size, x0:x0 + size] += p
                cnt[y0:y0 + size, x0:x0 + size] += 1
                if layer_idx is not None:
                    a = model[:layer_idx + 1](xo)[0, channel].sum().item()
                    asum[y0:y0 + size, x0:x0 + size] += a
    pav = psum / cnt[:, :, None]
    return pav[:, :, target], pav.argmax(-1), asum / cnt


def test_equals_naive_loop_odd_nonsquare():
    model = _gap_net().eval()
    rng = np.random.default_rng(0)
    img = rng.random((37, 53, 3)).astype(np.float32)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    res = occlusion(model, img, size=7, stride=4, fill=0.5, mean=mean, std=std, layer="4",
                    chunk=16, project_strongest=False)
    assert res.prob.shape == (37, 53) and res.label.shape == (37, 53) and res.activity.shape == (37, 53)
    assert res.covered.all() and res.uncovered == 0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    fill_norm = [(0.5 - m) / s for m, s in zip(mean, std)]
    with torch.no_grad():
        base = torch.softmax(model(x), 1)[0]
        fmap = model[:5](x)[0]
    target = int(base.argmax())
    channel = int(fmap.flatten(1).amax(1).argmax())
    p, lab, act = _naive(model, x, 7, 4, fill_norm, target, layer_idx=4, channel=channel)
    assert res.target == target and res.channel == channel
    np.testing.assert_allclose(res.prob, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.label, lab)
    np.testing.assert_allclose(res.activity, act, rtol=1e-5, atol=1e-5)
    assert res.base_prob == pytest.approx(float(base[target]), rel=1e-6)


def test_fill_is_pixel_space_value():
    model = _gap_net().eval()
    img = np.random.default_rng(1).random((20, 24, 3)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    seen = []
    h = model[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    try:
        res = occlusion(model, img, size=5, stride=5, fill=(0.2, 0.7, 0.9), mean=mean, std=std, chunk=7)
    finally:
        h.remove()
    batch = torch.cat(seen[1:])  # seen[0] is the unoccluded image
    assert batch.shape[0] == len(res.rows) * len(res.cols)
    pix = batch * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    # window 0 at (0, 0): the patch is the fill in pixel space, the rest is the image
    np.testing.assert_allclose(pix[0, :, :5, :5].numpy(),
                               np.broadcast_to(np.array([0.2, 0.7, 0.9])[:, None, None], (3, 5, 5)), atol=1e-6)
    np.testing.assert_allclose(pix[0, :, 5:, :].permute(1, 2, 0).numpy(), img[5:], atol=1e-6)
    # the last window is flush with the bottom-right corner
    np.testing.assert_allclose(pix[-1, :, -5:, -5:].numpy()[:, 0, 0], [0.2, 0.7, 0.9], atol=1e-6)


def test_chunk_size_does_not_change_result_and_model_untouched():
    model = _gap_net().train()
    model[1].inplace = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    img = np.random.default_rng(2).random((19, 23, 3)).astype(np.float32)
    a = occlusion(model, img, size=6, stride=3, chunk=1, layer="1", project_strongest=False)
    b = occlusion(model, img, size=6, stride=3, chunk=1000, layer="1", project_strongest=False)
    np.testing.assert_allclose(a.prob, b.prob, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.activity, b.activity, rtol=1e-6, atol=1e-5)
    assert model.training and model[1].inplace
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_windows_to_map_hand_case_and_uncovered():
    # 1-D-like: length 5, size 2, stride 2 without alignment -> pixel 4 uncovered
    assert window_starts(5, 2, 2, align_last=False).tolist() == [0, 2]
    assert window_starts(5, 2, 2).tolist() == [0, 2, 3]
    rows = np.array([0]); cols = np.array([0, 2, 3])
    m = windows_to_map(np.array([[1.0, 2.0, 4.0]]), rows, cols, 2, (2, 5))
    np.testing.assert_allclose(m[0], [1, 1, 2, 3, 4])  # pixel 3: mean of windows 2 and 3
    m2 = windows_to_map(np.array([[1.0, 2.0]]), rows, np.array([0, 2]), 2, (2, 5))
    assert np.isnan(m2[0, 4]) and not np.isnan(m2[0, 3])


def test_uncovered_pixels_reported():
    model = _gap_net().eval()
    img = np.random.default_rng(3).random((11, 13, 3)).astype(np.float32)
    r = occlusion(model, img, size=4, stride=4, align_last=False)
    assert r.uncovered == 11 * 13 - 8 * 12
    assert np.isnan(r.prob[~r.covered]).all() and (r.label[~r.covered] == -1).all()


def test_tensor_input_save_load(tmp_path, tiny_convnet, tiny_images):
    r = occlusion(tiny_convnet, tiny_images[0], size=4, stride=2, layer="3", project_strongest=False,
                  name="t")
    assert r.prob.shape == (16, 16)
    path = r.save(tmp_path / "occ")
    r2 = OcclusionResult.load(path)
    np.testing.assert_array_equal(r.prob, r2.prob)
    np.testing.assert_array_equal(r.label, r2.label)
    assert r2.fill == r.fill and r2.position == r.position and r2.projection is None and r2.name == "t"


def test_bad_input(tiny_convnet, tiny_images):
    with pytest.raises(ValueError, match="does not fit"):
        occlusion(tiny_convnet, tiny_images[0], size=17)
    with pytest.raises(ValueError, match="one image"):
        occlusion(tiny_convnet, tiny_images, size=4)
    with pytest.raises(TypeError):
        occlusion(tiny_convnet, [[0.0]], size=4)
    with pytest.raises(ValueError, match="fill has"):
        occlusion(tiny_convnet, tiny_images[0], size=4, fill=(0.1, 0.2))
    with pytest.raises(ValueError, match="out of range"):
        occlusion(tiny_convnet, tiny_images[0], size=4, target=10)
    with pytest.raises(ValueError, match="chunk"):
        occlusion(tiny_convnet, tiny_images[0], size=4, chunk=0)
    with pytest.raises(ValueError, match="unknown layer"):
        occlusion(tiny_convnet, tiny_images[0], size=4, layer="nope")


def test_runner_writes_figure_and_results(tmp_path, tiny_convnet):
    from matplotlib.figure import Figure

    from vizlearn.occlusion import run_occlusion
    from vizlearn.plot_experiments import plot_occlusion

    img = np.random.default_rng(4).random((20, 30, 3)).astype(np.float32)
    rs = run_occlusion(tiny_convnet, [("rand", img)], tmp_path, input_size=16, size=4, stride=2, layer="3")
    assert (tmp_path / "occlusion.png").is_file() and (tmp_path / "occlusion_rand.npz").is_file()
    assert rs[0].projection.shape == (16, 16, 3)
    assert isinstance(plot_occlusion(rs[0]), Figure)
