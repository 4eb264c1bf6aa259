"""vizlearn.occlusion vs captum.attr.Occlusion at equal settings, same run.

    .venv/bin/pip install captum
    MPLBACKEND=Agg .venv/bin/python benchmarks/bench_occlusion.py [--model efficientnet_lite0] [--repeats 3]

Both evaluate the same occluded images (square window ``size``, ``stride``, grey fill 0.5 in pixel
space, ``chunk`` = captum's ``perturbations_per_eval``) with a model that returns class
probabilities. captum's attribution is the drop of P(target) averaged over the windows covering a
pixel, so its probability map is ``P_unoccluded - attribution``; vizlearn's ``prob`` map must equal
it. Runs alternate (vizlearn, captum, vizlearn, ...) and the medians are compared. Appends a section
to benchmarks/RESULTS.md with ``--record``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from captum.attr import Occlusion

    from vizlearn.images import sample_photos
    from vizlearn.models import load_model
    from vizlearn.occlusion import occlusion, square_crop

    loaded = load_model(args.model)
    model = loaded.model.eval()
    side = loaded.input_size
    img = square_crop(dict(sample_photos())["chelsea"], side)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - mean) / std
    fill = 0.5
    baseline = ((torch.full((1, 3, 1, 1), fill) - mean) / std).expand_as(x).contiguous()
    if (side - args.size) % args.stride:
        raise SystemExit("choose size/stride that tile the image exactly, so both use the same windows")

    def probs(inp):
        return torch.softmax(model(inp), dim=1)

    with torch.no_grad():
        target = int(probs(x).argmax())
    captum_occ = Occlusion(probs)

    def run_vizlearn():
        return occlusion(loaded, img, size=args.size, stride=args.stride, fill=fill, target=target,
                         chunk=args.chunk)

    def run_captum():
        with torch.no_grad():
            return captum_occ.attribute(x, sliding_window_shapes=(3, args.size, args.size),
                                        strides=(3, args.stride, args.stride), baselines=baseline,
                                        target=target, perturbations_per_eval=args.chunk)

    run_vizlearn(), run_captum()  # warm-up
    tv, tc = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = run_vizlearn()
        tv.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        attr = run_captum()
        tc.append(time.perf_counter() - t0)
    with torch.no_grad():
        p0 = float(probs(x)[0, target])
    # captum: per channel identical; P map = P(unoccluded) - mean drop over covering windows
    cmap = p0 - attr[0, 0].numpy()
    diff = float(np.abs(cmap - r.prob).max())
    chunk1 = occlusion(loaded, img, size=args.size, stride=args.stride, fill=fill, target=target, chunk=1)
    chunk_diff = float(np.abs(chunk1.prob - r.prob).max())
    mv, mc = statistics.median(tv), statistics.median(tc)
    n_windows = len(r.rows) * len(r.cols)
    lines = [
        f"## Occlusion vs captum.attr.Occlusion ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `MPLBACKEND=Agg .venv/bin/python benchmarks/bench_occlusion.py --size {args.size} "
        f"--stride {args.stride} --chunk {args.chunk} --repeats {args.repeats}"
        f"{' --threads ' + str(args.threads) if args.threads else ''} --record`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"captum {__import__('captum').__version__}; other jobs may share the CPUs (runs alternate).",
        f"Setting: {args.model} (bundled weights), chelsea photo {side}x{side}, occluder {args.size}px, "
        f"stride {args.stride}px ({n_windows} windows), fill 0.5 (pixel space), chunk = "
        f"perturbations_per_eval = {args.chunk}, target = top-1 ({r.name_of(target)}).",
        "",
        "| implementation | median s (of %d) | all runs s |" % args.repeats,
        "|---|---|---|",
        f"| vizlearn.occlusion | {mv:.2f} | {', '.join(f'{t:.2f}' for t in tv)} |",
        f"| captum Occlusion | {mc:.2f} | {', '.join(f'{t:.2f}' for t in tc)} |",
        "",
        f"Speed ratio captum / vizlearn = **{mc / mv:.2f}x** (> 1: vizlearn faster). "
        f"Max |P map difference| vs captum = {diff:.2e}; chunk 1 vs chunk {args.chunk}: {chunk_diff:.2e} "
        "(float rounding: vizlearn feeds channels-last batches, see `occlusion(channels_last=...)`).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        path = Path(__file__).with_name("RESULTS.md")
        with path.open("a") as fh:
            fh.write(("\n" if path.exists() and path.stat().st_size else "") + text)


if __name__ == "__main__":
    main()
