"""Benchmark: deconvnet projections of the top-9 activations of 64 channels of a resnet18 layer.

vizlearn.project_units (batched: shared forward up to the layer, one backward per round) against
captum's NeuronDeconvolution called once per unit (its documented use). Random weights, CPU.

    .venv/bin/pip install captum      # the `bench` extra
    MPLBACKEND=Agg .venv/bin/python benchmarks/bench_projection.py [--size 112] [--images 32]

Prints the timings, checks that both give the same projections (captum seeds the backward with 1,
vizlearn with the activation's value: captum's result is scaled by that value before comparing),
and prints a markdown section for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch
import torchvision

import vizlearn
from vizlearn.capture import run_to_layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--layer", default="layer2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--captum-units", type=int, default=64,
                    help="time captum on this many units spread over the list and extrapolate (0 = all)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(args.images, 3, args.size, args.size)

    # top-k by brute force: per image and channel the spatial max, then top-k images per channel
    with torch.no_grad():
        act = run_to_layer(model, x, args.layer)
    n, c, h, w = act.shape
    spatial_max, flat_pos = act.flatten(2).max(dim=2)  # (N, C)
    units = []
    for ch in range(args.channels):
        imgs = torch.topk(spatial_max[:, ch], args.k).indices.tolist()
        for i in imgs:
            p = int(flat_pos[i, ch])
            units.append((i, ch, (p // w, p % w)))
    print(f"resnet18 {args.layer} at {args.size}px: activation {tuple(act.shape[1:])}, {len(units)} units "
          f"from {args.images} images")

    try:
        import captum
        from captum.attr import NeuronDeconvolution
    except ImportError:
        print("captum not installed: .venv/bin/pip install captum")
        return
    layer_module = dict(model.named_modules())[args.layer]
    deconv = NeuronDeconvolution(model, layer_module)
    n_todo = len(units) if args.captum_units <= 0 else min(args.captum_units, len(units))
    pick = torch.linspace(0, len(units) - 1, n_todo).round().long().unique().tolist()  # spread over channels
    todo = [units[j] for j in pick]
    few = todo[:: max(1, len(todo) // 16)]

    def run_ours():
        return vizlearn.project_units(model, x, args.layer, units, method="deconvnet")

    def run_captum():
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # captum warns on every call
            for i, ch, (r, col) in todo:
                out.append(deconv.attribute(x[i:i + 1], neuron_selector=(ch, r, col))[0])
        return out

    def run_single():
        return [vizlearn.project_units(model, x, args.layer, [u]) for u in few]

    # the machine may be shared: alternate the contenders and keep each one's best of `repeats`
    best = {"ours": float("inf"), "captum": float("inf"), "single": float("inf")}
    for _ in range(args.repeats):
        for key, fn in (("ours", run_ours), ("captum", run_captum), ("single", run_single)):
            t0 = time.perf_counter()
            res = fn()
            best[key] = min(best[key], time.perf_counter() - t0)
            if key == "ours":
                ours = res
            elif key == "captum":
                theirs = res
    t_ours = best["ours"]
    t_captum = best["captum"]
    t_single = best["single"] * len(units) / len(few)
    print(f"vizlearn.project_units: {t_ours:.2f} s")
    print(f"vizlearn one unit per call (extrapolated to {len(units)}): {t_single:.1f} s")
    theirs = torch.stack(theirs)
    t_captum_all = t_captum * len(units) / len(todo)
    values = torch.stack([act[i, ch, r, col] for i, ch, (r, col) in todo])
    scaled = theirs * values.view(-1, 1, 1, 1)
    err = (ours[pick] - scaled).abs().max().item()
    rel = err / scaled.abs().max().item()
    same = torch.allclose(ours[pick], scaled, rtol=1e-4, atol=1e-5 * scaled.abs().max().item())
    print(f"captum NeuronDeconvolution x{len(todo)}: {t_captum:.2f} s"
          + (f" (extrapolated to {len(units)} units: {t_captum_all:.1f} s)" if len(todo) < len(units) else ""))
    print(f"identical (allclose): {same}; max abs diff {err:.3g} (relative {rel:.2g})")
    print(f"ratio captum / vizlearn: {t_captum_all / t_ours:.1f}x")

    cmd = "MPLBACKEND=Agg .venv/bin/python benchmarks/bench_projection.py" + (
        f" --size {args.size}" if args.size != 112 else "") + (
        f" --captum-units {args.captum_units}" if args.captum_units != 64 else "")
    print("\n--- markdown ---")
    print(f"""## Projection: batched deconvnet vs captum NeuronDeconvolution per unit (issue 3)

Command: `{cmd}`

Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__},
torchvision {torchvision.__version__}, captum {captum.__version__}, {torch.get_num_threads()} torch threads.

Task: resnet18 (random weights, eval), `{args.layer}` at {args.size} px (activation {c}x{h}x{w}); top-{args.k}
images per channel (spatial max, brute force) for {args.channels} channels from {args.images} random images
= {len(units)} units, deconvnet projection of each back to the {args.size}x{args.size} input.
Each contender ran {args.repeats} times, alternating; the best time of each is reported.

| implementation | time | per unit |
|---|---|---|
| `vizlearn.project_units` (one call) | {t_ours:.2f} s | {1000 * t_ours / len(units):.1f} ms |
| `vizlearn.project_units` one unit per call ({len(few)} timed, extrapolated) | {t_single:.2f} s | {1000 * t_single / len(units):.1f} ms |
| captum `NeuronDeconvolution.attribute` once per unit{' (' + str(len(todo)) + ' units timed, extrapolated)' if len(todo) < len(units) else ''} | {t_captum_all:.2f} s | {1000 * t_captum_all / len(units):.1f} ms |

Ratio: **{t_captum_all / t_ours:.1f}x** faster. Results identical where both apply: allclose = {same}
(max abs difference {err:.2g}, {rel:.1g} of the largest value; captum seeds the backward with 1, vizlearn
with the activation's value, so captum's maps were multiplied by that value).
""")


if __name__ == "__main__":
    main()
