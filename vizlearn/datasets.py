"""Small labelled image data sets for fine-tuning, all offline.

- :func:`digits` -- scikit-learn's handwritten digits (1,797 images of 8x8, 10 classes),
  upsampled bilinearly to ``size`` and repeated to 3 channels (white strokes on black).
- :func:`lfw` -- scikit-image's ``lfw_subset`` (200 images of 25x25: 100 faces, 100 non-faces).
- :func:`image_folder` -- any folder with one sub-folder per class (torchvision ``ImageFolder``
  convention); images are centre-cropped to a square and resized; unreadable files are skipped
  with one warning that lists them.

Each returns a frozen :class:`Dataset` with a stratified train/test split drawn with a fixed
seed: images (N, H, W, 3) float32 in [0, 1], labels (N,) int64, and the class names.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "digits", "lfw", "image_folder", "load_dataset", "DATASETS"]


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set split into train and test parts."""

    name: str
    x_train: np.ndarray  # (N_train, H, W, 3) float32 in [0, 1]
    y_train: np.ndarray  # (N_train,) int64 in [0, len(classes))
    x_test: np.ndarray  # (N_test, H, W, 3) float32 in [0, 1]
    y_test: np.ndarray  # (N_test,) int64
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # files that could not be read (image_folder only)

    @property
    def size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"size={self.size}, classes={len(self.classes)})"
        )


def _check(size: int, test_fraction: float) -> None:
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8 (pixels), got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _split(images, labels, *, test_fraction: float, seed: int):
    """Stratified split: per class, a seeded permutation; round(test_fraction * n_c) go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train = np.sort(np.concatenate(train))
    test = np.sort(np.concatenate(test))
    return images[train], labels[train], images[test], labels[test]


def _resize_gray(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) in [0, 1] -> (N, size, size, 3) float32, bilinear."""
    from .images import resize_batch

    return np.repeat(resize_batch(images[..., None], size), 3, axis=-1)


def digits(size: int = 64, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn digits upsampled to ``size`` px, 3 channels, values in [0, 1] (stroke = 1)."""
    from sklearn.datasets import load_digits

    _check(size, test_fraction)
    d = load_digits()
    x = _resize_gray(d.images / 16.0, size)
    y = d.target.astype(np.int64)
    parts = _split(x, y, test_fraction=test_fraction, seed=seed)
    return Dataset("digits", *parts, classes=tuple(str(c) for c in range(10)))


def lfw(size: int = 64, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-image ``lfw_subset``: 100 face and 100 non-face crops (25x25 grey), classes
    ``("non-face", "face")``, upsampled to ``size`` px and repeated to 3 channels."""
    from skimage.data import lfw_subset

    _check(size, test_fraction)
    imgs = lfw_subset()  # first 100 faces, then 100 non-faces
    y = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    x = _resize_gray(imgs, size)
    parts = _split(x, y, test_fraction=test_fraction, seed=seed)
    return Dataset("lfw", *parts, classes=("non-face", "face"))


def _square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to ``size`` (:func:`vizlearn.images.resize_batch`)."""
    from .images import resize_batch

    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return resize_batch(img[None, y0 : y0 + s, x0 : x0 + s], size)[0]


def image_folder(path, size: int = 64, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Images in ``path/<class>/*`` (torchvision ``ImageFolder`` layout), classes sorted by name.

    Each image is converted to RGB in [0, 1] (by :func:`vizlearn.images.load_folder`), centre-
    cropped to a square and resized to ``size``. Files that cannot be read are skipped; a single
    warning lists them and ``Dataset.skipped`` keeps them. Every class needs >= 2 images.
    """
    from .images import load_folder

    _check(size, test_fraction)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"image folder {path!r} does not exist or is not a directory")
    classes = sorted(
        d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
    )
    if len(classes) < 2:
        raise ValueError(
            f"{path!r} needs one sub-folder per class (at least 2, ImageFolder layout: "
            f"{path}/<class>/<image>); found {len(classes)}"
        )
    xs, ys, skipped = [], [], []
    for c, name in enumerate(classes):
        with warnings.catch_warnings():  # one warning for the whole data set, below
            warnings.simplefilter("ignore")
            try:
                photos, bad = load_folder(os.path.join(path, name))
            except ValueError:  # no readable image in this class folder
                photos, bad = [], []
        skipped.extend(os.path.join(name, os.path.basename(str(b))) for b in bad)
        if len(photos) < 2:
            raise ValueError(f"class folder {name!r} has {len(photos)} readable image(s); need >= 2")
        for _, img in photos:
            xs.append(_square_resize(np.asarray(img, dtype=np.float32), size))
            ys.append(c)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable file(s) in {path!r}: {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    x = np.stack(xs).astype(np.float32)
    y = np.asarray(ys, dtype=np.int64)
    parts = _split(x, y, test_fraction=test_fraction, seed=seed)
    return Dataset(os.path.basename(os.path.normpath(path)), *parts, classes=tuple(classes),
                   skipped=tuple(skipped))


DATASETS = {"digits": digits, "lfw": lfw}


def load_dataset(name_or_path, size: int = 64, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """``"digits"``, ``"lfw"`` or a folder path (ImageFolder layout)."""
    if isinstance(name_or_path, Dataset):
        return name_or_path
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS[key](size, seed=seed, test_fraction=test_fraction)
    if os.path.isdir(key):
        return image_folder(key, size, seed=seed, test_fraction=test_fraction)
    raise ValueError(
        f"unknown dataset {key!r}: use one of {sorted(DATASETS)} or a folder with one sub-folder per class"
    )
