"""Built-in offline data sets: shapes, ranges, stratified seeded splits, folders with bad files."""
import warnings

import numpy as np
import pytest
from PIL import Image

from vizlearn.datasets import Dataset, _split, digits, image_folder, lfw, load_dataset


def test_split_hand_checkable():
    labels = np.array([0] * 10 + [1] * 5)
    x = np.arange(15)
    xtr, ytr, xte, yte = _split(x, labels, test_fraction=0.2, seed=0)
    assert np.bincount(yte).tolist() == [2, 1] and np.bincount(ytr).tolist() == [8, 4]
    assert sorted(np.r_[xtr, xte].tolist()) == list(range(15))  # a partition
    again = _split(x, labels, test_fraction=0.2, seed=0)
    assert np.array_equal(again[2], xte)
    other = _split(x, labels, test_fraction=0.2, seed=1)
    assert not np.array_equal(other[2], xte)


def test_digits():
    d = digits(32, seed=0)
    assert isinstance(d, Dataset) and d.classes == tuple("0123456789")
    assert d.x_train.shape[1:] == (32, 32, 3) and d.x_train.dtype == np.float32
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and d.x_train.max() > 0.9
    np.testing.assert_array_equal(d.x_train[..., 0], d.x_train[..., 2])  # grey in 3 channels
    frac = np.bincount(d.y_test, minlength=10) / np.bincount(np.r_[d.y_train, d.y_test], minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.02)  # stratified
    # oracle: the mean of each upsampled image equals the mean of the 8x8 original / 16 (approx.)
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0
    assert np.isclose(np.r_[d.x_train, d.x_test][..., 0].mean(), raw.mean(), atol=0.01)


def test_lfw():
    d = lfw(32)
    assert d.classes == ("non-face", "face") and d.x_test.shape == (40, 32, 32, 3)
    assert np.bincount(d.y_test).tolist() == [20, 20]


def _png(path, colour, mode="RGB"):
    Image.new(mode, (20, 12), colour).save(path)


def test_image_folder_with_bad_files(tmp_path):
    for c, col in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", col)
    (tmp_path / "cats" / "broken.png").write_text("not an image")
    (tmp_path / "dogs" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = image_folder(tmp_path, 16, test_fraction=0.4)
    msgs = [str(m.message) for m in w if "skipped" in str(m.message)]
    assert len(msgs) == 1 and "broken.png" in msgs[0] and "empty.jpg" in msgs[0]
    assert set(d.skipped) == {"cats/broken.png", "dogs/empty.jpg"}
    assert d.classes == ("cats", "dogs") and len(d.y_train) + len(d.y_test) == 10
    red = d.x_train[d.y_train == 0]
    np.testing.assert_allclose(red[..., 0], 1.0, atol=1e-6)  # a red image stays red
    np.testing.assert_allclose(red[..., 2], 0.0, atol=1e-6)
    with pytest.warns(UserWarning, match="skipped 2"):
        assert load_dataset(str(tmp_path), 16).classes == ("cats", "dogs")


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="size"):
        digits(4)
    with pytest.raises(ValueError, match="test_fraction"):
        digits(32, test_fraction=1.5)
    with pytest.raises(ValueError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="one sub-folder per class"):
        image_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
