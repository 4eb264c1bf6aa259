"""Peak memory of vizlearn.top_k over N and 10 N images (each run in a fresh process).

    .venv/bin/python benchmarks/bench_topk_memory.py [--n 200] [--size 32] [--batch 32]

Model: torchvision resnet18 (random weights, seed 0), layers conv1, layer1..layer4, k=9.
Images are generated batch by batch from a seeded generator (an iterable of batches), so the
input itself is never held in memory; what is measured is top_k's own footprint.

Per run (child process): a warm-up top_k over 8 batches (allocator pools, lazy imports), then
the peak resident set size is reset (``echo 5 > /proc/self/clear_refs``, Linux) and top_k runs
over all images; we report VmHWM (peak RSS during the run), its increase over the RSS just
before the run, tracemalloc's peak of Python-side allocations (torch tensor storage is not
visible to tracemalloc, hence RSS), and the bytes of the result arrays. For contrast, the bytes
that keeping all the maps would take are printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(n: int, size: int, batch: int) -> dict:
    import tracemalloc

    import torch
    import torchvision

    import vizlearn

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    layers = ["conv1", "layer1", "layer2", "layer3", "layer4"]

    trace = []  # VmRSS (kB) each time a batch is requested

    def stream(count):
        g = torch.Generator().manual_seed(1)
        for i in range(0, count, batch):
            trace.append(_status_kb("VmRSS"))
            yield torch.randn(min(batch, count - i), 3, size, size, generator=g)

    vizlearn.top_k(model, stream(8 * batch), layers, k=9)  # warm-up: allocator pools settle over a few batches
    trace.clear()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _status_kb("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    res = vizlearn.top_k(model, stream(n), layers, k=9)
    secs = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _status_kb("VmHWM")
    held = sum(a.nbytes for r in res.values() for a in (r.scores, r.image_index, r.position, r.box))
    with vizlearn.capture(model, layers) as acts, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    all_maps = n * sum(a[0].numel() * 4 for a in acts.values())
    return {"n": n, "peak_rss_kb": hwm, "rss_before_kb": rss0, "peak_increase_kb": hwm - rss0,
            "python_peak_kb": py_peak // 1024, "result_bytes": held, "all_maps_would_be_mb": all_maps / 2**20,
            "seconds": secs, "rss_trace_kb": [trace[len(trace) // 4], trace[len(trace) // 2], trace[-1]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.size, args.batch)))
        return
    rows = []
    for n in (args.n, 10 * args.n):
        out = subprocess.run([sys.executable, __file__, "--child", "--n", str(n), "--size", str(args.size),
                              "--batch", str(args.batch)], check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"resnet18 random, {args.size}x{args.size} inputs, batch {args.batch}, k=9, layers conv1, layer1-4")
    print("| images | peak RSS (MB) | RSS before (MB) | peak increase (MB) | Python peak (KB) | result (KB) "
          "| all maps would be (MB) | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['peak_rss_kb'] / 1024:.1f} | {r['rss_before_kb'] / 1024:.1f} | "
              f"{r['peak_increase_kb'] / 1024:.1f} | {r['python_peak_kb']} | {r['result_bytes'] / 1024:.1f} | "
              f"{r['all_maps_would_be_mb']:.0f} | {r['seconds']:.1f} |")
    for r in rows:
        q, h, e = (v / 1024 for v in r["rss_trace_kb"])
        print(f"{r['n']} images: RSS when the batch at 25% / 50% / 100% of the stream is requested: "
              f"{q:.1f} / {h:.1f} / {e:.1f} MB")
    ratio = rows[1]["peak_rss_kb"] / rows[0]["peak_rss_kb"]
    inc = (rows[1]["peak_increase_kb"] - rows[0]["peak_increase_kb"]) / 1024
    print(f"peak RSS ratio (10x images / 1x): {ratio:.3f} -> {'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} "
          f"10%; peak increase differs by {inc:+.1f} MB")


if __name__ == "__main__":
    main()
