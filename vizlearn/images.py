"""Image sources and conversions between model input and display.

* :func:`sample_photos` — built-in real colour photos from installed packages (no download).
* :func:`load_folder` — every image under a folder (recursive), converted to RGB float [0, 1].
* :func:`image_set` — whole photos resized to the model input plus optional random crops.
* :func:`to_tensor` — HWC [0, 1] images -> normalised ``(N, C, H, W)`` model input.
* :func:`to_display` — a tensor or array in any common layout -> HWC (or 2-D) float [0, 1].
* :func:`batches` — model-input batches from a tensor, an iterable of batches or an ImageSet.

Conventions: photos are ``(name, array)`` pairs, arrays HWC float32 RGB in [0, 1].
Colour conversions on load: grayscale is repeated to three channels; RGBA, LA and palette
images with transparency are composited on a **white** background; 16-bit images are scaled
by 1/65535 (16-bit RGB PNGs are read at 8-bit precision by Pillow); CMYK and other modes are
converted by Pillow; the EXIF orientation is applied; only the first frame of a multi-frame
file is used.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageSet", "sample_photos", "load_folder", "image_set", "to_tensor", "to_display",
           "batches", "as_rgb", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# real colour photos shipped with scikit-image (name -> file in skimage/data)
_SKIMAGE_PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("coffee", "coffee.png"),
    ("chelsea", "chelsea.png"),
    ("rocket", "rocket.jpg"),
    ("motorcycle", "motorcycle_left.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
)
# and with scikit-learn (optional)
_SKLEARN_PHOTOS = (("china", "china.jpg"), ("flower", "flower.jpg"))


# --------------------------------------------------------------------------------------------
# conversions
def _pil_to_rgb(img) -> np.ndarray:
    """A PIL image (any mode) -> HWC float32 RGB in [0, 1]; transparency composited on white."""
    from PIL import Image

    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 65535.0
        elif mode == "I":
            hi = a.max() if a.size else 0
            a = a / (255.0 if hi <= 255 else 65535.0 if hi <= 65535 else hi)
        else:  # float image: keep [0, 1] data, rescale anything else by its range
            lo, hi = (a.min(), a.max()) if a.size else (0, 1)
            if lo < 0 or hi > 1:
                a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        a = np.clip(a, 0, 1).astype(np.float32)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        a = np.asarray(img).astype(np.float32) / 255.0
        alpha = a[:, :, 3:4]
        return np.ascontiguousarray(a[:, :, :3] * alpha + (1.0 - alpha), dtype=np.float32)
    if mode == "L":
        a = np.asarray(img).astype(np.float32) / 255.0
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img).astype(np.float32) / 255.0


def as_rgb(image) -> np.ndarray:
    """An image array -> HWC float32 RGB in [0, 1].

    Accepts HWC with 1, 3 or 4 channels (RGBA composited on white) or 2-D grayscale; uint8
    (/255), uint16 (/65535), bool, or float data in [0, 1] (tiny rounding excess is clipped).
    A torch tensor is read as CHW (or HWC when unambiguous) via :func:`to_display` rules.
    """
    if isinstance(image, torch.Tensor):
        image = to_display(image)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        raise ValueError(f"expected an HWC image, got shape {a.shape} which looks like CHW; "
                         "use array.transpose(1, 2, 0)")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels or a 2-D grayscale image, "
                         f"got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image of shape {a.shape}")
    a = _scale_to_unit(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[-1] == 4:
        alpha = a[:, :, 3:4]
        a = a[:, :, :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(a, dtype=np.float32)


def _scale_to_unit(a: np.ndarray) -> np.ndarray:
    """Integer/bool/float data -> float32 in [0, 1] (see :func:`as_rgb`)."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer image values must lie in 0..255 (or 0..65535), got {lo}..{hi}")
        return a.astype(np.float32) / (1.0 if hi <= 1 else 255.0 if hi <= 255 else 65535.0)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"unsupported image dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError("image contains NaN or infinite values")
    if a.size and (a.min() < -1e-3 or a.max() > 1 + 1e-3):
        raise ValueError(f"float images must lie in [0, 1], got values in [{a.min():.3g}, {a.max():.3g}]"
                         " (normalised model input? use to_display(x, mean=..., std=...))")
    return np.clip(a, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# sources
def _read_image(path, max_side: int | None = None) -> np.ndarray:
    """Decode one file fully (truncated/corrupt files raise here), apply EXIF orientation, shrink, to RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF: keep the pixels as stored
            pass
        if max_side is not None and max(img.size) > max_side:
            s = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                             Image.Resampling.LANCZOS)
        return _pil_to_rgb(img)


def _read_all(files, names, max_side):
    """Read each file; ``(photos, skipped, reasons)`` with unreadable ones skipped."""
    photos, skipped, reasons = [], [], []
    for f, name in zip(files, names):
        try:
            arr = _read_image(f, max_side)
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
            skipped.append(name)
            reasons.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        photos.append((name, arr))
    return photos, skipped, reasons


def _warn_skipped(skipped, reasons, where: str) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in {where}: " + "; ".join(reasons),
                      stacklevel=3)


def load_images(paths, *, max_side: int | None = 1024) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Image files by path: ``(photos, skipped)``, as :func:`load_folder` reads them (names = the paths).

    A missing path raises ``FileNotFoundError``; no readable image at all raises ``ValueError``.
    """
    paths = [Path(p).expanduser() for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    photos, skipped, reasons = _read_all(paths, [str(p) for p in paths], max_side)
    if not photos:
        raise ValueError(f"none of the {len(paths)} file(s) is a readable image: {'; '.join(reasons)}")
    _warn_skipped(skipped, reasons, "the given files")
    return photos, skipped


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Built-in real colour photos, ``[(name, HWC float32 RGB [0, 1]), ...]``.

    From scikit-image: astronaut, coffee, chelsea (a cat), rocket, motorcycle
    (``motorcycle_left.png``), hubble_deep_field; from scikit-learn (when installed): china,
    flower. Synthetic, binary, grayscale and microscopy images of those packages are left out.
    Nothing is downloaded.
    """
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    files = [(n, folder / f) for n, f in _SKIMAGE_PHOTOS]
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        sk = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
        files += [(n, sk / f) for n, f in _SKLEARN_PHOTOS]
    out = []
    for name, path in files:
        if path.is_file():
            out.append((name, _read_image(path)))
    if not out:  # pragma: no cover - scikit-image is a dependency
        raise RuntimeError("no sample photos found: is scikit-image installed?")
    return out


def load_folder(path, *, max_side: int | None = 1024) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Every image under ``path`` (recursive, sorted): ``(photos, skipped)``.

    Files with the extensions jpg/jpeg/png/bmp/tif/tiff/webp (any case) are read; hidden files
    and folders (name starting with ``.``) are ignored. Names are paths relative to ``path``
    (``"sub/cat.jpg"``). Images are converted to HWC float32 RGB in [0, 1] (see the module
    docstring: transparency composited on white) and, when their long side exceeds
    ``max_side``, shrunk to it (``None`` keeps full size). Files that cannot be decoded
    (truncated, empty, not an image) are skipped: their relative paths are returned in
    ``skipped`` and listed in one warning.

    Raises ``FileNotFoundError`` for a missing folder, ``NotADirectoryError`` for a file, and
    ``ValueError`` when no image could be read.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    if not root.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {str(root)!r}")
    if max_side is not None and (not isinstance(max_side, (int, np.integer)) or max_side < 1):
        raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / f)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    photos, skipped, reasons = _read_all(files, [f.relative_to(root).as_posix() for f in files], max_side)
    if not photos:
        extra = f"; {len(skipped)} unreadable: {', '.join(reasons)}" if skipped else ""
        raise ValueError(f"no readable images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in "
                         f"{str(root)!r}{extra}")
    _warn_skipped(skipped, reasons, repr(str(root)))
    return photos, skipped


# --------------------------------------------------------------------------------------------
# image sets
@dataclass(frozen=True, eq=False)
class ImageSet:
    """Square images ready for a model.

    names: (N,) ``"coffee"`` for a whole photo, ``"coffee#crop2"`` for its crops;
    images: (N, S, S, 3) float32 RGB in [0, 1]; photo_index: (N,) int64 index of the source
    photo; skipped: files that could not be read (from :func:`load_folder`).
    """

    names: tuple[str, ...]
    images: np.ndarray
    photo_index: np.ndarray
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        """Side length S of the square images."""
        return int(self.images.shape[1])


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, C) float -> (N, size, size, C) float32, bilinear with antialiasing, clipped to [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """HWC float -> (size, size, C), as :func:`resize_batch`."""
    return resize_batch(img[None], size)[0]


def _normalise_photos(photos) -> tuple[list[tuple[str, np.ndarray]], tuple[str, ...]]:
    skipped: tuple[str, ...] = ()
    if isinstance(photos, ImageSet):
        return list(zip(photos.names, photos.images)), photos.skipped
    # the (photos, skipped) pair returned by load_folder
    if (isinstance(photos, tuple) and len(photos) == 2 and isinstance(photos[0], list)
            and isinstance(photos[1], list) and all(isinstance(s, str) for s in photos[1])):
        photos, skipped = photos[0], tuple(photos[1])
    if isinstance(photos, np.ndarray):
        photos = [photos] if photos.ndim in (2, 3) else list(photos)
    if isinstance(photos, (str, bytes)) or not isinstance(photos, Iterable):
        raise TypeError("photos must be a list of (name, HWC array) pairs or of HWC arrays, got "
                        f"{type(photos).__name__}")
    out = []
    for i, p in enumerate(photos):
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            name, arr = p
        else:
            name, arr = f"image{i}", p
        out.append((name, as_rgb(arr)))
    return out, skipped


def image_set(photos, *, size, crops=1, seed=0) -> ImageSet:
    """Resize photos to ``size`` x ``size`` and add random crops.

    ``photos``: a list of ``(name, HWC array)`` pairs (as from :func:`sample_photos`), a list
    of arrays (named ``image0``, ...), or the ``(photos, skipped)`` pair from
    :func:`load_folder` (then ``skipped`` is kept). For each photo: the whole image resized to
    a square (aspect ratio not kept, nothing cut off) and ``crops - 1`` square crops with side
    40-80 % of the photo's short side at random positions, resized to ``size``. Crops depend
    only on ``seed`` and the photo's position in the list. Images are ordered photo by photo.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(crops, (int, np.integer)) or isinstance(crops, bool) or crops < 1:
        raise ValueError(f"crops must be an int >= 1 (1 = whole photos only), got {crops!r}")
    items, skipped = _normalise_photos(photos)
    if not items:
        raise ValueError("no photos given")
    names, imgs, index = [], [], []
    for i, (name, img) in enumerate(items):
        names.append(name)
        imgs.append(_resize(img, int(size)))
        index.append(i)
        if crops > 1:
            rng = np.random.default_rng([int(seed), i])
            h, w = img.shape[:2]
            short = min(h, w)
            for c in range(1, crops):
                side = max(1, int(round(short * rng.uniform(0.4, 0.8))))
                y0 = int(rng.integers(0, h - side + 1))
                x0 = int(rng.integers(0, w - side + 1))
                names.append(f"{name}#crop{c}")
                imgs.append(_resize(img[y0:y0 + side, x0:x0 + side], int(size)))
                index.append(i)
    return ImageSet(names=tuple(names), images=np.stack(imgs).astype(np.float32, copy=False),
                    photo_index=np.asarray(index, dtype=np.int64), skipped=skipped)


# --------------------------------------------------------------------------------------------
# model input and display
def to_tensor(images_hwc, *, mean, std) -> torch.Tensor:
    """HWC [0, 1] image(s) -> normalised float32 tensor ``(N, C, H, W)``.

    ``images_hwc``: one (H, W, 3) / (H, W) image, an (N, H, W, 3) array, a list of same-sized
    images, or an :class:`ImageSet`. ``C = len(mean)``: with one channel, RGB is converted to
    luminance (ITU-R 601 weights); grayscale input is repeated for three channels.
    """
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    if m.size == 0 or m.shape != s.shape:
        raise ValueError(f"mean and std must be non-empty and of equal length, got {mean!r}, {std!r}")
    if np.any(s <= 0):
        raise ValueError(f"std must be positive, got {std!r}")
    if isinstance(images_hwc, ImageSet):
        a = images_hwc.images
    elif isinstance(images_hwc, np.ndarray) and images_hwc.ndim == 4:
        a = _scale_to_unit(images_hwc)
    elif isinstance(images_hwc, np.ndarray) or isinstance(images_hwc, torch.Tensor):
        a = as_rgb(images_hwc)[None]
    else:
        imgs = [as_rgb(x) for x in images_hwc]
        if not imgs:
            raise ValueError("no images given")
        shapes = {x.shape for x in imgs}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)}; use image_set(..., size=S)")
        a = np.stack(imgs)
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (N, H, W, 3) images, got shape {a.shape}")
    a = a[..., :3] if a.shape[-1] == 4 else a
    c = m.size
    if c == 1 and a.shape[-1] == 3:
        a = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
    elif c == 3 and a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] != c:
        raise ValueError(f"images have {a.shape[-1]} channels but mean/std have {c}")
    a = (a - m) / s
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2), dtype=np.float32))


_CHANNELS = (1, 3, 4)


def to_display(x, *, mean=None, std=None, layout=None) -> np.ndarray:
    """A picture in any common layout -> HWC float32 in [0, 1] (2-D for one channel).

    Accepts torch tensors (any float dtype incl. bfloat16/half, any device, with or without
    grad) and numpy arrays: CHW, HWC, NCHW/NHWC with N = 1, or 2-D. The layout is inferred
    from which axis has 1, 3 or 4 entries; a shape where both ends could be channels, such as
    (3, 3, 3) or (4, 5, 4), raises ``ValueError`` unless ``layout="chw"`` or ``"hwc"`` is
    given. uint8 is scaled by 1/255 and uint16 by 1/65535. With ``mean``/``std`` the
    normalisation is undone (``x * std + mean`` per channel). The result is clipped to
    [0, 1]. Four channels: the first three are shown (documented choice for 4-channel models
    and RGBA arrays). The input is never modified.
    """
    if layout not in (None, "chw", "hwc"):
        raise ValueError(f"layout must be None, 'chw' or 'hwc', got {layout!r}")
    if isinstance(x, torch.Tensor):
        a = x.detach().to("cpu")
        if a.is_floating_point():
            a = a.float()
        a = a.numpy()
    else:
        a = np.asarray(x)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_ or np.issubdtype(a.dtype, np.number):
        a = a.astype(np.float32)
    else:
        raise TypeError(f"unsupported dtype {a.dtype}")
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"to_display shows one image; got a batch of {a.shape[0]} (shape "
                             f"{a.shape}); index it, e.g. x[0]")
        a = a[0]
    if a.ndim == 2:
        a = a[None]
        chw = True
    elif a.ndim == 3:
        first, last = a.shape[0] in _CHANNELS, a.shape[-1] in _CHANNELS
        if layout is not None:
            chw = layout == "chw"
        elif first and last:
            raise ValueError(f"ambiguous image shape {a.shape}: it could be CHW or HWC; pass "
                             "layout='chw' or layout='hwc'")
        elif first or last:
            chw = first
        else:
            raise ValueError(f"expected CHW or HWC with 1, 3 or 4 channels (or a 2-D map), got "
                             f"shape {a.shape}")
    else:
        raise ValueError(f"expected a 2-D, 3-D or (1, C, H, W) array, got shape {a.shape}")
    if not chw:
        a = a.transpose(2, 0, 1)
    c = a.shape[0]
    if mean is not None or std is not None:
        m = np.asarray(0.0 if mean is None else mean, dtype=np.float32).reshape(-1)
        s = np.asarray(1.0 if std is None else std, dtype=np.float32).reshape(-1)
        if m.size not in (1, c) or s.size not in (1, c):
            raise ValueError(f"mean/std have {m.size}/{s.size} entries but the image has {c} channels")
        a = a * s[:, None, None] + m[:, None, None]
    if c == 4:
        a = a[:3]
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    a = np.clip(a, 0.0, 1.0).astype(np.float32)
    if a.shape[0] == 1:
        return np.ascontiguousarray(a[0])
    return np.ascontiguousarray(a.transpose(1, 2, 0))


def batches(images, *, model=None, batch_size=32) -> Iterator[torch.Tensor]:
    """Model-input batches ``(B, C, H, W)``.

    ``images``: a tensor ``(N, C, H, W)`` (already normalised; split into chunks, never
    copied), an iterable of such batches (a ``(x, y)`` pair, as from a DataLoader, yields
    ``x``), or an :class:`ImageSet` / list of photos, which need ``model`` (a LoadedModel) for
    mean/std; an ImageSet must have the model's ``input_size``.
    """
    from .models import LoadedModel

    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    bs = int(batch_size)
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty image tensor (N = 0)")
        return iter(x.split(bs))
    is_photos = isinstance(images, ImageSet) or (
        isinstance(images, (list, tuple)) and images and not isinstance(images[0], torch.Tensor)
        and not (isinstance(images[0], (list, tuple)) and images[0] and isinstance(images[0][0], torch.Tensor)))
    if is_photos:
        if not isinstance(model, LoadedModel):
            raise TypeError("images given as an ImageSet/photos need model=LoadedModel (for mean, std and "
                            "input size); wrap a module with vizlearn.load_model(module, mean=..., std=...)")
        s = images if isinstance(images, ImageSet) else image_set(images, size=model.input_size)
        if s.size != model.input_size:
            raise ValueError(f"ImageSet images are {s.size}x{s.size} but the model expects "
                             f"{model.input_size}x{model.input_size}; build it with "
                             f"image_set(photos, size={model.input_size})")

        def gen():
            for i in range(0, len(s), bs):
                yield to_tensor(s.images[i:i + bs], mean=model.mean, std=model.std)
        return gen()
    if isinstance(images, (np.ndarray, str, bytes)) or not isinstance(images, Iterable):
        raise TypeError("images must be an (N, C, H, W) tensor, an iterable of such tensors, or an "
                        f"ImageSet; got {type(images).__name__}")

    def gen_iter():
        n = 0
        for b in images:
            if isinstance(b, (list, tuple)) and b and isinstance(b[0], torch.Tensor):
                b = b[0]
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"batch {n} is a {type(b).__name__}, expected an (N, C, H, W) tensor")
            if b.ndim == 3:
                b = b[None]
            if b.ndim != 4:
                raise ValueError(f"batch {n} has shape {tuple(b.shape)}, expected (N, C, H, W)")
            n += 1
            yield b
        if n == 0:
            raise ValueError("no image batches given")
    return gen_iter()
