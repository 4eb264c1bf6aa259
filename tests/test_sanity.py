"""Cascading-randomisation sanity check (Adebayo et al. 2018)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from vizlearn import SanityResult, sanity_check
from vizlearn.plot import plot_sanity
from vizlearn.sanity import _similarity


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ReLU()).eval()


def _images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 24, 24, generator=g)


def test_cascade_steps_and_similarity():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    rng_before = torch.random.get_rng_state()
    res = sanity_check(net, _images(), "7", channel=2)
    # layers with parameters below layer "7", top down: conv 6, bn 4, conv 3, conv 0
    assert res.steps == ("original", "6", "4", "3", "0")
    assert res.ssim.shape == res.spearman.shape == (5, 3)
    assert res.projections.shape == (5, 3, 24, 24, 3)
    np.testing.assert_allclose(res.ssim[0], 1.0)
    np.testing.assert_allclose(res.spearman[0], 1.0)
    # randomising the weights changes the picture: clearly lower similarity after the first step
    assert (res.ssim[1:].mean(1) < 0.9).all() and (res.spearman[1:].mean(1) < 0.9).all()
    assert res.ssim[-1].mean() < 0.5
    # caller's model and global RNG untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    # deterministic for a seed
    again = sanity_check(net, _images(), "7", channel=2)
    np.testing.assert_array_equal(res.ssim, again.ssim)


def test_similarity_hand_checkable():
    a = np.zeros((3, 9, 9))
    a[0, 4, 4] = 1.0
    a[1, 2, 2] = -0.5
    s, r = _similarity(a, a)
    assert s == pytest.approx(1.0) and r == pytest.approx(1.0)
    s2, r2 = _similarity(a, 3 * a)  # scale-invariant (maps normalised by max)
    assert s2 == pytest.approx(1.0) and r2 == pytest.approx(1.0)
    s3, r3 = _similarity(a, -a)  # sign ignored (magnitudes)
    assert s3 == pytest.approx(1.0) and r3 == pytest.approx(1.0)
    b = np.zeros_like(a)  # dead projection: rank correlation 0, no NaN
    s4, r4 = _similarity(a, b)
    assert np.isfinite(s4) and s4 < 0.5 and r4 == 0.0
    # oracle: Spearman = Pearson of the ranks of the magnitudes
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 8, 8)), rng.normal(size=(3, 8, 8))
    mx, my = np.abs(x).sum(0).ravel(), np.abs(y).sum(0).ravel()
    rx, ry = np.argsort(np.argsort(mx)), np.argsort(np.argsort(my))
    assert _similarity(x, y)[1] == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_default_channel_grouping_save_load_and_plot(tmp_path):
    res = sanity_check(_net(), _images(), "5", method="guided", max_steps=2)
    assert len(res.steps) == 3 and res.steps[1] == "4 .. 3" and res.steps[2] == "0"
    path = res.save(tmp_path / "sanity")
    back = SanityResult.load(path)
    assert back.steps == res.steps and back.channel == res.channel and back.method == "guided"
    np.testing.assert_array_equal(back.ssim, res.ssim)
    np.testing.assert_array_equal(back.projections, res.projections)
    fig = plot_sanity(back, image=1)
    assert len(fig.axes) == 1 + len(res.steps)


def test_bad_input():
    net, x = _net(), _images()
    with pytest.raises(ValueError, match="method"):
        sanity_check(net, x, "7", method="saliency")
    with pytest.raises(ValueError, match="6 channels"):
        sanity_check(net, x, "7", channel=6)
    with pytest.raises(ValueError, match="unknown layer"):
        sanity_check(net, x, "77")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sanity_check(net, x[0], "7")
    with pytest.raises(ValueError, match="max_steps"):
        sanity_check(net, x, "7", max_steps=0)
    with pytest.raises(ValueError, match="nothing to randomise"):
        sanity_check(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 2, 1)), x, "0")
    with pytest.raises(ValueError, match="image"):
        plot_sanity(sanity_check(net, x[:1], "3", max_steps=1), image=4)
