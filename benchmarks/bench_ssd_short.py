"""CPU benchmark: the SSD scan on a sequence shorter than a chunk, run as one chunk of its own
length vs padded to a whole chunk (what the CPU scan did before; MCore's chunk is 128 steps).

Run: .venv/bin/python benchmarks/bench_ssd_short.py [--seqlen 12] [--batch 64] [--repeats 20]
The padded baseline appends steps with dt -> 0 (no input, no decay), which is what padding a
chunk amounts to; both give the same outputs on the real steps (checked). Median of the repeats
of forward+backward, fp32, default torch threads. No assertions on timing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from bench_ssd import make_inputs  # noqa: E402
from common import median_seconds  # noqa: E402
from submodels.mamba_kernels import ssd_chunk_scan  # noqa: E402

import torch


def padded(t, length):
    """The inputs with steps appended up to ``length`` that neither add input nor decay."""
    pad = length - t["x"].shape[1]
    out = {k: v.detach() for k, v in t.items()}
    for key in ("x", "B", "C"):
        out[key] = torch.cat([out[key], torch.zeros_like(out[key][:, :1]).expand(-1, pad, *out[key].shape[2:])], 1)
    out["dt"] = torch.cat([out["dt"], torch.full_like(out["dt"][:, :1], -1e4).expand(-1, pad, -1)], 1)
    return {k: v.requires_grad_() for k, v in out.items()}


def scan(t, chunk):
    return ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                          dt_bias=t["dt_bias"], dt_softplus=True)


def fwd_bwd_seconds(t, chunk, length, repeats):
    def step():
        scan(t, chunk)[:, :length].square().mean().backward()
        for v in t.values():
            v.grad = None
    return median_seconds(step, repeats)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)

    t = make_inputs(b=args.batch, l=args.seqlen, h=4, p=16, g=2, n=16)  # the digits demo's mixer
    whole = padded(t, args.chunk)
    with torch.no_grad():
        diff = float((scan(t, args.chunk) - scan(whole, args.chunk)[:, :args.seqlen]).abs().max())
    own = fwd_bwd_seconds(t, args.chunk, args.seqlen, args.repeats)
    pad = fwd_bwd_seconds(whole, args.chunk, args.seqlen, args.repeats)
    print(f"SSD scan fwd+bwd, length {args.seqlen}, batch {args.batch}: one {args.seqlen}-step chunk "
          f"{own * 1e3:.2f} ms, padded to {args.chunk} {pad * 1e3:.2f} ms, speed-up {pad / own:.1f}x "
          f"(max abs diff {diff:.1e})")
    return {"benchmark": f"SSD scan at length {args.seqlen}: one chunk of its length vs padded to {args.chunk}",
            "ratio_name": "speed-up padded / own length", "ratio": pad / own, "target": "> 1"}


if __name__ == "__main__":
    main()
