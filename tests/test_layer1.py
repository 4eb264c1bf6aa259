"""Layer-1 health: spectral bands vs a naive DFT oracle, hand cases, flags, the default model's dead filters."""
import numpy as np
import pytest
import torch
from torch import nn

from vizlearn.layer1 import Layer1Health, band_energy, first_conv, layer1_health


def _checker(k):
    return (np.indices((k, k)).sum(0) % 2 * 2 - 1.0)[None, None]


def test_constant_low_and_checkerboard_high():
    assert band_energy(np.ones((1, 1, 11, 11)))[0, 0] > 0.9
    assert band_energy(_checker(11))[0, 2] > 0.99
    assert band_energy(_checker(3))[0, 2] > 0.95
    np.testing.assert_allclose(band_energy(np.random.default_rng(0).normal(size=(5, 3, 3, 3))).sum(1), 1, rtol=1e-12)


def test_bands_match_naive_dft():
    w = np.random.default_rng(1).normal(size=(2, 2, 3, 3))
    n = 16
    f = np.fft.fftfreq(n)
    got = band_energy(w, n_fft=n)
    for o in range(2):
        e = np.zeros(3)
        for a, fy in enumerate(f):
            for b, fx in enumerate(f):
                p = 0.0
                for c in range(2):
                    s = sum(w[o, c, y, x] * np.exp(-2j * np.pi * (fy * y + fx * x)) for y in range(3) for x in range(3))
                    p += abs(s) ** 2
                rho = np.hypot(fy, fx) / 0.5
                e[0 if rho < 1 / 3 else (1 if rho < 2 / 3 else 2)] += p
        np.testing.assert_allclose(got[o], e / e.sum(), rtol=1e-10)


def test_dead_and_dominant_flags(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 3, 5, 5)).astype(np.float32)
    w[1] = 0
    w[4] *= 1e-6
    w[6] *= 10
    h = layer1_health(torch.from_numpy(w))
    assert h.dead_filters == [1, 4] and h.dominant_filters == [6]
    assert np.isnan(h.bands[1]).all() and np.isfinite(h.bands[0]).all()
    h2 = Layer1Health.load(h.save(tmp_path / "l1"))
    np.testing.assert_array_equal(h2.dead, h.dead)
    assert h2.summary()["dead"] == [1, 4]


def test_model_first_conv(tiny_convnet):
    assert first_conv(tiny_convnet)[0] == "0"
    h = layer1_health(tiny_convnet)
    assert h.layer == "0" and h.weight.shape == (8, 3, 3, 3) and not h.dead.any()


def test_default_model_flags_exactly_the_zero_stem_filters():
    from vizlearn.models import load_model

    loaded = load_model("efficientnet_lite0")
    h = layer1_health(loaded)
    w = loaded.model.conv_stem.weight.detach()
    zero = [i for i in range(w.shape[0]) if w[i].abs().max() < 1e-6]
    assert len(zero) == 4 and h.dead_filters == zero and h.layer == "conv_stem"


def test_bad_input():
    with pytest.raises(ValueError, match="C_in"):
        layer1_health(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        layer1_health(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        layer1_health(np.full((2, 1, 3, 3), np.nan))
    with pytest.raises(ValueError, match="dead_ratio"):
        layer1_health(np.ones((2, 1, 3, 3)), dominant_ratio=0.5)


def test_runner_and_plot(tmp_path, tiny_convnet):
    from matplotlib.figure import Figure

    from vizlearn.layer1 import run_layer1
    from vizlearn.plot_experiments import plot_layer1_health

    h = run_layer1(tiny_convnet, tmp_path)
    assert (tmp_path / "layer1_health.png").is_file() and (tmp_path / "layer1_health_summary.json").is_file()
    assert isinstance(plot_layer1_health(h), Figure)
