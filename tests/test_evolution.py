"""Feature evolution callback: brute-force strongest activations, projections, CKA, demo, bad input."""
import numpy as np
import pytest
import torch
from torch import nn

from vizlearn.capture import capture
from vizlearn.evolution import EvolutionResult, FeatureEvolution, linear_cka_gram, train_small_cnn_demo
from vizlearn.projection import project


def _train_step(model, g):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_plain_loop_matches_bruteforce(tiny_convnet, tmp_path):
    model = tiny_convnet
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(6, 3, 16, 16, generator=g)
    cb = FeatureEvolution(probe, ["1", "4"], {"1": [0, 2], "4": [5]}, epochs=(1, 3))
    for epoch in (1, 2, 3):
        model.train()
        _train_step(model, g)
        cb.on_epoch_end(model, epoch)
        assert model.training  # left as found
    res = cb.result()
    assert res.epochs.tolist() == [1, 3] and res.unit_layer == ("1", "1", "4")
    # the last snapshot equals a brute-force search on the current model
    model.eval()
    with torch.no_grad(), capture(model, ["1", "4"]) as acts:
        model(probe)
    for u, (ly, ch) in enumerate(zip(res.unit_layer, res.unit_channel)):
        a = acts[ly][:, ch]
        per = a.flatten(1).amax(1)
        img = int(per.argmax())
        flat = int(a[img].flatten().argmax())
        pos = (flat // a.shape[2], flat % a.shape[2])
        assert res.image_index[-1, u] == img and tuple(res.position[-1, u]) == pos
        assert res.score[-1, u] == pytest.approx(float(per[img]))
        ref = project(model, probe[img:img + 1], ly, int(ch), pos)[0].numpy()
        np.testing.assert_allclose(res.projection[-1, u], ref, rtol=1e-5, atol=1e-6)
        y0, x0, y1, x1 = res.box[-1, u]
        assert 0 <= y0 < y1 <= 16 and 0 <= x0 < x1 <= 16
    c = res.cka()
    assert c.shape == (2, 2, 2) and np.allclose(np.diagonal(c, axis1=1, axis2=2), 1)
    assert np.isfinite(res.weight_change).all() and (res.weight_change[-1] == 0).all()
    assert res.weight_layer == ("0", "3")
    r2 = EvolutionResult.load(res.save(tmp_path / "evo"))
    np.testing.assert_array_equal(r2.projection, res.projection)
    assert r2.unit_layer == res.unit_layer


def test_linear_cka_hand_case():
    x = np.random.default_rng(0).normal(size=(10, 4))
    k = x @ x.T
    assert linear_cka_gram(k, k) == pytest.approx(1.0)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    y = 3 * x @ q  # orthogonal transform + isotropic scaling: CKA stays 1
    assert linear_cka_gram(k, y @ y.T) == pytest.approx(1.0)


def test_demo_runs_quickly():
    res, model = train_small_cnn_demo(epochs=2, record=(1, 2), n_probe=16, threads=1)
    assert res.epochs.tolist() == [0, 1, 2] and res.layers == ("relu1", "relu2", "relu3")
    assert res.projection.shape[:2] == (3, 12) and len(res.extra["test_accuracy"]) == 2
    s = res.settle()
    assert set(s["layers"]) == {"relu1", "relu2", "relu3"}


def test_bad_input(tiny_convnet):
    with pytest.raises(TypeError):
        FeatureEvolution(np.zeros((2, 3, 16, 16)), ["1"])
    with pytest.raises(ValueError, match="at least 2"):
        FeatureEvolution(torch.zeros(1, 3, 16, 16), ["1"])
    cb = FeatureEvolution(torch.zeros(2, 3, 16, 16), ["1"], {"1": [99]}, epochs=(1,))
    with pytest.raises(ValueError, match="channels"):
        cb.on_epoch_end(tiny_convnet, 1)
    with pytest.raises(RuntimeError, match="no snapshot"):
        FeatureEvolution(torch.zeros(2, 3, 16, 16), ["1"], epochs=(5,)).result()


def test_plots_return_figures(tiny_convnet):
    from matplotlib.figure import Figure

    from vizlearn.plot_experiments import plot_evolution, plot_evolution_settle

    probe = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cb = FeatureEvolution(probe, ["1"], {"1": [0, 1]}, epochs=(0, 1))
    cb.on_train_begin(tiny_convnet)
    _train_step(tiny_convnet, torch.Generator().manual_seed(2))
    cb.on_epoch_end(tiny_convnet, 1)
    res = cb.result()
    assert isinstance(plot_evolution(res), Figure) and isinstance(plot_evolution_settle(res), Figure)


def test_info_dict_interface(tiny_convnet):
    probe = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cb = FeatureEvolution(probe, ["1"], {"1": [0]}, epochs=(1,))
    cb.on_epoch_end({"part": "finetune", "epoch": 2, "model": tiny_convnet})  # not a chosen epoch
    cb.on_epoch_end({"part": "finetune", "epoch": 1, "model": tiny_convnet})
    assert cb.result().epochs.tolist() == [1]
    with pytest.raises(ValueError, match="no 'model'"):
        cb.on_epoch_end({"part": "finetune", "epoch": 1})
