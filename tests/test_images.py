"""Image sources and conversions (issue 5 cases 15, 16, 17)."""
import warnings

import numpy as np
import pytest
from conftest import write_png16
import torch
from PIL import Image

from vizlearn.images import (ImageSet, as_rgb, batches, image_set, load_folder, sample_photos,
                             to_display, to_tensor)
from vizlearn.models import load_model


@pytest.fixture(scope="module")
def photos():
    return dict(sample_photos())


def test_sample_photos_are_real_colour_photos(photos):
    assert {"astronaut", "coffee", "chelsea", "rocket", "motorcycle"} <= set(photos)
    assert len(photos) >= 6
    for name, a in photos.items():
        assert a.dtype == np.float32 and a.ndim == 3 and a.shape[2] == 3, name
        assert a.min() >= 0 and a.max() <= 1 and min(a.shape[:2]) >= 200, name
        # colour: channels differ noticeably somewhere
        assert np.abs(a[..., 0] - a[..., 2]).mean() > 0.02, name
    import skimage.data

    assert np.array_equal(photos["coffee"], skimage.data.coffee().astype(np.float32) / 255)


# ---------------------------------------------------------------------------- folders
def test_load_folder_skips_broken_files_and_converts_modes(tmp_path, photos):
    coffee_u8 = (photos["coffee"] * 255).round().astype(np.uint8)
    Image.fromarray(coffee_u8).save(tmp_path / "a_coffee.jpg", quality=95)
    (tmp_path / "sub").mkdir()
    Image.fromarray(coffee_u8[:50, :60]).save(tmp_path / "sub" / "b_small.png")
    # truncated JPEG, zero-byte file, a text file named .png
    full = (tmp_path / "a_coffee.jpg").read_bytes()
    (tmp_path / "c_truncated.jpg").write_bytes(full[: len(full) // 3])
    (tmp_path / "d_empty.png").write_bytes(b"")
    (tmp_path / "e_text.png").write_text("this is not an image\n")
    # 16-bit grayscale and 16-bit RGB PNGs
    g16 = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    write_png16(tmp_path / "f_gray16.png", g16)
    rgb16 = np.zeros((8, 9, 3), np.uint16)
    rgb16[..., 0] = 65535
    write_png16(tmp_path / "g_rgb16.png", rgb16)
    # 8-bit grayscale, RGBA (composited on white), palette with a transparent entry
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    Image.fromarray(gray, mode="L").save(tmp_path / "h_gray.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 255  # green
    rgba[:2, ..., 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "i_rgba.png")
    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 0, 1])
    pal.save(tmp_path / "j_palette.png")
    pal.save(tmp_path / "k_palette_transparent.png", transparency=1)
    # ignored: hidden files and other extensions
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("hello")

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got, skipped = load_folder(tmp_path)
    names = [n for n, _ in got]
    assert names == ["a_coffee.jpg", "f_gray16.png", "g_rgb16.png", "h_gray.png", "i_rgba.png",
                     "j_palette.png", "k_palette_transparent.png", "sub/b_small.png"]
    assert skipped == ["c_truncated.jpg", "d_empty.png", "e_text.png"]
    ours = [w for w in rec if "unreadable" in str(w.message)]
    assert len(ours) == 1 and all(s in str(ours[0].message) for s in skipped)
    assert "skipped 3" in str(ours[0].message)
    d = dict(got)
    for a in d.values():
        assert a.dtype == np.float32 and a.ndim == 3 and a.shape[2] == 3
        assert a.min() >= 0 and a.max() <= 1
    assert np.abs(d["a_coffee.jpg"] - photos["coffee"]).mean() < 0.02  # JPEG round trip
    assert np.array_equal(d["sub/b_small.png"], photos["coffee"][:50, :60])
    np.testing.assert_allclose(d["f_gray16.png"][..., 1], g16 / 65535.0, atol=1e-6)
    assert np.array_equal(d["f_gray16.png"][..., 0], d["f_gray16.png"][..., 2])
    np.testing.assert_allclose(d["g_rgb16.png"][0, 0], [1, 0, 0])
    np.testing.assert_allclose(d["h_gray.png"][..., 2], gray / 255.0, atol=1e-7)
    np.testing.assert_allclose(d["i_rgba.png"][0, 0], [0, 1, 0])  # opaque green
    np.testing.assert_allclose(d["i_rgba.png"][3, 3], [1, 1, 1])  # transparent -> white
    np.testing.assert_allclose(d["j_palette.png"][0], [[1, 0, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_allclose(d["k_palette_transparent.png"][0, 1], [1, 1, 1])
    # the pair from load_folder feeds image_set, which keeps the skipped files for the summary
    s = image_set((got, skipped), size=32)
    assert s.skipped == tuple(skipped) and len(s) == len(got)


def test_load_folder_bad_inputs_and_max_side(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no readable images"):
        load_folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ValueError comes before any warning
        with pytest.raises(ValueError, match="no readable images.*x.png"):
            load_folder(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_folder(tmp_path / "x.png")
    big = tmp_path / "big"
    big.mkdir()
    Image.new("RGB", (300, 150), (255, 0, 0)).save(big / "r.png")
    (img,), _ = load_folder(big, max_side=100)
    assert img[1].shape == (50, 100, 3) and np.allclose(img[1], [1, 0, 0])
    (img,), _ = load_folder(big, max_side=None)
    assert img[1].shape == (150, 300, 3)


# ---------------------------------------------------------------------------- image sets
def test_image_set_whole_images_crops_and_determinism():
    h, w = 60, 90
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = np.stack([xx / (w - 1), yy / (h - 1), np.full_like(xx, 0.5)], axis=-1)  # position code
    flat = np.zeros((40, 40, 3), np.float32)
    flat[...] = (0.2, 0.4, 0.6)
    s = image_set([("ramp", ramp), ("flat", flat)], size=32, crops=4, seed=1)
    assert s.names == ("ramp", "ramp#crop1", "ramp#crop2", "ramp#crop3",
                       "flat", "flat#crop1", "flat#crop2", "flat#crop3")
    assert s.images.shape == (8, 32, 32, 3) and s.images.dtype == np.float32
    assert s.photo_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and s.size == 32 and len(s) == 8
    # hand-checkable: a constant photo stays that colour, whole or cropped
    np.testing.assert_allclose(s.images[4:], np.broadcast_to(flat[0, 0], (4, 32, 32, 3)), atol=1e-6)
    # the whole image covers the full photo (x and y codes run from ~0 to ~1)
    whole = s.images[0]
    assert whole[..., 0].min() < 0.03 and whole[..., 0].max() > 0.97
    assert whole[..., 1].min() < 0.03 and whole[..., 1].max() > 0.97
    # crops are squares of 40-80 % of the short side, inside the photo
    for c in s.images[1:4]:
        side_x = (c[..., 0].max() - c[..., 0].min()) * (w - 1)
        side_y = (c[..., 1].max() - c[..., 1].min()) * (h - 1)
        assert abs(side_x - side_y) < 3
        assert 0.4 * h - 3 <= side_x <= 0.8 * h + 1
    # deterministic for a seed, different for another; crops of a photo do not depend on others
    again = image_set([("ramp", ramp), ("flat", flat)], size=32, crops=4, seed=1)
    assert np.array_equal(again.images, s.images)
    other = image_set([("ramp", ramp), ("flat", flat)], size=32, crops=4, seed=2)
    assert not np.array_equal(other.images[1:4], s.images[1:4])
    alone = image_set([("ramp", ramp)], size=32, crops=4, seed=1)
    assert np.array_equal(alone.images, s.images[:4])
    # plain arrays get generic names; uint8 is scaled
    u = image_set([(flat * 255).astype(np.uint8)], size=8)
    assert u.names == ("image0",) and np.allclose(u.images, np.broadcast_to(flat[0, 0], (1, 8, 8, 3)),
                                                  atol=1 / 255)


def test_image_set_bad_inputs():
    img = np.zeros((10, 10, 3), np.float32)
    with pytest.raises(ValueError, match="size"):
        image_set([img], size=0)
    with pytest.raises(ValueError, match="crops"):
        image_set([img], size=8, crops=0)
    with pytest.raises(ValueError, match="no photos"):
        image_set([], size=8)
    with pytest.raises(ValueError, match="looks like CHW"):
        image_set([np.zeros((3, 10, 12), np.float32)], size=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_set([img + 2.0], size=8)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        image_set([np.zeros((10, 10, 5))], size=8)
    with pytest.raises(TypeError):
        image_set("photo.jpg", size=8)


# ---------------------------------------------------------------------------- tensors
def test_to_tensor_matches_explicit_normalisation():
    rng = np.random.default_rng(0)
    a = rng.random((2, 5, 6, 3), dtype=np.float32)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    t = to_tensor(a, mean=mean, std=std)
    assert t.shape == (2, 3, 5, 6) and t.dtype == torch.float32
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(t[n, c].numpy(), (a[n, :, :, c] - mean[c]) / std[c], rtol=1e-6)
    one = to_tensor(a[0], mean=(0.5,), std=(0.5,))  # 1-channel model: luminance
    lum = a[0] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    np.testing.assert_allclose(one[0, 0].numpy(), (lum - 0.5) / 0.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="equal length"):
        to_tensor(a, mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match="different sizes"):
        to_tensor([a[0], a[0, :4]], mean=mean, std=std)


def test_to_display_layouts_and_types_give_the_same_picture():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    u8[0, 0] = (255, 0, 0)
    ref = u8.astype(np.float32) / 255
    chw = torch.from_numpy(ref).permute(2, 0, 1).contiguous()
    views = {
        "hwc uint8": to_display(u8),
        "hwc float": to_display(ref),
        "chw tensor": to_display(chw),
        "nchw tensor": to_display(chw[None]),
        "chw requires grad": to_display(chw.clone().requires_grad_(True)),
        "chw half": to_display(chw.half()),
        "hwc tensor": to_display(chw.permute(1, 2, 0)),
    }
    for k, v in views.items():
        assert v.shape == (6, 7, 3) and v.dtype == np.float32, k
        np.testing.assert_allclose(v, ref, atol=1e-3, err_msg=k)
    bf = to_display(chw.bfloat16())
    np.testing.assert_allclose(bf, ref, atol=1 / 128)
    # a pure red image stays red everywhere
    red = np.zeros((5, 5, 3), np.uint8)
    red[..., 0] = 255
    for x in (red, torch.from_numpy(red).permute(2, 0, 1).float() / 255,
              (torch.from_numpy(red).permute(2, 0, 1).float() / 255).bfloat16()[None]):
        d = to_display(x)
        assert np.array_equal(d[..., 0], np.ones((5, 5))) and not d[..., 1:].any()
    # undo a normalisation (oracle: x * std + mean), then clip
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = to_tensor(ref, mean=mean, std=std)
    np.testing.assert_allclose(to_display(t, mean=mean, std=std), ref, atol=1e-6)
    assert to_display(torch.full((3, 2, 2), 5.0)).max() == 1.0
    assert to_display(torch.full((3, 2, 2), -5.0)).min() == 0.0
    # one channel -> 2-D; 4 channels -> the first three
    g = rng.random((1, 4, 5)).astype(np.float32)
    assert to_display(torch.from_numpy(g)).shape == (4, 5)
    assert to_display(g[0]).shape == (4, 5)
    assert to_display(torch.from_numpy(g)[None]).shape == (4, 5)
    four = torch.rand(4, 6, 7)
    np.testing.assert_allclose(to_display(four), four[:3].permute(1, 2, 0).numpy())
    # the input is not modified
    before = chw.clone()
    to_display(chw, mean=mean, std=std)
    assert torch.equal(before, chw)


def test_to_display_ambiguous_and_bad_shapes():
    for shape in [(3, 3, 3), (4, 5, 4), (1, 7, 3), (3, 224, 3)]:
        with pytest.raises(ValueError, match="ambiguous"):
            to_display(torch.rand(shape))
    x = torch.rand(3, 3, 3)
    np.testing.assert_allclose(to_display(x, layout="chw"), x.permute(1, 2, 0).numpy())
    np.testing.assert_allclose(to_display(x, layout="hwc"), x.numpy())
    with pytest.raises(ValueError, match="batch of 2"):
        to_display(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        to_display(torch.rand(5, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        to_display(torch.rand(3, 8, 8), mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="layout"):
        to_display(x, layout="nhwc")


def test_as_rgb_conversions():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, :, 3] = 255
    out = as_rgb(rgba)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[1, 0], [1, 1, 1])
    assert as_rgb(np.full((3, 3), 65535, np.uint16)).min() == 1.0


# ---------------------------------------------------------------------------- batches
def test_batches_from_tensor_iterable_and_image_set():
    x = torch.randn(10, 3, 8, 8)
    parts = list(batches(x, batch_size=4))
    assert [p.shape[0] for p in parts] == [4, 4, 2] and torch.equal(torch.cat(parts), x)
    pairs = [(x[:5], torch.zeros(5)), (x[5:], torch.zeros(5))]  # DataLoader style
    assert torch.equal(torch.cat(list(batches(pairs))), x)
    s = image_set([np.random.default_rng(0).random((12, 20, 3))] * 3, size=8)
    lm = load_model(torch.nn.Identity(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=8)
    got = torch.cat(list(batches(s, model=lm, batch_size=2)))
    assert torch.equal(got, to_tensor(s.images, mean=lm.mean, std=lm.std))
    with pytest.raises(TypeError, match="LoadedModel"):
        list(batches(s))
    wrong = load_model(torch.nn.Identity(), input_size=16)
    with pytest.raises(ValueError, match="size=16"):
        list(batches(s, model=wrong))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(x, batch_size=0))
    with pytest.raises(TypeError):
        list(batches(np.zeros((2, 3, 8, 8))))
    with pytest.raises(TypeError, match="batch 0"):
        list(batches(iter(["not a tensor"])))
    assert isinstance(s, ImageSet)
