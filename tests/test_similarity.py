"""CKA: published reference values, naive oracles, invariances, bad input."""
import warnings

import numpy as np
import pytest
import torch

from vizlearn.similarity import (
    MinibatchCKA,
    debiased_linear_cka,
    flatten_features,
    linear_cka,
    minibatch_cka,
    rbf_cka,
)


@pytest.fixture
def xy():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


# ---- naive oracles written from the formulas (not from the module) ----
def naive_hsic_biased(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def naive_hsic_unbiased(k, l):
    """Song et al. 2012, eq. (5): the three-term estimator with zero-diagonal Grams."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    term = np.trace(kt @ lt)
    term += (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term -= 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return term / (n * (n - 3))


def naive_cka(k, l, hsic):
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_reference_values(xy):
    x, y = xy
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=1e-4)
    assert debiased_linear_cka(x, y) == pytest.approx(0.51346, abs=1e-4)
    assert rbf_cka(x, y, fraction=0.5) == pytest.approx(0.65483, abs=1e-4)
    assert minibatch_cka([(x, y)]) == pytest.approx(0.51346, abs=1e-4)
    batches = [(x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)]
    assert minibatch_cka(batches) == pytest.approx(0.51327, abs=1e-4)


def test_against_naive_oracles(xy):
    x, y = xy
    x = x[:40] @ np.random.RandomState(0).randn(10, 30)  # more features than examples: Gram path
    y = y[:40]
    k, l = x @ x.T, y @ y.T
    assert linear_cka(x, y) == pytest.approx(naive_cka(k, l, naive_hsic_biased), abs=1e-10)
    assert debiased_linear_cka(x, y) == pytest.approx(naive_cka(k, l, naive_hsic_unbiased), abs=1e-10)
    # one-batch accumulator equals the debiased value
    acc = MinibatchCKA()
    acc.update(x, y)
    assert acc.value() == pytest.approx(debiased_linear_cka(x, y), abs=1e-12)


def test_hand_checkable():
    # Y = 2X: identical up to isotropic scaling -> 1; X against an orthogonal feature -> 0
    x = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    y = np.array([[1.0], [1.0], [-1.0], [-1.0]])
    assert linear_cka(x, 2 * x) == pytest.approx(1.0)
    assert linear_cka(x, y) == pytest.approx(0.0, abs=1e-12)


def test_invariances(xy):
    x, y = xy
    base = linear_cka(x, y)
    q, _ = np.linalg.qr(np.random.RandomState(1).randn(10, 10))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert debiased_linear_cka(x @ q * 5, y) == pytest.approx(debiased_linear_cka(x, y), abs=1e-10)
    assert linear_cka(x + 100.0, y) == pytest.approx(base, abs=1e-8)  # centring
    # per-channel (anisotropic) scaling is NOT an invariance
    d = np.diag(np.linspace(0.1, 10, 10))
    assert abs(linear_cka(x @ d, y) - base) > 1e-2
    for f in (linear_cka, debiased_linear_cka, rbf_cka):
        assert f(x, x) == pytest.approx(1.0, abs=1e-12)


def test_float32_and_torch_inputs_match_float64(xy):
    x, y = xy
    relu = np.maximum(x, 0) + 5.0  # uncentred, post-ReLU-like
    a = linear_cka(torch.tensor(relu, dtype=torch.float32), y.astype(np.float32))
    assert a == pytest.approx(linear_cka(relu, y), abs=1e-6)


def test_flatten_features():
    maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    assert flatten_features(maps).shape == (2, 12)
    pooled = flatten_features(torch.tensor(maps), pool=True)
    np.testing.assert_allclose(pooled, maps.mean(axis=(2, 3)))
    assert pooled.dtype == np.float64
    with pytest.raises(ValueError):
        flatten_features(np.zeros(5))


def test_bad_input(xy):
    x, y = xy
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(x, y[:50])
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(x.reshape(100, 2, 5), y)
    with pytest.raises(ValueError, match="at least 4"):
        debiased_linear_cka(x[:3], y[:3])
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(np.full((4, 2), np.nan), y[:4])
    with pytest.raises(ValueError):
        MinibatchCKA().value()


def test_negative_unbiased_hsic_is_clamped_with_warning():
    rng = np.random.RandomState(3)
    for _ in range(200):  # find independent samples with a negative HSIC_1 estimate
        x, y = rng.randn(6, 1), rng.randn(6, 1)
        xc, yc = x - x.mean(), y - y.mean()
        if naive_hsic_unbiased(xc @ xc.T, yc @ yc.T) < 0:
            break
    else:
        pytest.fail("no negative estimate found")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert debiased_linear_cka(x, y) == 0.0
    assert any("negative" in str(m.message) for m in w)
