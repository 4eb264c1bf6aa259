"""Streaming top-k against a brute-force oracle that keeps every map."""
import copy
import gc
import weakref
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

import vizlearn
from vizlearn.receptive_field import receptive_field, unit_box
from vizlearn.topk import TopK, top_k

from conftest import make_tiny_convnet


def brute_force(model, x, layer, k, batch_size):
    """Keep all maps; per image and channel the max and its first row-major position; sort by
    (-score, image index) with plain Python. The maps are computed with the same batch split as
    top_k's, so that float32 results are bitwise comparable (conv results differ in the last ulp
    between batch sizes)."""
    maps = []
    for i in range(0, len(x), batch_size):
        with vizlearn.capture(model, [layer]) as acts:
            with torch.no_grad():
                model.eval()(x[i:i + batch_size])
        maps.append(acts[layer])
    a = torch.cat(maps)
    if a.dim() == 2:
        a = a[:, :, None, None]
    n, c, h, w = a.shape
    scores, index, pos = [], [], []
    for ch in range(c):
        cands = []
        for i in range(n):
            m = a[i, ch]
            best = m.max().item()
            flat = [(r, col) for r in range(h) for col in range(w) if m[r, col].item() == best][0]
            cands.append((-best, i, flat))
        cands.sort(key=lambda t: (t[0], t[1]))
        cands = cands[:k] + [(np.inf, -1, (-1, -1))] * max(0, k - n)
        scores.append([-s for s, _, _ in cands])
        index.append([i for _, i, _ in cands])
        pos.append([p for _, _, p in cands])
    return np.array(scores, np.float32), np.array(index), np.array(pos)


def check_equal(res: TopK, oracle):
    scores, index, pos = oracle
    np.testing.assert_array_equal(res.image_index, index)
    np.testing.assert_array_equal(res.scores, scores)
    np.testing.assert_array_equal(res.position, pos)


def test_topk_equals_brute_force_tiny_net(tiny_convnet):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 3, 16, 16, generator=g)
    res = top_k(tiny_convnet, x, ["0", "3", "4", "7"], k=5, batch_size=7)
    assert list(res) == ["0", "3", "4", "7"]
    for layer, r in res.items():
        check_equal(r, brute_force(tiny_convnet, x, layer, 5, 7))
        assert r.scores.dtype == np.float32 and r.image_index.dtype == np.int64
        assert r.position.dtype == np.int64 and r.box.dtype == np.int64


def test_issue5_case12_200_images_batches_of_16_every_conv_layer():
    model = make_tiny_convnet(3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 3, 16, 16, generator=g)
    x[50] = x[10]  # exact duplicate images: tied scores in every channel
    x[120] = x[10]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    res = top_k(model, (x[i:i + 16] for i in range(0, 200, 16)), convs, k=9)
    for layer in convs:
        r = res[layer]
        check_equal(r, brute_force(model, x, layer, 9, 16))
        # memory bounded by channels x k: that is all a result holds
        c = model.get_submodule(layer).out_channels
        assert r.scores.shape == (c, 9) and r.position.shape == (c, 9, 2) and r.box.shape == (c, 9, 4)
        # ties: wherever image 10 is in the top-k, its copies follow it in index order
        for ch in range(c):
            row = list(r.image_index[ch])
            if 10 in row and row.index(10) < 7:
                j = row.index(10)
                assert row[j:j + 3] == [10, 50, 120]
    # same result whatever the batching (up to float32 rounding of the convolution)
    res2 = top_k(model, x, convs, k=9, batch_size=200)
    for layer in convs:
        np.testing.assert_allclose(res[layer].scores, res2[layer].scores, rtol=1e-5, atol=1e-6)


def test_hand_checkable_ties_and_positions():
    # a 1x1 conv: channel 0 = image, channel 1 = -image
    model = nn.Sequential(nn.Conv2d(1, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        model[0].bias.zero_()
    values = [1.0, 3.0, 3.0, 2.0, 3.0, 1.0]
    x = torch.zeros(6, 1, 6, 6)
    for i, v in enumerate(values):
        x[i, 0, 2, 3] = v
        x[i, 0, 4, 1] = v  # the same max again, later in row-major order
    r = top_k(model, x, "0", k=4, batch_size=4)["0"]
    assert r.image_index[0].tolist() == [1, 2, 4, 3]
    assert r.scores[0].tolist() == [3.0, 3.0, 3.0, 2.0]
    assert r.position[0].tolist() == [[2, 3]] * 4
    assert r.image_index[1].tolist() == [0, 1, 2, 3]  # all scores 0: lower index first
    assert r.position[1].tolist() == [[0, 0]] * 4  # first position of the tied max
    assert r.box[0].tolist() == [[2, 3, 3, 4]] * 4  # 1x1 field


def test_fewer_images_than_k_and_boxes(tiny_convnet, tiny_images):
    res = top_k(tiny_convnet, tiny_images, ["3", "7"], k=6)
    r = res["3"]
    assert (r.image_index[:, 4:] == -1).all() and (r.image_index[:, :4] >= 0).all()
    assert np.isneginf(r.scores[:, 4:]).all()
    assert (r.position[:, 4:] == -1).all() and (r.box[:, 4:] == -1).all()
    f = receptive_field(tiny_convnet, "3", input_size=16)
    for ch in range(r.channels):
        for j in range(4):
            assert tuple(r.box[ch, j]) == unit_box(f, tuple(r.position[ch, j]), (16, 16))
    # (N, C) output: 1x1 map whose unit sees the whole image
    r7 = res["7"]
    assert (r7.position[:, :4] == 0).all() and (r7.box[:, :4] == [0, 0, 16, 16]).all()
    check_equal(r7, brute_force(tiny_convnet, tiny_images, "7", 6, 32))


def test_model_state_untouched_and_repeatable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 3))
    model.train()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 3, 12, 12)
    x0 = x.clone()
    a = top_k(model, x, ["1", "2", "4"], k=3, batch_size=4)
    b = top_k(model, x, ["1", "2", "4"], k=3, batch_size=3)
    assert all(m.training for m in model.modules()) and model[2].inplace
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    assert torch.equal(x, x0) and not x.requires_grad
    for key in a:
        np.testing.assert_array_equal(a[key].scores, b[key].scores)
        np.testing.assert_array_equal(a[key].image_index, b[key].image_index)
    # layer "1" (BN, followed by an in-place ReLU) equals the out-of-place, eval-mode oracle
    ref = copy.deepcopy(model)
    ref[2].inplace = False
    check_equal(a["1"], brute_force(ref, x, "1", 3, 4))
    assert all(m._forward_hooks == {} for m in model.modules())


def test_stream_is_not_retained(tiny_convnet):
    """Earlier batches are freed while later ones are processed (nothing accumulates)."""
    refs = []

    def stream():
        for i in range(12):
            gc.collect()
            # everything older than the batch just processed must be gone
            assert all(r() is None for r in refs[:-1]), "an earlier batch is still referenced"
            b = torch.randn(8, 3, 16, 16)
            refs.append(weakref.ref(b))
            yield b
            del b

    res = top_k(tiny_convnet, stream(), ["0", "3"], k=4)
    assert res["0"].image_index.max() < 96


def test_save_load_roundtrip(tmp_path, tiny_convnet, tiny_images):
    r = top_k(tiny_convnet, tiny_images, "3", k=5)["3"]
    p = r.save(tmp_path / "t3")
    assert p.suffix == ".npz"
    back = TopK.load(p)
    assert back.layer == "3"
    for f in ("scores", "image_index", "position", "box"):
        np.testing.assert_array_equal(getattr(back, f), getattr(r, f))
        assert getattr(back, f).dtype == getattr(r, f).dtype
    again = TopK.from_dict(r.to_dict())
    np.testing.assert_array_equal(again.box, r.box)
    with pytest.raises(ValueError, match="shapes"):
        TopK("x", np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64), np.zeros((2, 3)), np.zeros((2, 3, 4)))


Pair = namedtuple("Pair", "feat aux")


class TupleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return Pair(y, y.mean())


class UsesTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TupleLayer()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(x).feat)


def test_select_for_tuple_layers():
    torch.manual_seed(0)
    model = UsesTuple().eval()
    x = torch.randn(9, 3, 8, 8)
    with pytest.raises(TypeError, match="Pair\\(feat, aux\\)"):
        top_k(model, x, "block", k=2)
    r = top_k(model, x, "block", k=2, select="feat")["block"]
    check_equal(r, brute_force(model, x, "block.conv", 2, 32))
    assert r.box.shape == (4, 2, 4)


def test_imageset_with_loaded_model(tiny_convnet):
    from vizlearn.images import image_set, to_tensor

    rng = np.random.default_rng(0)
    photos = [(f"p{i}", rng.random((20 + i, 24, 3)).astype(np.float32)) for i in range(5)]
    s = image_set(photos, size=16, crops=2, seed=0)
    loaded = vizlearn.load_model(tiny_convnet, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=16)
    res = top_k(loaded, s, ["0", "3"], k=3, batch_size=3)
    x = to_tensor(s.images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for layer in ("0", "3"):
        check_equal(res[layer], brute_force(tiny_convnet, x, layer, 3, 3))


def test_bad_input(tiny_convnet, tiny_images):
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k(tiny_convnet, tiny_images, "0", k=0)
    with pytest.raises(ValueError):
        top_k(tiny_convnet, tiny_images, "0", k=-2)
    with pytest.raises(TypeError):
        top_k(tiny_convnet, tiny_images, "0", k=2.5)
    with pytest.raises(ValueError, match="Closest valid names"):
        top_k(tiny_convnet, tiny_images, "33")
    with pytest.raises(ValueError, match="layers is empty"):
        top_k(tiny_convnet, tiny_images, [])
    with pytest.raises(ValueError, match="move the model"):
        top_k(tiny_convnet, tiny_images, "0", device="meta")

    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (N, L, C)

    m = nn.Sequential(nn.Conv2d(3, 4, 3), Tokens())
    with pytest.raises(ValueError, match="needs \\(N, C, H, W\\)"):
        top_k(m, tiny_images, "1")
    with pytest.raises(ValueError, match="same shape"):
        top_k(tiny_convnet, [tiny_images, torch.randn(2, 3, 18, 18)], "0")
    with pytest.raises(ValueError, match="no image"):
        top_k(tiny_convnet, iter([]), "0")
