"""Correspondence Delta: hand case on an identity layer, naive oracle for random boxes, bad input."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from vizlearn.correspondence import CorrespondenceResult, correspondence, sign_consistency


def _id_model():
    return nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval()


def _flat_images():
    return np.stack([np.full((8, 8, 3), v, np.float32) for v in (0.8, 0.9, 0.2)])


def test_hand_case_identity_layer():
    box = np.array([[2, 2, 5, 6]] * 3)  # 3 x 4 = 12 pixels
    res = correspondence(_id_model(), _flat_images(), {"part": box}, layers=["0"], fill=0.5, n_random=2)
    # eps = x - fill inside the box: + for images 0, 1 and - for image 2; 0 elsewhere.
    # Ordered pairs: (0,1),(1,0) -> 0; the 4 pairs with image 2 -> 12*3/(3*64) = 12/64.
    assert res.delta[0, 0] == pytest.approx(4 * (12 / 64) / 6)
    assert res.delta_std[0, 0] == pytest.approx(np.std([0, 0] + [12 / 64] * 4))
    assert res.table()[0]["part"] == "part"


def test_random_boxes_match_naive_oracle(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((3, 8, 8, 3)).astype(np.float32)
    boxes = np.array([[0, 0, 3, 3], [1, 2, 4, 5], [4, 4, 7, 7]])
    res = correspondence(_id_model(), imgs, {"p": boxes}, layers=["0"], fill=0.3, n_random=3, seed=1)

    def naive(bxs):
        signs = []
        for img, (y0, x0, y1, x1) in zip(imgs, bxs):
            m = img.copy()
            m[y0:y1, x0:x1] = 0.3
            signs.append(np.sign(np.moveaxis(img - m, -1, 0)).ravel())
        d = [np.mean(signs[i] != signs[j]) for i, j in itertools.permutations(range(3), 2)]
        return np.mean(d)

    assert res.delta[0, 0] == pytest.approx(naive(boxes))
    for r in range(3):
        rb = res.random_boxes["p"][r]
        np.testing.assert_array_equal(rb[:, 2:] - rb[:, :2], boxes[:, 2:] - boxes[:, :2])
        assert res.delta_random[0, r, 0] == pytest.approx(naive(rb))
    r2 = CorrespondenceResult.load(res.save(tmp_path / "c"))
    np.testing.assert_array_equal(r2.delta_random, res.delta_random)
    np.testing.assert_array_equal(r2.boxes["p"], boxes)


def test_sign_consistency_bruteforce():
    s = np.random.default_rng(2).integers(-1, 2, size=(4, 30))
    ref = [np.sum(s[i] != s[j]) / 30 for i in range(4) for j in range(4) if i != j]
    m, sd = sign_consistency(s)
    assert m == pytest.approx(np.mean(ref)) and sd == pytest.approx(np.std(ref))


def test_conv_model_runs_and_is_left_as_found(tiny_convnet):
    model = tiny_convnet.train()
    imgs = np.random.default_rng(3).random((3, 16, 16, 3)).astype(np.float32)
    res = correspondence(model, imgs, {"a": [[2, 2, 6, 6]] * 3, "b": [[8, 8, 12, 12]] * 3}, layers=["1", "4"],
                         n_random=2)
    assert model.training
    assert res.delta.shape == (2, 2) and res.delta_random.shape == (2, 2, 2)
    assert ((0 <= res.delta) & (res.delta <= 1)).all()


def test_bad_input():
    m = _id_model()
    imgs = _flat_images()
    with pytest.raises(ValueError, match="boxes must be"):
        correspondence(m, imgs, {"p": [[0, 0, 2, 2]]}, layers=["0"])
    with pytest.raises(ValueError, match="every box"):
        correspondence(m, imgs, {"p": [[0, 0, 9, 2]] * 3}, layers=["0"])
    with pytest.raises(ValueError, match="at least 2"):
        correspondence(m, imgs[:1], {"p": [[0, 0, 2, 2]]}, layers=["0"])
    with pytest.raises(TypeError, match="parts"):
        correspondence(m, imgs, [[0, 0, 2, 2]] * 3, layers=["0"])
    with pytest.raises(ValueError, match="n_random"):
        correspondence(m, imgs, {"p": [[0, 0, 2, 2]] * 3}, layers=["0"], n_random=0)


def test_plot_returns_figure():
    from matplotlib.figure import Figure

    from vizlearn.plot_experiments import plot_correspondence

    res = correspondence(_id_model(), _flat_images(), {"part": [[2, 2, 5, 6]] * 3}, layers=["0"], n_random=2)
    assert isinstance(plot_correspondence(res, images=_flat_images(), note="n"), Figure)
