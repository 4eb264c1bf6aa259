"""The main job end to end: features helpers, `run_report`, the CLI's error contract, the notebook."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vizlearn
from vizlearn.cli import main
from vizlearn.report import run_report
from vizlearn.features import choose_filters, default_layers, effective_side, feature_tiles
from vizlearn.topk import TopK


def _topk(scores, image_index):
    scores = np.asarray(scores, np.float32)
    c, k = scores.shape
    return TopK(layer="x", scores=scores, image_index=np.asarray(image_index, np.int64),
                position=np.zeros((c, k, 2), np.int64), box=np.zeros((c, k, 4), np.int64))


def test_choose_filters_strongest_top1_and_skips_dead():
    res = _topk([[1.0, 0.5], [3.0, 1.0], [0.0, 0.0], [2.0, 2.0], [9.0, 1.0]],
                [[0, 1], [2, 0], [0, 1], [1, 2], [-1, -1]])
    # channel 4 has no image (empty slot) and channel 2 is dead: neither is chosen
    assert choose_filters(res, 3).tolist() == [1, 3, 0]
    assert choose_filters(res, 10).tolist() == [1, 3, 0]


def test_default_layers_preset_and_generic():
    import timm
    import torchvision

    eff = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert default_layers(eff) == ["bn1.drop", "blocks.1", "blocks.2", "blocks.4", "bn2.drop"]
    vgg = torchvision.models.alexnet()
    layers = default_layers(vgg, input_size=96)
    assert len(layers) == 5 and all(name.startswith("features.") for name in layers)
    order = [int(name.split(".")[1]) for name in layers]
    assert order == sorted(order) and order[0] == 0


def test_effective_side_hand_checked():
    proj = np.zeros((3, 3, 21, 21))
    proj[0, :, 8:13, 8:13] = 1.0  # all energy in the 5x5 square around (10, 10)
    proj[1, 0, 10, 10] = -2.0  # a single pixel: side 1
    # row 2: all zero -> side 1; and a uniform row-0 copy centred off-square needs a bigger side
    centres = np.array([[10, 10], [10, 10], [10, 10]])
    assert effective_side(proj, centres).tolist() == [5, 1, 1]
    assert effective_side(proj[:1], np.array([[9, 10]]), energy=1.0).tolist() == [7]
    uniform = np.ones((1, 1, 21, 21))  # 90% of 441 pixels: the 21x21 square centred at (10, 10) is needed
    assert effective_side(uniform, np.array([[10, 10]])).tolist() == [21]


def _tiny_loaded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4)).eval()
    return vizlearn.load_model(net, input_size=32, categories=[f"class{i}" for i in range(4)])


def test_feature_tiles_patches_equal_image_crops():
    loaded = _tiny_loaded()
    rng = np.random.default_rng(0)
    photos = [(f"p{i}", rng.random((40, 48, 3)).astype(np.float32)) for i in range(5)]
    iset = vizlearn.image_set(photos, size=32, crops=1)
    res = vizlearn.top_k(loaded, iset, ["3"], k=3)["3"]
    chans = choose_filters(res, 2)
    proj, patches, side = feature_tiles(loaded, iset, "3", res, chans, crop="theoretical")
    field = vizlearn.receptive_field(loaded, "3", input_size=32)
    assert side == field.size[0] == field.size[1]
    assert patches.shape == proj.shape == (len(chans), 3, field.size[0], field.size[1], 3)
    for f, ch in enumerate(chans):
        for j in range(3):
            y0, x0, y1, x1 = res.box[ch, j]
            img = iset.images[res.image_index[ch, j]]
            tile = patches[f, j]
            inside = ~np.isnan(tile[..., 0])
            # the valid part of the tile is exactly the image inside the clipped box
            np.testing.assert_array_equal(tile[inside].reshape(y1 - y0, x1 - x0, 3), img[y0:y1, x0:x1])
            assert np.isfinite(proj[f, j][inside]).all()


def test_run_report_tiny_model_is_deterministic(tmp_path):
    loaded = _tiny_loaded()
    folder = tmp_path / "photos"
    folder.mkdir()
    from skimage import data, io

    io.imsave(folder / "coffee.png", data.coffee()[::8, ::8])
    io.imsave(folder / "cat.png", data.chelsea()[::8, ::8])
    (folder / "broken.png").write_text("not an image")
    runs = []
    for name in ("a", "b"):
        with pytest.warns(UserWarning):
            summary = run_report(model=loaded, images=folder, layers=["0", "3"], k=3, filters=2,
                                                 crops=3, out=tmp_path / name, experiments=(), quiet=True,
                                                 progress=False)
        runs.append(np.load(tmp_path / name / "results.npz"))
    assert summary["skipped_files"] and summary["n_images"] == 6
    out = tmp_path / "a"
    for fig in summary["figures"]:
        assert (out / fig["file"]).stat().st_size > 1000
    html = (out / "index.html").read_text()
    assert all(fig["file"] in html for fig in summary["figures"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["feature_panels"]["3"]["channels"] == summary["feature_panels"]["3"]["channels"]
    for key in runs[0].files:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])


@pytest.mark.slow
def test_run_report_default_model_two_layers(tmp_path):
    summary = run_report(layers=["bn1", "blocks.2"], k=4, filters=2, crops=1, out=tmp_path,
                                         experiments=(), quiet=True, progress=False)
    assert summary["predictions"]["coffee"][0][0] == "espresso"
    assert len(list(Path(tmp_path).glob("*.png"))) == 5


def _run_cli(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.mark.parametrize("argv, needle", [
    (["report", "--layers", "blocks.99", "--out", "{tmp}"], "unknown layer"),
    (["report", "--images", "{tmp}/missing", "--out", "{tmp}"], "missing"),
    (["report", "--images", "{tmp}/empty", "--out", "{tmp}"], "empty"),
    (["report", "--k", "0"], "at least 1"),
    (["report", "--experiments", "occlusoin", "--out", "{tmp}"], "unknown experiment"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    code = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err.lower()


def test_cli_predict_espresso(tmp_path, capsys):
    from skimage import data, io

    io.imsave(tmp_path / "coffee.png", data.coffee())
    assert main(["predict", str(tmp_path / "coffee.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("coffee.png") and "espresso" in lines[1]


def test_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    path = Path(__file__).parents[1] / "notebooks" / "01_what_each_layer_sees.ipynb"
    nb = nbformat.read(path, as_version=4)
    settings = nb.cells[1]
    assert "CROPS" in settings.source
    settings.source = 'LAYER = "blocks.1"\nCROPS = 1\nFILTERS = 2\nK = 4'
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3


def test_cli_layers_lists_shapes_and_receptive_fields(capsys):
    assert main(["layers", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[2:]}
    assert "conv_stem" in rows and "bn2.drop" in rows
    assert "32x112x112" in rows["conv_stem"] and "3x3 (2)" in rows["conv_stem"]
    assert "40x28x28" in rows["blocks.2"] and "67x67 (8)" in rows["blocks.2"]


def test_readme_python_snippet_runs_as_written():
    """The README's Python API block is executed verbatim, so it cannot rot."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    block = block.replace("crops=8", "crops=2")  # the only setting changed: fewer images, same code path
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["top"].scores.shape == (40, 9)
    assert scope["proj"].shape == (2, 3, 224, 224)
    assert scope["acts"]["bn2"].shape == (4, 1280, 7, 7)


def test_cli_experiments_leave_the_report_index_alone(tmp_path):
    (tmp_path / "index.html").write_text("the report's page")
    assert main(["experiments", "layer1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").read_text() == "the report's page"
    assert "layer1_health.png" in (tmp_path / "experiments.html").read_text()
    assert (tmp_path / "experiments" / "layer1_health.png").exists()
