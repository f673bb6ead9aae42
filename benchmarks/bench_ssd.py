"""CPU benchmark: chunked SSD scan vs the per-time-step recurrence (submodels.mamba_kernels).

Run: .venv/bin/python benchmarks/bench_ssd.py [--json PATH] [--seqlen 1024] [--repeats 5]
Times forward and forward+backward (fp32, default torch thread count), median of the
repeats after one warm-up run each, and prints the naive/chunked ratio (speed-up).
No assertions on timing.
"""

import argparse
import json
import platform
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import median_seconds  # noqa: E402
from submodels.mamba_kernels import naive_sequential_scan, ssd_chunk_scan  # noqa: E402

import torch


def make_inputs(b, l, h, p, g, n, seed=0):
    """Random Mamba-2-like inputs (fp32 leaves requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, l, h, p, generator=gen),
        "dt": torch.randn(b, l, h, generator=gen) * 0.5 - 1.0,
        "A": -torch.exp(torch.randn(h, generator=gen) * 0.5),
        "B": torch.randn(b, l, g, n, generator=gen),
        "C": torch.randn(b, l, g, n, generator=gen),
        "D": torch.randn(h, generator=gen),
        "dt_bias": torch.randn(h, generator=gen) * 0.5,
    }
    return {k: v.requires_grad_() for k, v in t.items()}


def run_chunked(t, chunk):
    return ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                          dt_bias=t["dt_bias"], dt_softplus=True)


def run_naive(t, chunk):
    del chunk
    return naive_sequential_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"],
                                 dt_bias=t["dt_bias"], dt_softplus=True)




def bench(impl, t, chunk, repeats):
    """(forward seconds, forward+backward seconds) for one implementation."""
    def fwd():
        with torch.no_grad():
            impl(t, chunk)

    def fwd_bwd():
        impl(t, chunk).square().mean().backward()
        for v in t.values():
            v.grad = None

    return median_seconds(fwd, repeats), median_seconds(fwd_bwd, repeats)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=32)
    ap.add_argument("--dstate", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    shape = dict(b=args.batch, l=args.seqlen, h=args.heads, p=args.headdim, g=1, n=args.dstate)
    t = make_inputs(**shape)
    with torch.no_grad():  # sanity: both compute the same thing
        y, y_naive = run_chunked(t, args.chunk), run_naive(t, args.chunk)
        diff = ((y - y_naive).abs().max() / y_naive.abs().max()).item()

    results = {name: bench(fn, t, args.chunk, args.repeats)
               for name, fn in [("chunked", run_chunked), ("naive", run_naive)]}
    rows = {
        "forward": [results["chunked"][0], results["naive"][0]],
        "forward+backward": [results["chunked"][1], results["naive"][1]],
    }
    print(f"SSD scan, CPU fp32, {shape}, chunk={args.chunk}, threads={torch.get_num_threads()}, "
          f"median of {args.repeats} (max rel. diff chunked vs naive {diff:.1e})")
    print(f"{'pass':<18}{'chunked (ms)':>14}{'naive (ms)':>14}{'speed-up':>10}")
    for name, (chunked, naive) in rows.items():
        print(f"{name:<18}{chunked * 1e3:>14.2f}{naive * 1e3:>14.2f}{naive / chunked:>9.1f}x")

    if args.json:
        report = {
            "shape": shape, "chunk_size": args.chunk, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "max_rel_diff": diff,
            "results": {name: {"chunked_s": c, "naive_s": n, "speedup": n / c}
                        for name, (c, n) in rows.items()},
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)

    speedup = rows["forward+backward"][1] / rows["forward+backward"][0]
    return {"benchmark": f"SSD scan at sequence length {args.seqlen}: chunked vs naive sequential (CPU)",
            "ratio_name": "speed-up naive / chunked (fwd+bwd)", "ratio": speedup, "target": "> 1"}


if __name__ == "__main__":
    main()
