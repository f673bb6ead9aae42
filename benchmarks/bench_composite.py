"""Composite forward+backward (GraphSchedule over vlm "single", 1 rank) vs the same built modules
called as one monolithic function with no runtime.

Both sides use the SAME DDP-wrapped chunks built by CompositeBuilder (same weights, same work)
and the same batch (synthetic_batch(valid, 8, seed=0)); each step starts with zero_grad_buffer()
on every chunk. Composite: ``GraphSchedule(model).forward_backward(batch)``: bridge, detached
leaves, one autograd call per node, gradient hand-off, global loss all-reduce. Monolithic:
``proj(vision(pixel_values))`` fed as 'image' to ``builders['lm'].run(lm, ...)['loss']``, then
one ``loss.backward()`` through all three. Target: ratio composite / monolithic <= 1.03.

Run: .venv/bin/python benchmarks/bench_composite.py [--json out.json] [--repeats N] [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import interleaved_medians, report  # noqa: E402

BATCH = 8


def _measure(repeats, profile_dir):
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig

    from graphs.vlm import vlm
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.runtime.schedule import GraphSchedule
    from mimo_builder._internal.runtime.synthetic import synthetic_batch
    from mimo_builder._internal.assembly.walker import CompositeBuilder

    compat.init_runtime("cpu")
    (model,) = CompositeBuilder(vlm("single")).build_distributed_models(ddp_config=DistributedDataParallelConfig())
    valid, schedule = model.valid, GraphSchedule(model)
    chunks = vision, proj, lm = [model.chunks(n)[0] for n in ("vision", "proj", "lm")]
    batch = synthetic_batch(valid, BATCH, seed=0)
    text = {k: batch[k] for k in ("input_ids", "labels", "loss_mask")}
    lm_builder = valid.builders["lm"]

    def composite():
        for c in chunks:
            c.zero_grad_buffer()
        return schedule.forward_backward(batch)

    def monolithic():
        for c in chunks:
            c.zero_grad_buffer()
        loss = lm_builder.run(lm, {**text, "image": proj(vision(batch["pixel_values"]))})["loss"]
        loss.backward()
        return float(loss.detach())

    # Sanity: same loss and same gradients, so both sides do the same math.
    loss_c = composite()
    grads_c = [p.main_grad.clone() for c in chunks for p in c.parameters()]
    loss_m = monolithic()
    grads_m = [p.main_grad.clone() for c in chunks for p in c.parameters()]
    assert abs(loss_c - loss_m) < 1e-5, (loss_c, loss_m)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads_c, grads_m)), "gradients differ"

    # Each round's timings are kept too: the per-round (paired) ratio cancels slow load drift.
    samples = {"monolithic": [], "composite": []}

    def timed(name, fn):
        return lambda: (start := time.perf_counter(), fn(), samples[name].append(time.perf_counter() - start))

    times = interleaved_medians({"monolithic": timed("monolithic", monolithic),
                                 "composite": timed("composite", composite)}, repeats=repeats)
    paired = sorted(c / m for c, m in zip(samples["composite"][1:], samples["monolithic"][1:]))  # [0]: warm-up
    times["paired"] = [paired[len(paired) // 4], statistics.median(paired), paired[3 * len(paired) // 4]]
    if profile_dir:
        import cProfile
        import pstats

        for name, fn in (("composite", composite), ("monolithic", monolithic)):
            prof, path = cProfile.Profile(), os.path.join(profile_dir, f"{name}.prof")
            prof.runcall(lambda: [fn() for _ in range(repeats)])
            prof.dump_stats(path)
            stats = pstats.Stats(prof)  # own times: autograd re-entering Python garbles cumulative ones
            own = sum(v[2] for k, v in stats.stats.items() if "mimo_builder/" in k[0]) / repeats
            print(f"--- {name}: {repeats} steps; mimo_builder code's own time {own * 1e3:.2f} ms/step ({path})")
            stats.sort_stats("tottime").print_stats(r"mimo_builder/", 10)
    return times, loss_c


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="also write cProfile stats (composite.prof, monolithic.prof) here")
    args = parser.parse_args(argv)
    if args.repeats < 15:
        parser.error("--repeats must be >= 15")
    profile_dir = args.profile and os.path.abspath(args.profile)
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)

    from mimo_builder._internal.platform.launch import launch

    times, loss = launch(_measure, 1, args.repeats, profile_dir, timeout_s=900)[0]
    ratio = times["composite"] / times["monolithic"]
    return report(
        f"GraphSchedule forward+backward vs monolithic call (vlm 'single', batch {BATCH}, 1 rank, CPU)",
        [("monolithic (median)", f"{times['monolithic'] * 1e3:.1f} ms/step"),
         ("composite (median)", f"{times['composite'] * 1e3:.1f} ms/step"),
         ("composite - monolithic", f"{(times['composite'] - times['monolithic']) * 1e3:.2f} ms/step"),
         ("per-round ratio: median [quartiles]", "{1:.3f} [{0:.3f}, {2:.3f}]".format(*times["paired"])),
         ("loss (both sides equal)", f"{loss:.4f}"),
         ("repeats", str(args.repeats))],
        "ratio composite / monolithic", ratio, "<= 1.03", args.json)


if __name__ == "__main__":
    main()
